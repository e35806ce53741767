"""pipower._cpu._linear (gemv, gemm, dequantize_rows) vs NumPy over quant.dequantize (CythonOps.linear
against NumpyOps: tests/test_backend_ops.py).

Tolerance: the reference is float64 over the *same* dequantized weights, so the only difference is float32
accumulation order; we allow 1e-5 * sum_k |w_k x_k| per output, above the worst-case bound of a float32 sum
in 16/32 lanes (~(K/16 + 5) * 2^-24 ~ 2e-6 relative for K <= 4864), far below any format error.
"""
import numpy as np
import pytest

from pipower import _cpu
from pipower.quant import ROW_FORMATS as FORMATS, QMatrix, dequantize, quantize

L = pytest.importorskip("pipower._cpu._linear", reason=f"pipower._cpu not built: {_cpu.IMPORT_ERROR}")

SIMDS = (True, False) if L.HAVE_AVX512 else (False,)
RTOL = 1e-5


def make(N, K, fmt, seed=0):
    g = np.random.default_rng(seed + 7919 * N + K)
    w = (g.standard_normal((N, K)) * g.uniform(0.01, 2)).astype(np.float32)
    return quantize(w, fmt), g


def check_close(got, W64, x64):
    """got [.., N] vs x64 @ W64^T in float64, relative to sum |w||x|."""
    want = x64 @ W64.T
    scale = np.abs(x64) @ np.abs(W64).T + 1e-30
    err = np.max(np.abs(got.astype(np.float64) - want) / scale)
    assert err <= RTOL, f"max error {err:.2e} of sum|w||x|"


SHAPES = [(1, 32), (5, 64), (17, 96), (37, 896), (896, 4864 // 4), (33, 4864), (300, 1024)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,K", SHAPES)
def test_gemv_matches_dequantized_reference(fmt, N, K):
    m, g = make(N, K, fmt)
    x = g.standard_normal(K).astype(np.float32)
    W64 = dequantize(m).astype(np.float64)
    ref = None
    for simd in SIMDS:
        for nt in (1, 2, 3):
            y = L.gemv(fmt, m.data, m.scales, x, n_threads=nt, simd=simd)
            assert y.dtype == np.float32 and y.shape == (N,)
            check_close(y, W64, x.astype(np.float64))
            if nt == 1:
                ref = y
            assert np.array_equal(y, ref), "gemv must not depend on the thread count"


@pytest.mark.parametrize("fmt", ["f32", "f16"])
@pytest.mark.parametrize("K", [1, 7, 15, 17, 31, 33, 100])
def test_gemv_float_formats_any_k(fmt, K):
    m, g = make(19, K, fmt)
    x = g.standard_normal(K).astype(np.float32)
    for simd in SIMDS:
        check_close(L.gemv(fmt, m.data, m.scales, x, simd=simd), dequantize(m).astype(np.float64), x)


def test_gemv_large_parallel_rows_and_out():
    m, g = make(4099, 896, "q4")      # big enough to use the team; N not a multiple of 16 or 2
    x = g.standard_normal(896).astype(np.float32)
    out = np.full(4099, np.nan, np.float32)
    assert L.gemv("q4", m.data, m.scales, x, out=out, n_threads=2) is out
    check_close(out, dequantize(m).astype(np.float64), x.astype(np.float64))
    assert np.array_equal(out, L.gemv("q4", m.data, m.scales, x, n_threads=1))


@pytest.mark.skipif(not L.HAVE_AVX512, reason="no AVX-512 path compiled")
@pytest.mark.parametrize("fmt", FORMATS)
def test_portable_path_matches_avx512(fmt):
    m, g = make(70, 4864, fmt)
    x = g.standard_normal(4864).astype(np.float32)
    a = L.gemv(fmt, m.data, m.scales, x, simd=True)
    b = L.gemv(fmt, m.data, m.scales, x, simd=False)
    W = dequantize(m).astype(np.float64)
    scale = np.abs(W) @ np.abs(x)
    assert np.max(np.abs(a - b) / scale) <= 2 * RTOL


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,K", [(1, 32), (37, 64), (300, 896), (1200, 1024)])
def test_dequantize_rows_bit_exact(fmt, N, K):
    m, g = make(N, K, fmt)
    want = dequantize(m)
    for nt in (1, 2):
        assert np.array_equal(L.dequantize_rows(fmt, m.data, m.scales, n_threads=nt), want)
    idx = g.integers(0, N, size=11).astype(np.int32)
    assert np.array_equal(L.dequantize_rows(fmt, m.data, m.scales, idx=idx), want[idx])
    assert np.array_equal(L.dequantize_rows(fmt, m.data, m.scales, start=N // 3, stop=N), want[N // 3:])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 2, 37])
@pytest.mark.parametrize("N,K", [(1, 32), (17, 64), (300, 896), (1500, 896)])
def test_gemm_matches_dequantized_reference(fmt, T, N, K):
    m, g = make(N, K, fmt)
    x = g.standard_normal((T, K)).astype(np.float32)
    y = L.gemm(fmt, m.data, m.scales, x)
    assert y.shape == (T, N) and y.dtype == np.float32
    check_close(y, dequantize(m).astype(np.float64), x.astype(np.float64))


def _args(fmt="q8", N=4, K=64):
    m, g = make(N, K, fmt)
    return dict(fmt=fmt, data=m.data, scales=m.scales, x=np.zeros(K, np.float32))


@pytest.mark.parametrize("bad,match", [
    (dict(fmt="q5"), "unknown weight format"),
    (dict(data=np.zeros((4, 64), np.uint8)), "dtype"),
    (dict(scales=None), "scales"),
    (dict(scales=np.zeros((4, 3), np.float16)), "scales must have shape"),
    (dict(scales=np.zeros((4, 2), np.float32)), "dtype"),
    (dict(x=np.zeros(63, np.float32)), "x must have shape"),
    (dict(x=np.zeros(64, np.float64)), "dtype"),
    (dict(x=np.zeros(128, np.float32)[::2]), "C-contiguous"),
    (dict(out=np.zeros(5, np.float32)), "out must have shape"),
    (dict(n_threads=0), "n_threads"),
])
def test_gemv_rejects_bad_arguments(bad, match):
    a = _args()
    a.update(bad)
    with pytest.raises(ValueError, match=match):
        L.gemv(**a)


def test_f32_rejects_scales_and_readonly_out():
    m, _ = make(4, 64, "f32")
    with pytest.raises(ValueError, match="no scales"):
        L.gemv("f32", m.data, np.zeros((4, 2), np.float16), np.zeros(64, np.float32))
    out = np.zeros(4, np.float32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        L.gemv("f32", m.data, None, np.zeros(64, np.float32), out=out)


def test_dequantize_rows_rejects_out_of_range():
    m, _ = make(4, 64, "q4")
    with pytest.raises(ValueError, match="idx values"):
        L.dequantize_rows("q4", m.data, m.scales, idx=np.array([0, 4], np.int32))
    with pytest.raises(ValueError, match="start"):
        L.dequantize_rows("q4", m.data, m.scales, start=3, stop=2)


def test_readonly_weights_are_fine():
    m, g = make(40, 64, "q8")
    m.data.setflags(write=False)
    m.scales.setflags(write=False)
    x = g.standard_normal(64).astype(np.float32)
    check_close(L.gemv("q8", m.data, m.scales, x), dequantize(m).astype(np.float64), x.astype(np.float64))
    assert isinstance(m, QMatrix)
