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
