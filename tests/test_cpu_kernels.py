"""pipower._cpu kernels vs their NumPy references: values, thread-count invariance, argument checks.

Skipped when the extension is not built; test_cpu_build.py fails instead when PIPOWER_REQUIRE_EXT=1.
"""
import numpy as np
import pytest

from pipower import _cpu
from pipower.ops import NumpyOps

pytestmark = pytest.mark.skipif(not _cpu.AVAILABLE, reason=f"pipower._cpu not built: {_cpu.IMPORT_ERROR}")
k = _cpu.kernels
if _cpu.AVAILABLE:
    from pipower._cpu import _linear
REF = NumpyOps()


def rng(seed=0):
    return np.random.default_rng(seed)


# ---- rms_norm -------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,D", [(1, 896), (37, 896), (1, 1), (2, 7), (37, 1000), (5, 17), (3, 576),
                                 (64, 4095)])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_rms_norm_matches_numpy(T, D, eps):
    g = rng(T * 10007 + D)
    x = (g.standard_normal((T, D)) * g.uniform(0.01, 10)).astype(np.float32)
    w = g.standard_normal(D).astype(np.float32)
    want = REF.rms_norm(x, w, eps)
    for nt in (1, 2):
        np.testing.assert_allclose(k.rms_norm(x, w, eps, n_threads=nt), want, rtol=1e-5, atol=0)


def test_rms_norm_thread_count_does_not_change_bits():
    g = rng(1)
    x = g.standard_normal((129, 1000)).astype(np.float32)
    w = g.standard_normal(1000).astype(np.float32)
    ref = k.rms_norm(x, w, 1e-6, n_threads=1)
    for nt in (2, 3, 8, 500):
        assert np.array_equal(k.rms_norm(x, w, 1e-6, n_threads=nt), ref)


def test_rms_norm_out_in_place_and_readonly_inputs():
    g = rng(2)
    x = g.standard_normal((9, 300)).astype(np.float32)
    w = g.standard_normal(300).astype(np.float32)
    want = k.rms_norm(x, w, 1e-6)
    out = np.empty_like(x)
    assert k.rms_norm(x, w, 1e-6, out=out) is out
    assert np.array_equal(out, want)
    y = x.copy()
    assert k.rms_norm(y, w, 1e-6, out=y, n_threads=2) is y   # in place
    assert np.array_equal(y, want)
    x.setflags(write=False)                                   # e.g. weights memory-mapped from a file
    w.setflags(write=False)
    assert np.array_equal(k.rms_norm(x, w, 1e-6), want)


def test_rms_norm_empty_rows():
    out = k.rms_norm(np.zeros((0, 8), np.float32), np.ones(8, np.float32), 1e-6)
    assert out.shape == (0, 8)


@pytest.mark.parametrize("bad", [
    dict(x=np.zeros((2, 8), np.float64)),
    dict(x=np.zeros(8, np.float32)),
    dict(x=np.zeros((2, 2, 8), np.float32)),
    dict(x=np.zeros((8, 2), np.float32).T),                  # not C-contiguous
    dict(x=[[1.0] * 8]),
    dict(x=np.zeros((2, 0), np.float32), weight=np.zeros(0, np.float32)),
    dict(weight=np.ones(7, np.float32)),
    dict(weight=np.ones(8, np.float16)),
    dict(out=np.empty((2, 8), np.float64)),
    dict(out=np.empty((3, 8), np.float32)),
    dict(out=np.empty((2, 8), np.float32)[:, ::-1]),
    dict(n_threads=0),
    dict(n_threads=1.5),
])
def test_rms_norm_rejects_bad_arguments(bad):
    args = dict(x=np.zeros((2, 8), np.float32), weight=np.ones(8, np.float32), eps=1e-6, out=None,
                n_threads=1)
    args.update(bad)
    with pytest.raises(ValueError):
        k.rms_norm(**args)


def test_rms_norm_rejects_readonly_out():
    out = np.empty((2, 8), np.float32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        k.rms_norm(np.zeros((2, 8), np.float32), np.ones(8, np.float32), 1e-6, out=out)


# ---- f16 / bf16 -> f32 ----------------------------------------------------------------------------
ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)   # every 16-bit pattern once


@pytest.mark.parametrize("nt", [1, 2, 3])
@pytest.mark.parametrize("as_half", [True, False])
def test_f16_exhaustive_bit_exact(nt, as_half):
    # All 65536 halfs: zeros, subnormals, normals, +-inf, quiet and signalling NaNs with payloads.
    want = ALL16.view(np.float16).astype(np.float32).view(np.uint32)
    src = (ALL16.view(np.float16) if as_half else ALL16).reshape(256, 256)
    got = k.f16_to_f32(src, n_threads=nt)
    assert got.dtype == np.float32 and got.shape == (256, 256)
    bad = np.flatnonzero(got.view(np.uint32).ravel() != want)
    assert bad.size == 0, f"{bad.size} mismatches, first f16 bits {ALL16[bad[:5]]}"


@pytest.mark.parametrize("nt", [1, 2, 3])
def test_bf16_exhaustive_bit_exact(nt):
    want = ALL16.astype(np.uint32) << 16
    got = k.bf16_to_f32(ALL16.reshape(512, 128), n_threads=nt)
    assert np.array_equal(got.view(np.uint32).ravel(), want)


@pytest.mark.parametrize("shape", [(1, 1), (3, 12345), (12345,), (7, 4097), (0, 5)])
def test_widen_odd_shapes_and_threads(shape):
    bits = rng(3).integers(0, 1 << 16, size=shape, dtype=np.uint16)
    want16 = bits.view(np.float16).astype(np.float32).view(np.uint32)
    wantbf = bits.astype(np.uint32) << 16
    for nt in (1, 2, 5):
        out = np.full(shape, np.nan, np.float32)
        assert k.f16_to_f32(bits, out=out, n_threads=nt) is out
        assert np.array_equal(out.view(np.uint32), want16)
        assert np.array_equal(k.bf16_to_f32(bits, n_threads=nt).view(np.uint32), wantbf)


@pytest.mark.parametrize("fn", ["f16_to_f32", "bf16_to_f32"])
@pytest.mark.parametrize("bad", [
    dict(src=np.zeros((2, 8), np.float32)),
    dict(src=np.zeros((2, 2, 8), np.uint16)),
    dict(src=np.zeros((8, 2), np.uint16).T),
    dict(out=np.empty((2, 8), np.float16)),
    dict(out=np.empty((2, 9), np.float32)),
    dict(n_threads=-1),
])
def test_widen_rejects_bad_arguments(fn, bad):
    args = dict(src=np.zeros((2, 8), np.uint16), out=None, n_threads=1)
    args.update(bad)
    with pytest.raises(ValueError):
        getattr(k, fn)(**args)


def test_bf16_rejects_ieee_half_dtype():
    # float16 means IEEE half; handing it to the bf16 widener is a bug, not a reinterpretation.
    with pytest.raises(ValueError, match="uint16"):
        k.bf16_to_f32(np.zeros(4, np.float16))


# ---- gemv (the engine's f32 path: pipower._cpu._linear.gemv) -------------------------------------
@pytest.mark.parametrize("N,K", [(1, 1), (33, 17), (896, 896), (300, 1001)])
def test_gemv_f32_matches_numpy(N, K):
    g = rng(N + K)
    w = g.standard_normal((N, K)).astype(np.float32)
    x = g.standard_normal(K).astype(np.float32)
    want = (w.astype(np.float64) @ x.astype(np.float64))
    # float32 dot of length K: error bound ~ K * eps * sum|w*x|
    tol = 4 * K * np.finfo(np.float32).eps * (np.abs(w) @ np.abs(x)) + 1e-30
    ref1 = _linear.gemv("f32", w, None, x, n_threads=1)
    assert np.all(np.abs(ref1 - want) <= tol)
    for nt in (2, 3):
        assert np.array_equal(_linear.gemv("f32", w, None, x, n_threads=nt), ref1)


def test_gemv_rejects_mismatch():
    with pytest.raises(ValueError, match="x must have shape"):
        _linear.gemv("f32", np.zeros((3, 4), np.float32), None, np.zeros(5, np.float32))


# ---- CythonOps ------------------------------------------------------------------------------------
def test_cython_ops_rms_norm_matches_reference():
    from pipower._cpu.ops import CythonOps
    ops = CythonOps(n_threads=2)
    assert ops.name == "cython" and isinstance(ops, NumpyOps)
    g = rng(4)
    w = g.standard_normal(896).astype(np.float32)
    for x in (g.standard_normal((1, 896)), g.standard_normal((37, 896)), g.standard_normal((2, 3, 896)),
              g.standard_normal((896, 37)).T):                 # non-contiguous input is copied
        x = np.asarray(x, np.float32)
        got = ops.rms_norm(x, w, 1e-6)
        assert got.dtype == np.float32 and got.shape == x.shape
        np.testing.assert_allclose(got, REF.rms_norm(x, w, 1e-6), rtol=1e-5, atol=0)
