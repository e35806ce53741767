"""Integer dot products (q4 / q8 weights x int8-quantized activations): the compiled kernels equal the
exact NumPy reference (pipower.intdot) bit for bit, the reference's fma is exact, and the integer path
stays within its error bound of the float path."""
from fractions import Fraction

import numpy as np
import pytest

from pipower import _cpu, intdot
from pipower.errors import InvalidArgumentError
from pipower.quant import dequantize, quantize

from helpers_kernels import INT_SIMD

needs_ext = pytest.mark.skipif(not _cpu.AVAILABLE, reason="compiled kernels not built")
SIMD = INT_SIMD   # True (default kernel), False (portable C), and each vector kernel this machine runs


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def exact_fma32(a: float, b: float, c: float) -> np.float32:
    """float32(a * b + c) rounded once, with exact rationals."""
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    r = np.float32(float(exact))                  # nearest double, then nearest float32: may double-round
    cands = [r, np.nextafter(r, np.float32(np.inf)), np.nextafter(r, np.float32(-np.inf))]
    dist = [abs(Fraction(float(v)) - exact) for v in cands]
    best = min(dist)
    ties = [v for v, d in zip(cands, dist) if d == best]
    return min(ties, key=lambda v: int(np.float32(v).view(np.uint32)) & 1)   # ties to even mantissa


def test_fma32_is_the_correctly_rounded_fused_multiply_add():
    rng = np.random.default_rng(0)
    a = rng.integers(-40000, 40000, 3000).astype(np.float32)
    b = (rng.standard_normal(3000) * 10.0 ** rng.integers(-6, 2, 3000)).astype(np.float32)
    c = (rng.standard_normal(3000) * 10.0 ** rng.integers(-4, 4, 3000)).astype(np.float32)
    # a*b + c just below a float32 midpoint, by less than float64 resolves: a = 1 + 2^-23,
    # b = 2^-24 - 2^-47, c = 1 + 2^-23 give 1 + 3 * 2^-24 - 2^-70. Rounding p + c to float64 lands on the
    # midpoint and ties-to-even would pick 1 + 2^-22; the fma is c itself. Also negated.
    u = np.float32(1 + 2.0 ** -23)
    tb = np.float32(2.0 ** -24 - 2.0 ** -47)
    a = np.concatenate([a, [u, -u]]).astype(np.float32)
    b = np.concatenate([b, [tb, tb]]).astype(np.float32)
    c = np.concatenate([c, [u, -u]]).astype(np.float32)
    got = intdot.fma32(a, b, c)
    want = np.array([exact_fma32(x, y, z) for x, y, z in zip(a, b, c)], dtype=np.float32)
    assert np.array_equal(bits(got), bits(want))
    assert got[-2] == u and got[-1] == -u
    assert np.float32(np.float64(a[-2]) * np.float64(b[-2]) + np.float64(c[-2])) != u   # the trap is real


def arranged(q: np.ndarray, fmt: str = "q4") -> np.ndarray:
    """Reference int8 [T, K] -> the kernel's layout: for q4 per 4 blocks the low halves then the high
    halves, for q8 element order; padded with zero blocks to a multiple of 16."""
    T, K = q.shape
    nb = K // 32
    nbp = (nb + 15) // 16 * 16
    out = np.zeros((T, nbp * 32), np.int8)
    if fmt == "q8":
        out[:, :K] = q
        return out
    for b in range(nb):
        for half in range(2):
            pos = (b // 4) * 128 + half * 64 + (b % 4) * 16
            out[:, pos:pos + 16] = q[:, b * 32 + 16 * half:b * 32 + 16 * half + 16]
    return out


@needs_ext
@pytest.mark.parametrize("fmt,factor", [("q4", 8), ("q8", 128)])
@pytest.mark.parametrize("simd", SIMD)
def test_activation_quantization_matches_the_reference(fmt, factor, simd):
    from pipower._cpu._linear import QuantizedActivations
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 576)) * rng.uniform(0.01, 100, (5, 1))).astype(np.float32)
    x[1, 32:64] = 0.0                               # an all-zero block: dx = 0, q = 0
    x[2, 5] = 1e-39                                 # a subnormal
    x[3, 64:96] = np.arange(32) * 0.5 - 8           # exact ties at x * id: rounded to even
    x[3, 95] = 127.0 / 8                            # (amax 127/8 makes id = 8, every x * id exact)
    q, dx = intdot.quantize_activations(x)
    kq, kd, kc = QuantizedActivations(x, fmt, simd=simd).arrays()
    nb = 576 // 32
    assert np.array_equal(kq, arranged(q, fmt))
    assert np.array_equal(bits(kd[:, :nb]), bits(dx)) and not kd[:, nb:].any()
    assert np.array_equal(kc[:, :nb], factor * q.reshape(5, nb, 32).astype(np.int32).sum(-1))
    assert np.abs(q).max() <= 127 and q.dtype == np.int8


@needs_ext
@pytest.mark.parametrize("simd", SIMD)
def test_activation_quantization_of_non_finite_blocks_is_the_scalar_one(simd):
    """A block with NaN / inf takes the scalar code (q = 0, dx = its amax) whatever the vector kernel;
    the blocks around it are still quantized normally."""
    from pipower._cpu._linear import QuantizedActivations
    x = np.random.default_rng(5).standard_normal((3, 160)).astype(np.float32)
    x[0, 40], x[1, 100], x[2, 7], x[2, 8] = np.nan, -np.inf, np.inf, np.nan
    for fmt in ("q4", "q8"):
        got = QuantizedActivations(x, fmt, simd=simd).arrays()
        want = QuantizedActivations(x, fmt, simd=False).arrays()
        for g, w in zip(got, want):
            assert np.array_equal(g.view(np.uint8), w.view(np.uint8))
    q, dx = intdot.quantize_activations(x)
    assert np.isnan(dx[0, 1]) and dx[1, 3] == np.inf and np.isnan(dx[2, 0]) and not q[0, 32:64].any()


@needs_ext
@pytest.mark.parametrize("simd", SIMD)
def test_activation_quantization_in_groups_of_16_blocks_is_the_scalar_one(simd):
    """K = 1056 (33 blocks: two groups of 16 quantized together on AVX-512, then one block alone), with
    NaN / inf blocks inside the groups, zero and subnormal blocks, and scales from 1e-30 to 1e30: every
    byte is the portable scalar code's."""
    from pipower._cpu._linear import QuantizedActivations
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((6, 1056)) * 10.0 ** rng.integers(-30, 31, (6, 33)).repeat(32, 1)).astype(np.float32)
    x[0, 0], x[0, 15 * 32 + 3], x[1, 17 * 32], x[2, 32 * 32 + 31] = np.nan, np.inf, -np.inf, np.nan
    x[3, 5 * 32:6 * 32] = 0.0
    x[4, 20 * 32:21 * 32] = 1e-40
    x[5] = np.arange(1056, dtype=np.float32) * 0.5 - 100.0        # exact ties at x * id for some blocks
    for fmt in ("q4", "q8"):
        got = QuantizedActivations(x, fmt, simd=simd).arrays()
        want = QuantizedActivations(x, fmt, simd=False).arrays()
        for g, w in zip(got, want):
            assert np.array_equal(g.view(np.uint8), w.view(np.uint8))
    q, dx = intdot.quantize_activations(x[3:])
    kq, kd, kc = QuantizedActivations(x[3:], "q8", simd=simd).arrays()
    assert np.array_equal(kq[:, :1056], q) and np.array_equal(bits(kd[:, :33]), bits(dx))


@needs_ext
def test_kernel_names_are_checked():
    from pipower._cpu import _linear
    names, default = _linear.integer_kernels()
    assert names[0] == "c" and default == names[-1]            # no PIPOWER_INT_ISA in the test run
    m = quantize(np.ones((4, 32), np.float32), "q8")
    x = np.ones((1, 32), np.float32)
    with pytest.raises(InvalidArgumentError, match="one of"):
        _linear.gemm_int8("q8", m.data, m.scales, x, simd="sse9")
    for missing in set(_linear.INT_ISAS) - set(names):
        with pytest.raises(InvalidArgumentError, match="no .* integer-dot kernel"):
            _linear.gemm_int8("q8", m.data, m.scales, x, simd=missing)


@needs_ext
def test_PIPOWER_INT_ISA_picks_the_default_kernel_or_fails_clearly():
    import os
    import subprocess
    import sys
    from pathlib import Path
    code = "from pipower._cpu import _linear; print(_linear.integer_kernels()[1])"
    env = {**os.environ, "PYTHONPATH": str(Path(intdot.__file__).parents[1])}   # this tree's pipower
    env["PIPOWER_INT_ISA"] = "c"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "c"
    env["PIPOWER_INT_ISA"] = "avx9000"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "PIPOWER_INT_ISA='avx9000'" in out.stderr


@needs_ext
@pytest.mark.parametrize("fmt", ("q4", "q8"))
@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("K", (32, 96, 512, 576, 896, 1056))
def test_integer_gemm_is_bitwise_the_reference(fmt, simd, K):
    from pipower._cpu import _linear
    rng = np.random.default_rng(K)
    m = quantize(rng.standard_normal((40, K)).astype(np.float32), fmt)
    x = rng.standard_normal((33, K)).astype(np.float32)
    ref = intdot.dot(m, x)
    for nt in (1, 2):
        for T in (1, 2, 3, 8, 9, 17, 33):
            y = _linear.gemm_int8(fmt, m.data, m.scales, x[:T], n_threads=nt, simd=simd)
            assert np.array_equal(bits(y), bits(ref[:T])), (nt, T)


@needs_ext
@pytest.mark.parametrize("fmt", ("q4", "q8"))
def test_non_finite_activations_propagate(fmt):
    from pipower._cpu import _linear
    m = quantize(np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32), fmt)
    x = np.ones((2, 64), np.float32)
    x[0, 3] = np.inf
    x[1, 40] = np.nan
    for simd in SIMD:
        y = _linear.gemm_int8(fmt, m.data, m.scales, x, simd=simd)
        assert np.isnan(y).all()
    assert np.isnan(intdot.dot(m, x)).all()


@pytest.mark.parametrize("fmt", ("q4", "q8"))
def test_integer_path_within_its_error_bound_of_the_float_path(fmt):
    """|int - float| <= sum over blocks of (dx_b / 2) * ||w_b||_1 plus float rounding: the only change
    is each activation's rounding to its block's int8 grid."""
    rng = np.random.default_rng(3)
    K = 896
    m = quantize(rng.standard_normal((64, K)).astype(np.float32), fmt)
    x = (rng.standard_normal((6, K)) * rng.uniform(0.1, 10, (6, 1))).astype(np.float32)
    w = dequantize(m).astype(np.float64)
    ref = x.astype(np.float64) @ w.T
    _, dx = intdot.quantize_activations(x)
    l1 = np.abs(w).reshape(64, K // 32, 32).sum(-1)                  # [N, nb]
    bound = (dx.astype(np.float64) / 2) @ l1.T                         # [T, N]
    err = np.abs(intdot.dot(m, x) - ref)
    assert np.all(err <= bound * 1.0001 + 1e-5 * np.abs(ref).max())
    assert err.max() > 0                                             # the paths really differ


@needs_ext
@pytest.mark.parametrize("fmt", ("q4", "q8"))
@pytest.mark.parametrize("simd", SIMD)
def test_integer_ffn_rows_are_bitwise_single_tokens(fmt, simd):
    from pipower._cpu import _ffn
    rng = np.random.default_rng(4)
    D, F = 96, 200
    mats = []
    for _ in range(3):
        q = quantize((0.2 * rng.standard_normal((F, D))).astype(np.float32), fmt)
        mats.append((q.data, q.scales))
    x = rng.standard_normal((20, D)).astype(np.float32)
    idx = np.sort(rng.choice(F, 50, replace=False)).astype(np.int32)
    for sel in (None, idx):
        for nt in (1, 2):
            single = np.stack([_ffn.ffn_sparse(fmt, r, mats[0], mats[1], mats[2], sel, "silu", n_threads=nt,
                                               simd=simd, int_dot=True) for r in x])
            for T in (2, 7, 20):
                out = _ffn.ffn_sparse(fmt, x[:T], mats[0], mats[1], mats[2], sel, "silu", n_threads=nt,
                                      simd=simd, int_dot=True)
                assert np.array_equal(bits(out), bits(single[:T]))


@needs_ext
@pytest.mark.parametrize("fmt", ("q4", "q8"))
def test_integer_ffn_close_to_the_numpy_reference(fmt):
    """Gate/up are bitwise the reference's; the down sums differ only in float summation order."""
    from pipower._cpu import linear_ops
    from pipower.ops import NumpyOps
    rng = np.random.default_rng(5)
    D, F = 64, 160
    g, u, d = (quantize((0.2 * rng.standard_normal((F, D))).astype(np.float32), fmt) for _ in range(3))
    x = rng.standard_normal((9, D)).astype(np.float32)
    mask = rng.random((9, F)) < 0.4
    ref_ops = NumpyOps(dot="int8")
    for sel in (None, np.sort(rng.choice(F, 40, replace=False)).astype(np.int32), mask):
        got = linear_ops.ffn(x, g, u, d, "silu", 2, sel, int_dot=True)
        ref = ref_ops.ffn(x, g, u, d, "silu", sel)
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_dot_option_is_validated():
    from pipower.api import check_dot
    from pipower.errors import InvalidArgumentError
    from pipower.ops import NumpyOps
    assert check_dot(None, "q4") == "int8" and check_dot(None, "q8") == "int8" and check_dot(None, "f16") == "float"
    assert check_dot(None, "q4", device="hybrid") == "float"
    assert check_dot("float", "q4") == "float"
    assert check_dot("int8", "q8") == "int8"
    with pytest.raises(InvalidArgumentError, match="q4, q8 and q4m"):
        check_dot("int8", "f16")
    assert check_dot(None, "q4m") == "int8"
    with pytest.raises(InvalidArgumentError, match="integer dots only"):
        check_dot("float", "q4m")
    with pytest.raises(InvalidArgumentError, match="CPU engine only"):
        check_dot(None, "q4m", device="hybrid")
    with pytest.raises(InvalidArgumentError, match="CPU"):
        check_dot("int8", "q4", device="gpu")
    with pytest.raises(InvalidArgumentError, match="dot must be"):
        NumpyOps(dot="int4")
