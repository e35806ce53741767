"""Every op of the ops interface on every backend against the NumPy reference (as llama.cpp's
test-backend-ops): one set of inputs, one reference (NumpyOps) and one tolerance per op.

Backends (the `backend` fixture of conftest.py): numpy (the reference itself: checks the harness and the
argument checks), cython (the compiled CPU kernels), cupy-emu (CupyOps with its .cu kernels emulated on
the CPU) and cupy (a real GPU, `pytest -m gpu`). A backend skips the weight formats and dot modes it does
not have (the GPU: no q4, no int8 dot). Inputs reach a backend as its ops take them: weights through
ops.place, activations through ops.to_device on device backends; results come back through ops.to_host.

Tolerances: every backend computes on exactly the values the reference dequantizes (f16 -> f32 is exact,
q8's q * d and q4's (n - 8) * d are exact in float32; the int8 dot is exact integer sums), so a
difference is float32 summation order (SIMD lanes, warp shuffles, split-K partial sums, BLAS / cuBLAS
blocking) or the math library inside an activation. Errors are measured against the largest output
(atol = rtol * max|ref|), since a dot product's rounding scales with its terms, not with its (possibly
cancelled) result: rtol 1e-5 for f32 (BLAS vs BLAS at K <= 300: ~sqrt(K) * 6e-8), 1e-4 for the compact
formats, whose paths run the kernels' own reductions (other order, longer rows).
Kernel-specific properties (bitwise batch and thread invariance, kernel argument checks, the emulator's
launch checks, device memory) stay with their kernels: tests/test_cpu_*.py, test_gpu_ops.py.
"""
import re
from pathlib import Path

import numpy as np
import pytest

import pipower
from pipower.errors import BackendError, InvalidArgumentError, PipowerError
from pipower.ops import ACT_CODES, ACTIVATIONS, NumpyOps, Threshold
from pipower.quant import ROW_FORMATS as FORMATS, quantize
from pipower import _cpu

RTOL = {"f32": 1e-5, "f16": 1e-4, "q8": 1e-4, "q4": 1e-4}
TILE_T = 11                  # two token tiles of the device kernels (TOK_TILE = 8)
LONG_T = 70                  # above 64 tokens: the CPU's float prefill paths, the device's cuBLAS paths
TOKENS = (1, 3, TILE_T, LONG_T)
ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
REF = {dot: NumpyOps(1, dot) for dot in ("float", "int8")}


def rng(seed):
    return np.random.default_rng(seed)


def randn(r, *shape, scale=1.0):
    return (r.standard_normal(shape) * scale).astype(np.float32)


def weight(r, shape, fmt, scale=0.3):
    return quantize(randn(r, *shape, scale=scale), fmt)


def dev(ops, a):
    """A host array as `ops` takes an activation or index array: on the device for device backends (a
    Threshold is not an array: it goes as it is)."""
    if a is None or isinstance(a, Threshold) or not hasattr(ops, "to_device"):
        return a
    return ops.to_device(a)


def close(got, want, rtol):
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == np.float32, (got.shape, got.dtype, want.shape)
    scale = float(np.abs(want).max()) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(scale, 1e-30))


# -- the activation table: one source (pipower.ops), the rest derived or checked ---------------------------
def test_activation_table_is_one_source():
    from pipower import config
    from pipower._gpu import SOURCE_DIR
    assert config.SUPPORTED_ACTIVATIONS == tuple(ACTIVATIONS) and set(ACT_CODES) == set(ACTIVATIONS)
    # the kernels' own numbering: #define ACT_* in ffn.cu, enum PP_ACT_* in _ffn_impl.h (its module checks
    # the enum against ACT_CODES when it imports)
    cu = dict(re.findall(r"#define ACT_(\w+) (-?\d+)", (SOURCE_DIR / "ffn.cu").read_text()))
    h = dict(re.findall(r"PP_ACT_(\w+) = (\d+)", (Path(pipower.__file__).parent / "_cpu/_ffn_impl.h").read_text()))
    for name, kernel in (("silu", "SILU"), ("gelu", "GELU"), ("gelu_pytorch_tanh", "GELU_TANH"),
                         ("gelu_new", "GELU_TANH"), ("relu", "RELU")):
        assert ACT_CODES[name] == int(cu[kernel]) == int(h[kernel]), name


# -- norms, activations ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 96), (3, 33), (2, 300), (2, 3, 64)])
def test_rms_norm(backend, shape):
    ops, r = backend.ops(), rng(1)
    x, w = randn(r, *shape), randn(r, shape[-1])
    close(ops.to_host(ops.rms_norm(dev(ops, x), ops.place(w), 1e-5)), REF["float"].rms_norm(x, w, 1e-5), 1e-5)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation(backend, name):
    ops = backend.ops()
    x = randn(rng(2), 3, 77, scale=4.0)
    got = ops.to_host(ops.activation(name, dev(ops, x)))
    np.testing.assert_allclose(got, REF["float"].activation(name, x), rtol=1e-5, atol=1e-6)


# -- projections ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, dot", [(f, "float") for f in FORMATS] + [("q8", "int8"), ("q4", "int8")])
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("bias", [False, True])
def test_linear(backend, fmt, dot, T, bias):
    ops, r = backend.ops(dot, fmt), rng(3)
    W = weight(r, (37, 96), fmt)
    x, b = randn(r, T, 96), (randn(r, 37) if bias else None)
    got = ops.to_host(ops.linear(dev(ops, x), ops.place(W), None if b is None else ops.place(b)))
    close(got, REF[dot].linear(x, W, b), RTOL[fmt])


@pytest.mark.parametrize("fmt", ["f32", "f16"])
@pytest.mark.parametrize("K", [33, 70])
@pytest.mark.parametrize("T", [1, TILE_T])
def test_linear_odd_k(backend, fmt, K, T):
    ops, r = backend.ops(fmt=fmt), rng(4)
    W, x = weight(r, (5, K), fmt), randn(r, T, K)
    close(ops.to_host(ops.linear(dev(ops, x), ops.place(W))), REF["float"].linear(x, W), RTOL[fmt])


def test_linear_plain_arrays_and_strided_input(backend):
    """A plain float32 array is an f32 matrix (the same bits); a strided x is taken (copied if need be)."""
    ops, r = backend.ops(), rng(5)
    W, xs = randn(r, 9, 64), randn(r, 2, 128)
    x = dev(ops, xs)[:, ::2]
    got = ops.to_host(ops.linear(x, ops.place(W)))
    np.testing.assert_array_equal(got, ops.to_host(ops.linear(x, ops.place(quantize(W, "f32")))))
    close(got, REF["float"].linear(xs[:, ::2], W), 1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_embed(backend, fmt):
    ops = backend.ops(fmt=fmt)
    table = weight(rng(6), (50, 64), fmt)
    ids = np.array([3, 0, 49, 3], np.int32)
    got = ops.to_host(ops.embed(ops.place(table), dev(ops, ids)))
    np.testing.assert_array_equal(got, REF["float"].embed(table, ids))     # a copy of exact values


# -- FFN ------------------------------------------------------------------------------------------------
def ffn_weights(r, F, D, fmt):
    return tuple(weight(r, (F, D), fmt) for _ in range(3))


def run_ffn(ops, x, g, u, d, act, idx=None, gated=True):
    pg, pu, pd = (ops.place(w) for w in (g, u, d))
    return ops.to_host(ops.ffn(dev(ops, x), pg if gated else None, pu, pd, act, dev(ops, idx)))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gated", [True, False])
def test_ffn_dense(backend, fmt, T, act, gated):
    ops, r = backend.ops(fmt=fmt), rng(7)
    g, u, d = ffn_weights(r, 45, 96, fmt)
    x = randn(r, T, 96)
    close(run_ffn(ops, x, g, u, d, act, gated=gated), REF["float"].ffn(x, g if gated else None, u, d, act),
          RTOL[fmt])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("n", [0, 1, 17, 299, 300])
def test_ffn_idx_subsets(backend, fmt, T, n):
    ops, r = backend.ops(fmt=fmt), rng(8)
    g, u, d = ffn_weights(r, 300, 64, fmt)
    x = randn(r, T, 64)
    idx = np.sort(r.choice(300, n, replace=False)).astype(np.int32)
    close(run_ffn(ops, x, g, u, d, "silu", idx), REF["float"].ffn(x, g, u, d, "silu", idx), RTOL[fmt])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", TOKENS)
def test_ffn_per_token_mask(backend, fmt, T):
    ops, r = backend.ops(fmt=fmt), rng(11)
    g, u, d = ffn_weights(r, 60, 64, fmt)
    x, mask = randn(r, T, 64), r.random((T, 60)) < 0.3
    close(run_ffn(ops, x, g, u, d, "relu", mask), REF["float"].ffn(x, g, u, d, "relu", mask), RTOL[fmt])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("F, D", [(1, 32), (1, 33), (7, 70), (40, 288)])
def test_ffn_odd_sizes(backend, fmt, F, D):
    if fmt in ("q8", "q4") and D % 32:
        pytest.skip("q8 / q4 need D % 32 == 0")
    ops, r = backend.ops(fmt=fmt), rng(10)
    g, u, d = ffn_weights(r, F, D, fmt)
    for T in (1, 2):
        x = randn(r, T, D)
        close(run_ffn(ops, x, g, u, d, "gelu"), REF["float"].ffn(x, g, u, d, "gelu"), RTOL[fmt])


@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("sel", ["all", "subset", "mask"])
@pytest.mark.parametrize("T", [1, 9, LONG_T])
def test_ffn_int8_dot(backend, fmt, sel, T):
    """q4 / q8 gate and up dots over int8-quantized x: exact integer sums, as pipower.intdot."""
    ops, r = backend.ops("int8", fmt), rng(12)
    g, u, d = ffn_weights(r, 160, 64, fmt)
    x = randn(r, T, 64)
    idx = {"all": None, "subset": np.sort(r.choice(160, 40, replace=False)).astype(np.int32),
           "mask": r.random((T, 160)) < 0.4}[sel]
    close(run_ffn(ops, x, g, u, d, "silu", idx), REF["int8"].ffn(x, g, u, d, "silu", idx), RTOL[fmt])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("gated", [True, False])
def test_ffn_threshold(backend, fmt, gated):
    """idx = Threshold (one token, selection inside the FFN) on the ops that fuse it: the reference's
    selection and output, and the count reported."""
    ops, r = backend.ops(fmt=fmt), rng(13)
    if not ops.fused_threshold:
        pytest.skip(f"{backend.name} takes no Threshold (fused_threshold is False)")
    g, u, d = ffn_weights(r, 200, 64, fmt)
    x = randn(r, 1, 64)
    pre = np.sort(np.abs(REF["float"].activation("silu", REF["float"].linear(x, g if gated else u)))[0])
    gap = int(np.argmax(np.diff(pre[50:150]))) + 50             # tau in a wide gap: no near-ties
    tau = float((pre[gap] + pre[gap + 1]) / 2)
    got_n, want_n = [], []
    got = run_ffn(ops, x, g, u, d, "silu", Threshold(tau, lambda n, total: got_n.append((n, total))), gated)
    want = REF["float"].ffn(x, g if gated else None, u, d, "silu",
                            Threshold(tau, lambda n, total: want_n.append((n, total))))
    assert got_n == want_n == [(199 - gap, 200)]
    close(got, want, RTOL[fmt])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dot", ["float", "int8"])
@pytest.mark.parametrize("act, gated, D", [("silu", True, 64), ("gelu", True, 96), ("relu", False, 64),
                                           ("silu", True, 33)])
def test_ffn_threshold_is_the_unfused_path_bitwise(backend, fmt, dot, act, gated, D):
    """The fused threshold FFN selects exactly what the same backend's gate linear + activation select
    (|act| > tau) and returns bitwise what its ffn returns for those neuron ids: fusing changes which
    rows are read, never a value."""
    if fmt in ("q8", "q4") and D % 32:
        pytest.skip("q8 / q4 need D % 32 == 0")
    ops, r = backend.ops(dot, fmt), rng(14)
    if not ops.fused_threshold:
        pytest.skip(f"{backend.name} takes no Threshold (fused_threshold is False)")
    g, u, d = ffn_weights(r, 300, D, fmt)
    pg, pu, pd = (ops.place(w) for w in (g, u, d))
    x = dev(ops, randn(r, 1, D))
    pre = np.abs(ops.to_host(ops.activation(act, ops.linear(x, pg if gated else pu))))[0]      # [F]
    for q in (0.0, 0.3, 0.7, 1.0):
        tau = float(np.quantile(pre, q)) if q < 1.0 else float(pre.max())
        want_idx = np.flatnonzero(pre > np.float32(tau)).astype(np.int32)
        counts = []
        got = ops.to_host(ops.ffn(x, pg if gated else None, pu, pd, act,
                                  Threshold(tau, lambda n, total: counts.append((n, total)))))
        assert counts == [(want_idx.size, 300)]
        want = ops.to_host(ops.ffn(x, pg if gated else None, pu, pd, act, dev(ops, want_idx)))
        np.testing.assert_array_equal(got, want)


# -- attention ------------------------------------------------------------------------------------------
def cache_views(ops, r, Hkv, S, hd, cap):
    """k, v as the engine holds them: [Hkv, S, hd] views of a [2 layers, Hkv, cap, hd] buffer (-> the host
    views too)."""
    kb, vb = randn(r, 2, Hkv, cap, hd), randn(r, 2, Hkv, cap, hd)
    return kb[1, :, :S], vb[1, :, :S], dev(ops, kb)[1, :, :S], dev(ops, vb)[1, :, :S]


@pytest.mark.parametrize("T, nh, hd", [(1, 4, 64), (3, 2, 6), (2, 5, 128)])
def test_rope(backend, T, nh, hd):
    ops, r = backend.ops(), rng(15)
    x, c, s = randn(r, T, nh, hd), randn(r, T, hd // 2), randn(r, T, hd // 2)
    got = ops.to_host(ops.rope(*(dev(ops, a) for a in (x, c, s))))
    close(got, REF["float"].rope(x, c, s), 1e-6)          # rounded multiplies, or one fma


@pytest.mark.parametrize("H, Hkv, hd", [(4, 2, 64), (8, 1, 128), (2, 2, 256), (3, 3, 40)])
@pytest.mark.parametrize("S", [1, 5, 300])
@pytest.mark.parametrize("window", [None, 4, 1000])
def test_attention_decode(backend, H, Hkv, hd, S, window):
    ops, r = backend.ops(), rng(16)
    k, v, kd, vd = cache_views(ops, r, Hkv, S, hd, cap=S + 9)
    q = randn(r, 1, H, hd)
    got = ops.to_host(ops.attention(dev(ops, q), kd, vd, S - 1, window))
    close(got, REF["float"].attention(q, k, v, S - 1, window), 1e-5)


@pytest.mark.parametrize("H, Hkv, hd", [(4, 2, 64), (3, 1, 32)])
@pytest.mark.parametrize("T, start", [(2, 0), (5, 7), (1, 3), (LONG_T, 3)])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_prefill_and_general(backend, H, Hkv, hd, T, start, window):
    """T > 1 (prefill), and T == 1 with S != start + 1 (keys past the query: the reference's rules)."""
    ops, r = backend.ops(), rng(17)
    S = start + T + (4 if T == 1 else 0)
    k, v, kd, vd = cache_views(ops, r, Hkv, S, hd, cap=S + 3)
    q = randn(r, T, H, hd)
    got = ops.to_host(ops.attention(dev(ops, q), kd, vd, start, window))
    close(got, REF["float"].attention(q, k, v, start, window), 1e-5)


# -- bad arguments: InvalidArgumentError (a PipowerError) from every backend ------------------------------
def _bad_calls(ops, r):
    D, F = 64, 20
    x = dev(ops, randn(r, 1, D))
    g, u, d = (ops.place(w) for w in ffn_weights(r, F, D, "f16"))
    q, kv = dev(ops, randn(r, 1, 3, 16)), dev(ops, randn(r, 2, 4, 16))
    return {
        "activation name": lambda: ops.activation("tanh", x),
        "ffn activation name": lambda: ops.ffn(x, g, u, d, "tanh"),
        "ffn idx unsorted": lambda: ops.ffn(x, g, u, d, "silu", dev(ops, np.array([3, 2], np.int32))),
        "ffn idx out of range": lambda: ops.ffn(x, g, u, d, "silu", dev(ops, np.array([0, F], np.int32))),
        "ffn mask shape": lambda: ops.ffn(x, g, u, d, "silu", dev(ops, np.ones((2, F), bool))),
        "linear K": lambda: ops.linear(dev(ops, randn(r, 2, D + 1)), u),
        "embed id": lambda: ops.embed(u, dev(ops, np.array([F], np.int32))),
        "rms_norm weight": lambda: ops.rms_norm(x, ops.place(randn(r, D + 1)), 1e-6),
        "rope odd head dim": lambda: ops.rope(dev(ops, randn(r, 1, 2, 7)), *(dev(ops, randn(r, 1, 3)),) * 2),
        "attention heads": lambda: ops.attention(q, kv, kv, 3),
    }


@pytest.mark.parametrize("case", sorted(_bad_calls(NumpyOps(), rng(0))))
def test_bad_arguments_raise_invalid_argument_error(backend, case):
    ops = backend.ops(fmt="f16")
    with pytest.raises(InvalidArgumentError) as info:
        _bad_calls(ops, rng(18))[case]()
    assert isinstance(info.value, PipowerError)


# -- model-sized shapes: the real GPU only (split-K partials over many SMs; the emulator would take minutes) --
@pytest.fixture
def gpu_ops(backend):
    if backend.name != "cupy":
        pytest.skip("model-sized shapes run on the real GPU only")
    return backend.ops()


@pytest.mark.parametrize("fmt", ["f16", "q8"])
def test_ffn_model_sized(gpu_ops, fmt):
    ops, r = gpu_ops, rng(19)
    g, u, d = ffn_weights(r, 5632, 2048, fmt)                         # TinyLlama's FFN
    for T in (1, 4, 16):
        x = randn(r, T, 2048)
        idx = np.sort(r.choice(5632, 5632 // 5, replace=False)).astype(np.int32)
        close(run_ffn(ops, x, g, u, d, "silu", idx), REF["float"].ffn(x, g, u, d, "silu", idx), RTOL[fmt])
    x = randn(r, 1, 2048)
    close(run_ffn(ops, x, g, u, d, "silu"), REF["float"].ffn(x, g, u, d, "silu"), RTOL[fmt])


@pytest.mark.parametrize("fmt", ["f16", "q8"])
def test_linear_model_sized(gpu_ops, fmt):
    ops, r = gpu_ops, rng(20)
    W = weight(r, (6000, 2048), fmt, scale=0.05)
    for T in (1, 4, 33):
        x = randn(r, T, 2048)
        close(ops.to_host(ops.linear(dev(ops, x), ops.place(W))), REF["float"].linear(x, W), RTOL[fmt])


def test_attention_model_sized(gpu_ops):
    ops, r = gpu_ops, rng(21)
    H, Hkv, hd, S = 32, 8, 128, 4000
    k, v, kd, vd = cache_views(ops, r, Hkv, S, hd, cap=4096)
    q = randn(r, 1, H, hd)
    for window in (None, 1024):
        got = ops.to_host(ops.attention(dev(ops, q), kd, vd, S - 1, window))
        close(got, REF["float"].attention(q, k, v, S - 1, window), 1e-5)
    q = randn(r, 64, H, hd)
    got = ops.to_host(ops.attention(dev(ops, q), kd, vd, S - 64, None))
    close(got, REF["float"].attention(q, k, v, S - 64, None), 1e-5)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh", "relu"])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 40])
def test_multiply_by_activation_is_the_formula_bitwise(act, T):
    """ops.multiply_by_activation (the dense FFN's h *= act(g), SiLU in row blocks without temporaries)
    gives the bits of h * ACTIVATIONS[act](g) and leaves g alone."""
    from pipower.ops import ACTIVATIONS, multiply_by_activation
    r = np.random.default_rng(T)
    g = (r.standard_normal((T, 200)) * 6).astype(np.float32)
    g[0, :4] = [0.0, -0.0, 100.0, -100.0]
    h = r.standard_normal((T, 200)).astype(np.float32)
    want = h * ACTIVATIONS[act](g)
    g0 = g.copy()
    got = multiply_by_activation(h, g, act)
    assert got is h and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(g.view(np.uint32), g0.view(np.uint32))


needs_compiled = pytest.mark.skipif(not _cpu.AVAILABLE, reason="compiled kernels not built")


@needs_compiled
@pytest.mark.parametrize("shape", [(1, 200), (1, 4864), (8, 4864), (33, 1000), (5, 3)])
def test_compiled_silu_product_is_the_formula_bitwise(shape):
    """_kernels.silu_multiply (NumPy's exp loop called from C, L1-sized passes, threads over 4 K chunks
    from 16 K elements) gives multiply_by_activation's SiLU bits for every thread count, special values
    included, and leaves g alone."""
    from pipower._cpu import _kernels
    from pipower.ops import multiply_by_activation
    assert _kernels.SILU_UNAVAILABLE == ""                       # NumPy's loop was found and checked
    r = np.random.default_rng(shape[0])
    g = (r.standard_normal(shape) * 12).astype(np.float32)
    g.flat[:min(g.size, 9)] = [0.0, -0.0, 100.0, -100.0, 88.8, -88.8, np.inf, -np.inf, np.nan][:min(g.size, 9)]
    h = r.standard_normal(shape).astype(np.float32)
    with np.errstate(all="ignore"):
        want = multiply_by_activation(h.copy(), g, "silu")
    g0 = g.copy()
    for nt in (1, 2, 3):
        got = h.copy()
        assert _kernels.silu_multiply(got, g, nt) is got
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), nt
    assert np.array_equal(g.view(np.uint32), g0.view(np.uint32))


@needs_compiled
def test_compiled_silu_product_checks_its_arrays():
    from pipower._cpu import _kernels
    h = np.zeros((2, 64), np.float32)
    with pytest.raises(InvalidArgumentError, match="one shape"):
        _kernels.silu_multiply(h, np.zeros((2, 32), np.float32))
    with pytest.raises(InvalidArgumentError, match="C-contiguous float32"):
        _kernels.silu_multiply(h, np.zeros((2, 64), np.float64))
    with pytest.raises(InvalidArgumentError, match="C-contiguous float32"):
        _kernels.silu_multiply(np.zeros((64, 2), np.float32).T, np.zeros((2, 64), np.float32))
    ro = np.zeros((2, 64), np.float32)
    ro.flags.writeable = False
    with pytest.raises(InvalidArgumentError, match="writeable"):
        _kernels.silu_multiply(ro, np.zeros((2, 64), np.float32))


@needs_compiled
def test_dense_ffn_silu_without_the_compiled_pass_says_so_and_keeps_the_bits(monkeypatch, caplog):
    """When NumPy's exp loop failed its import-time check, linear_ops.multiply_activation runs NumPy's
    formula (the same bits) and logs why, once."""
    from pipower._cpu import _kernels, linear_ops
    r = np.random.default_rng(4)
    g = r.standard_normal((3, 96)).astype(np.float32)
    h = r.standard_normal((3, 96)).astype(np.float32)
    fast = linear_ops.multiply_activation(h.copy(), g, "silu", 2)
    monkeypatch.setattr(_kernels, "SILU_UNAVAILABLE", "a test's reason")
    monkeypatch.setattr(linear_ops, "_SILU_SAID", [])
    with caplog.at_level("WARNING", logger="pipower._cpu.linear_ops"):
        slow = linear_ops.multiply_activation(h.copy(), g, "silu", 2)
        linear_ops.multiply_activation(h.copy(), g, "silu", 2)
    assert np.array_equal(fast.view(np.uint32), slow.view(np.uint32))
    assert [rec.getMessage().count("a test's reason") for rec in caplog.records] == [1]
    with pytest.raises(BackendError, match="a test's reason"):
        _kernels.silu_multiply(h, g)
