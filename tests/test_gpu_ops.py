"""CupyOps (pipower._gpu.ops, the GPU device backend) against the NumPy reference, NumpyOps.

Every op test runs on two backends (the `backend` fixture):
  gpu  @pytest.mark.gpu: real CuPy on a CUDA device; skipped when pipower._gpu.available() is False.
       `pytest -m gpu tests/test_gpu_ops.py` runs only these (bench/gpu_check.sh does, on a GPU machine).
  emu  no GPU needed: the same CupyOps code over pipower._gpu.emulator, i.e. the .cu kernels compiled
       for the host (fibers as CUDA threads, so shuffles and barriers behave) and a NumPy stand-in for
       CuPy. It checks kernel logic and every launch (argument C types, pointer dtypes, grids, aligned
       vector loads, out-of-bounds writes), not speed nor the device's math library; skipped without g++.
Plus checks that need neither: importing the GPU modules does not import CuPy, kernels.KERNELS matches
the kernels defined in the sources, and (when CuPy's NVRTC loads) every source compiles with NVRTC.

Tolerances: the device computes on exactly the values the reference dequantizes (f16 -> f32 is exact,
q8's q * d is exact in float32), so every difference is float32 summation order (warp-shuffle trees,
split-K partial sums, cuBLAS blocking vs NumPy's BLAS). Errors are measured against the largest output
(atol = rtol * max|ref|), since a dot product's rounding scales with its terms, not with its (possibly
cancelled) result. rtol 1e-5 for f32 (cuBLAS vs BLAS at K <= 300: ~sqrt(K) * 6e-8 * the term spread);
1e-4 for f16 / q8, whose paths run our own kernels (other reduction order, erff/expf/tanhf of the
device's math library inside the activations) and may use longer rows.
"""
import gc
import re
import subprocess
import sys

import numpy as np
import pytest

from pipower import _gpu
from pipower._gpu import emulator, kernels
from pipower._gpu.ops import ACT_CODES, SMALL_T, CupyOps
from pipower.errors import InvalidArgumentError, UnsupportedModelError
from pipower.hybrid.device import DeviceMemoryError
from pipower.ops import ACTIVATIONS, NumpyOps
from pipower.quant import quantize

REF = NumpyOps(1)
FORMATS = ("f32", "f16", "q8")
RTOL = {"f32": 1e-5, "f16": 1e-4, "q8": 1e-4}
GPU_OK, GPU_WHY = _gpu.status()

BACKENDS = [
    pytest.param("emu", marks=pytest.mark.skipif(emulator.CXX is None, reason="no host C++ compiler")),
    pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(not GPU_OK, reason=f"no GPU: {GPU_WHY}")]),
]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "emu":
        monkeypatch.setitem(sys.modules, "cupy", emulator.FakeCupy())
        monkeypatch.setattr(_gpu, "_status", (True, None))
        monkeypatch.setattr(kernels, "get", emulator.get)
    return request.param


@pytest.fixture
def ops(backend):
    return CupyOps()


def rng(seed=0):
    return np.random.default_rng(seed)


def randn(r, *shape, scale=1.0):
    return (r.standard_normal(shape) * scale).astype(np.float32)


def assert_close(got, want, rtol):
    assert got.shape == want.shape and got.dtype == np.float32
    scale = float(np.abs(want).max()) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(scale, 1e-30))


def weight(r, shape, fmt, scale=0.3):
    return quantize(randn(r, *shape, scale=scale), fmt)


# -- no GPU, no emulator -------------------------------------------------------------------------------
def test_importing_gpu_modules_does_not_import_cupy():
    code = ("import sys, pipower, pipower._gpu, pipower._gpu.ops, pipower._gpu.kernels, pipower._gpu.emulator; "
            "bad = [m for m in sys.modules if m == 'cupy' or m.startswith('cupy.')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_kernel_list_matches_sources():
    found = {}
    for src in _gpu.cu_sources():
        for name in re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(', src.read_text()):
            assert name not in found, f"kernel {name} defined in {found.get(name)} and {src.name}"
            found[name] = src.name
    assert found == kernels.KERNELS


def test_activation_codes_cover_the_reference():
    assert set(ACT_CODES) == set(ACTIVATIONS)


def _nvrtc():
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:  # noqa: BLE001 - no CuPy, or no libnvrtc for it
        return None


@pytest.mark.parametrize("arch", ["90", "80"])
@pytest.mark.parametrize("src", _gpu.cu_sources(), ids=[p.name for p in _gpu.cu_sources()])
def test_nvrtc_compiles(src, arch):
    """The compiler CuPy really uses (NVRTC, with kernels.OPTIONS), not only nvcc."""
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("CuPy's NVRTC is not loadable here")
    prog = nvrtc.createProgram(kernels.source(src.name), src.name, [], [])    # headers inlined, as CuPy gets it
    try:
        try:
            nvrtc.compileProgram(prog, [*kernels.OPTIONS, f"-arch=compute_{arch}"])
        except nvrtc.NVRTCError:
            pytest.fail(f"NVRTC failed on {src.name}:\n{nvrtc.getProgramLog(prog)}")
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    finally:
        nvrtc.destroyProgram(prog)
    entries = set(re.findall(r"\.entry\s+(\w+)\(", ptx))
    assert entries == {k for k, f in kernels.KERNELS.items() if f == src.name}


# -- the emulator itself catches launch mistakes ---------------------------------------------------------
@pytest.mark.skipif(emulator.CXX is None, reason="no host C++ compiler")
def test_emulator_catches_launch_mistakes(monkeypatch):
    cp = emulator.FakeCupy()
    k = emulator.get("gemv_q8")
    x, wq, wd = cp.zeros((1, 64)), cp.zeros((2, 64), np.int8), cp.zeros((2, 2), np.float16)
    y = cp.empty((1, 2))
    k((1, 1), (256,), (x, wq, wd, y, np.int32(2), np.int32(64)))
    assert (np.asarray(y) == 0).all()
    with pytest.raises(emulator.EmulationError, match="numpy.int32"):
        k((1, 1), (256,), (x, wq, wd, y, 2, np.int32(64)))
    with pytest.raises(emulator.EmulationError, match="float32 array"):
        k((1, 1), (256,), (x, x, wd, y, np.int32(2), np.int32(64)))
    with pytest.raises(emulator.EmulationError, match="misaligned"):
        k((1, 1), (256,), (cp.zeros((1, 65))[:, 1:], wq, wd, y, np.int32(2), np.int32(64)))
    with pytest.raises(emulator.EmulationError, match="outside"):
        k((1, 1), (256,), (x, wq, wd, cp.empty((1, 1)), np.int32(2), np.int32(64)))


# -- norms, activations, projections -------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 96), (3, 33), (2, 300)])
def test_rms_norm(ops, shape):
    r = rng(1)
    x, w = randn(r, *shape), randn(r, shape[1])
    got = ops.to_host(ops.rms_norm(ops.to_device(x), ops.place(w), 1e-5))
    assert_close(got, REF.rms_norm(x, w, 1e-5), 1e-5)


@pytest.mark.parametrize("name", sorted(ACT_CODES))
def test_activation(ops, name):
    x = randn(rng(2), 3, 77, scale=4.0)
    got = ops.to_host(ops.activation(name, ops.to_device(x)))
    np.testing.assert_allclose(got, REF.activation(name, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 3, SMALL_T + 3])
@pytest.mark.parametrize("bias", [False, True])
def test_linear(ops, fmt, T, bias):
    r = rng(3)
    N, K = 37, 96
    W = weight(r, (N, K), fmt)
    x, b = randn(r, T, K), (randn(r, N) if bias else None)
    got = ops.to_host(ops.linear(ops.to_device(x), ops.place(W), None if b is None else ops.place(b)))
    assert_close(got, REF.linear(x, W, b), RTOL[fmt])


@pytest.mark.parametrize("fmt", ["f32", "f16"])
@pytest.mark.parametrize("K", [33, 70])
@pytest.mark.parametrize("T", [1, SMALL_T + 1])
def test_linear_odd_k(ops, fmt, K, T):
    r = rng(4)
    W, x = weight(r, (5, K), fmt), randn(r, T, K)
    assert_close(ops.to_host(ops.linear(ops.to_device(x), ops.place(W))), REF.linear(x, W), RTOL[fmt])


def test_linear_plain_arrays_and_strided_input(ops):
    r = rng(5)
    W, xs = randn(r, 9, 64), randn(r, 2, 128)
    xd = ops.to_device(xs)[:, ::2]                          # not contiguous: copied by the wrapper
    assert_close(ops.to_host(ops.linear(xd, ops.place(W))), REF.linear(xs[:, ::2], W), 1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_embed(ops, fmt):
    r = rng(6)
    table = weight(r, (50, 64), fmt)
    ids = np.array([3, 0, 49, 3], np.int32)
    got = ops.to_host(ops.embed(ops.place(table), ops.to_device(ids)))
    np.testing.assert_array_equal(got, REF.embed(table, ids))     # a copy of exact values
    with pytest.raises(InvalidArgumentError):
        ops.embed(ops.place(table), ops.to_device(np.array([50], np.int32)))


# -- FFN -----------------------------------------------------------------------------------------------
def _ffn_weights(r, F, D, fmt):
    return tuple(weight(r, (F, D), fmt) for _ in range(3))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 2, SMALL_T + 2])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh", "relu"])
@pytest.mark.parametrize("gated", [True, False])
def test_ffn_dense(ops, fmt, T, act, gated):
    r = rng(7)
    F, D = 45, 96
    g, u, d = _ffn_weights(r, F, D, fmt)
    x = randn(r, T, D)
    pg, pu, pd = (ops.place(w) for w in (g, u, d))
    got = ops.to_host(ops.ffn(ops.to_device(x), pg if gated else None, pu, pd, act))
    assert_close(got, REF.ffn(x, g if gated else None, u, d, act), RTOL[fmt])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 3, SMALL_T + 1])
@pytest.mark.parametrize("n", [0, 1, 17, 299, 300])
def test_ffn_idx_subsets(ops, fmt, T, n):
    r = rng(8)
    F, D = 300, 64
    g, u, d = _ffn_weights(r, F, D, fmt)
    x = randn(r, T, D)
    idx = np.sort(r.choice(F, n, replace=False)).astype(np.int32)
    got = ops.to_host(ops.ffn(ops.to_device(x), *(ops.place(w) for w in (g, u, d)), "silu", ops.to_device(idx)))
    assert_close(got, REF.ffn(x, g, u, d, "silu", idx), RTOL[fmt])


@pytest.mark.parametrize("fmt", ["f16", "q8"])
@pytest.mark.parametrize("T", [1, 3])
def test_ffn_all_neurons_listed_equals_dense(ops, fmt, T):
    """idx = every neuron takes the same kernels, in the same order, as idx = None: bit-identical."""
    r = rng(9)
    F, D = 130, 96
    w = [ops.place(m) for m in _ffn_weights(r, F, D, fmt)]
    x = ops.to_device(randn(r, T, D))
    dense = ops.to_host(ops.ffn(x, *w, "silu"))
    listed = ops.to_host(ops.ffn(x, *w, "silu", ops.to_device(np.arange(F, dtype=np.int32))))
    np.testing.assert_array_equal(listed, dense)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("F, D", [(1, 32), (1, 33), (7, 70), (40, 288)])
def test_ffn_odd_sizes(ops, fmt, F, D):
    if fmt == "q8" and D % 32:
        pytest.skip("q8 needs D % 32 == 0")
    r = rng(10)
    g, u, d = _ffn_weights(r, F, D, fmt)
    for T in (1, 2):
        x = randn(r, T, D)
        got = ops.to_host(ops.ffn(ops.to_device(x), *(ops.place(w) for w in (g, u, d)), "gelu"))
        assert_close(got, REF.ffn(x, g, u, d, "gelu"), RTOL[fmt])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 3, SMALL_T + 2])
def test_ffn_per_token_mask(ops, fmt, T):
    r = rng(11)
    F, D = 60, 64
    g, u, d = _ffn_weights(r, F, D, fmt)
    x, mask = randn(r, T, D), r.random((T, F)) < 0.3
    got = ops.to_host(ops.ffn(ops.to_device(x), *(ops.place(w) for w in (g, u, d)), "relu", ops.to_device(mask)))
    assert_close(got, REF.ffn(x, g, u, d, "relu", mask), RTOL[fmt])


def test_ffn_rejects_bad_arguments(ops):
    r = rng(12)
    F, D = 20, 64
    g, u, d = (ops.place(w) for w in _ffn_weights(r, F, D, "f16"))
    x = ops.to_device(randn(r, 1, D))
    for bad in ([3, 2], [1, 1], [0, F], [-1, 2]):
        with pytest.raises(InvalidArgumentError, match="sorted, unique"):
            ops.ffn(x, g, u, d, "silu", ops.to_device(np.array(bad, np.int32)))
    with pytest.raises(InvalidArgumentError, match="integer"):
        ops.ffn(x, g, u, d, "silu", ops.to_device(np.array([1.0], np.float32)))
    with pytest.raises(InvalidArgumentError, match="mask shape"):
        ops.ffn(x, g, u, d, "silu", ops.to_device(np.ones((2, F), bool)))
    with pytest.raises(TypeError, match="device array"):
        ops.ffn(x, g, u, d, "silu", np.array([1, 2], np.int32))
    with pytest.raises(InvalidArgumentError, match="activation"):
        ops.ffn(x, g, u, d, "tanh")
    with pytest.raises(InvalidArgumentError, match="float32"):
        ops.ffn(ops.to_device(np.zeros((1, D), np.float64)), g, u, d, "silu")
    with pytest.raises(InvalidArgumentError, match="one format"):
        ops.ffn(x, ops.place(quantize(randn(r, F, D), "q8")), u, d, "silu")
    with pytest.raises(InvalidArgumentError, match="expected"):
        ops.ffn(ops.to_device(randn(r, 1, 32)), g, u, d, "silu")
    ok = ops.ffn(x, g, u, d, "silu", ops.to_device(np.array([1, 5], np.int64)))      # int64 is converted
    assert ok.shape == (1, D)


# -- attention -----------------------------------------------------------------------------------------
def _cache(ops, r, Hkv, S, hd, cap):
    """k, v as the engine holds them: [Hkv, S, hd] views of a [2 layers, Hkv, cap, hd] buffer."""
    kb, vb = ops.zeros((2, Hkv, cap, hd)), ops.zeros((2, Hkv, cap, hd))
    k, v = randn(r, Hkv, S, hd), randn(r, Hkv, S, hd)
    kb[1, :, :S] = ops.to_device(k)
    vb[1, :, :S] = ops.to_device(v)
    return k, v, kb[1, :, :S], vb[1, :, :S]


@pytest.mark.parametrize("H, Hkv, hd", [(4, 2, 64), (8, 1, 128), (2, 2, 256), (3, 3, 40)])
@pytest.mark.parametrize("S", [1, 5, 300])
@pytest.mark.parametrize("window", [None, 4, 1000])
def test_attention_decode(ops, H, Hkv, hd, S, window):
    r = rng(13)
    k, v, kd, vd = _cache(ops, r, Hkv, S, hd, cap=S + 9)
    q = randn(r, 1, H, hd)
    got = ops.to_host(ops.attention(ops.to_device(q), kd, vd, S - 1, window))
    assert_close(got, REF.attention(q, k, v, S - 1, window), 1e-5)


@pytest.mark.parametrize("H, Hkv, hd", [(4, 2, 64), (3, 1, 32)])
@pytest.mark.parametrize("T, start", [(2, 0), (5, 7), (1, 3)])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_prefill_and_general(ops, H, Hkv, hd, T, start, window):
    """T > 1 (prefill), and T == 1 with S != start + 1 (the reference's rules, not the decode kernel)."""
    r = rng(14)
    S = start + T + (4 if T == 1 else 0)
    k, v, kd, vd = _cache(ops, r, Hkv, S, hd, cap=S + 3)
    q = randn(r, T, H, hd)
    got = ops.to_host(ops.attention(ops.to_device(q), kd, vd, start, window))
    assert_close(got, REF.attention(q, k, v, start, window), 1e-5)


@pytest.mark.parametrize("T, nh, hd", [(1, 4, 64), (3, 2, 6), (2, 5, 128)])
def test_rope(ops, T, nh, hd):
    r = rng(15)
    x, c, s = randn(r, T, nh, hd), randn(r, T, hd // 2), randn(r, T, hd // 2)
    got = ops.to_host(ops.rope(*(ops.to_device(a) for a in (x, c, s))))
    np.testing.assert_array_equal(got, REF.rope(x, c, s))      # rounded multiplies, no fma: exact


# -- the device contract -------------------------------------------------------------------------------
def test_contract_transfers_and_ownership(ops):
    for a in (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int32), np.array([True, False])):
        d = ops.to_device(a)
        assert ops.owns(d) and not ops.owns(a)
        back = ops.to_host(d)
        assert isinstance(back, np.ndarray) and back.dtype == a.dtype
        np.testing.assert_array_equal(back, a)
    assert ops.transfers["to_device"] == 3 and ops.transfers["to_host"] == 3
    with pytest.raises(TypeError):
        ops.to_host(np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="to_device"):
        ops.rms_norm(np.zeros((1, 4), np.float32), ops.place(np.ones(4, np.float32)), 1e-5)
    w = ops.place(quantize(randn(rng(), 4, 32), "q8"))
    assert ops.owns(w) and ops.place(w) is w and w.fmt == "q8"
    z = ops.zeros((2, 3))
    assert z.dtype == np.float32 and not ops.to_host(z).any()
    ops.synchronize()


def test_add_from_host_through_pinned_staging(ops):
    """dst += host array (the hybrid FFN's cold partial): right sums, the pinned staging buffer reused
    and grown as needed, the host array untouched, bad arguments refused."""
    r = rng(7)
    dst_host = randn(r, 2, 96)
    dst = ops.to_device(dst_host)
    total = dst_host.copy()
    for shape in ((2, 96), (2, 96), (2, 96)):
        a = randn(r, *shape)
        keep = a.copy()
        out = ops.add_from_host(dst, a)
        total += a
        assert out is dst
        np.testing.assert_array_equal(a, keep)
    np.testing.assert_allclose(ops.to_host(dst), total, rtol=1e-6)
    staging = ops._staging
    small = ops.to_device(np.zeros((1, 96), np.float32))
    ops.add_from_host(small, np.ones((1, 96), np.float32))
    assert ops._staging is staging                                  # reused for a smaller copy
    big = ops.to_device(np.zeros((4, 96), np.float32))
    ops.add_from_host(big, np.full((4, 96), 2.0, np.float32))
    assert ops._staging.size >= 4 * 96
    np.testing.assert_array_equal(ops.to_host(big), np.full((4, 96), 2.0, np.float32))
    np.testing.assert_array_equal(ops.to_host(small), np.ones((1, 96), np.float32))
    with pytest.raises(InvalidArgumentError, match="shaped like"):
        ops.add_from_host(dst, np.ones((3, 96), np.float32))
    with pytest.raises(InvalidArgumentError, match="device array"):
        ops.add_from_host(np.zeros((2, 96), np.float32), np.ones((2, 96), np.float32))


def test_emulator_catches_reuse_of_pinned_memory_in_flight(monkeypatch):
    """The emulated asynchronous copy: refilling its pinned source before synchronising an event recorded
    after it is reported (on a GPU the copy could read the new bytes); after the sync it is fine."""
    cp = emulator.FakeCupy()
    stage = np.frombuffer(cp.cuda.alloc_pinned_memory(64), np.float32)
    dst = cp.empty((16,), np.float32)
    stage[:] = 1
    dst.set(stage, stream=cp.cuda.get_current_stream())
    done = cp.cuda.Event()
    done.record()
    stage[:] = 2                                               # too early: the copy may not have run
    with pytest.raises(emulator.EmulationError, match="asynchronous copy"):
        dst.set(stage, stream=cp.cuda.get_current_stream())
    stage[:] = 1                                               # (restore, then do it right)
    done.synchronize()
    stage[:] = 3
    dst.set(stage, stream=cp.cuda.get_current_stream())
    np.testing.assert_array_equal(np.asarray(dst), np.full(16, 3, np.float32))
    unpinned = np.zeros(16, np.float32)                        # pageable source: a synchronous copy
    dst.set(unpinned, stream=cp.cuda.get_current_stream())
    unpinned[:] = 5
    cp.cuda.Device().synchronize()


def test_place_refuses_q4(ops):
    with pytest.raises(UnsupportedModelError, match="q8"):
        ops.place(quantize(randn(rng(), 4, 64), "q4"))


def test_memory_limit(backend):
    limit = 1 << 20
    ops = CupyOps(limit_bytes=limit)
    assert ops.limit_bytes == limit and ops.allocated_bytes() == 0
    a = ops.place(quantize(np.ones((100, 1024), np.float32), "f16"))  # 200 KiB
    held = ops.allocated_bytes()
    assert held >= 100 * 1024 * 2
    with pytest.raises(DeviceMemoryError):
        ops.place(np.ones((250, 1024), np.float32))                  # + 1000 KiB > 1 MiB
    with pytest.raises(DeviceMemoryError):
        ops.zeros((250, 1024))
    assert ops.allocated_bytes() == held
    x = ops.to_device(np.ones((150, 1024), np.float32))              # 600 KiB: 800 KiB held
    with pytest.raises(DeviceMemoryError):                          # the op's float32 copy of W: 400 KiB
        ops.linear(x, a)
    assert ops.peak_bytes() <= limit
    del x
    gc.collect()
    assert ops.allocated_bytes() == held
    y = ops.linear(ops.to_device(np.ones((2, 1024), np.float32)), a)    # gemv: only [2, 100] outputs
    assert ops.allocated_bytes() > held
    del y
    gc.collect()
    assert ops.allocated_bytes() == held and ops.peak_bytes() > held
    del a
    gc.collect()
    b = ops.place(np.ones((250, 1024), np.float32))                  # fits once the first weight is gone
    assert ops.allocated_bytes() >= 250 * 1024 * 4 and ops.peak_bytes() <= limit
    del b


# -- realistic sizes: GPU only (the emulator would take minutes) -----------------------------------------
@pytest.mark.parametrize("fmt", ["f16", "q8"])
def test_ffn_model_sized(ops, backend, fmt):
    if backend != "gpu":
        pytest.skip("model-sized shapes run on the GPU only")
    r = rng(16)
    F, D = 5632, 2048                                                 # TinyLlama's FFN
    g, u, d = _ffn_weights(r, F, D, fmt)
    w = [ops.place(m) for m in (g, u, d)]
    for T in (1, 4, 16):
        x = randn(r, T, D)
        idx = np.sort(r.choice(F, F // 5, replace=False)).astype(np.int32)
        got = ops.to_host(ops.ffn(ops.to_device(x), *w, "silu", ops.to_device(idx)))
        assert_close(got, REF.ffn(x, g, u, d, "silu", idx), RTOL[fmt])
    x = randn(r, 1, D)
    assert_close(ops.to_host(ops.ffn(ops.to_device(x), *w, "silu")), REF.ffn(x, g, u, d, "silu"), RTOL[fmt])


@pytest.mark.parametrize("fmt", ["f16", "q8"])
def test_linear_model_sized(ops, backend, fmt):
    if backend != "gpu":
        pytest.skip("model-sized shapes run on the GPU only")
    r = rng(17)
    W = weight(r, (6000, 2048), fmt, scale=0.05)
    for T in (1, 4, 33):
        x = randn(r, T, 2048)
        assert_close(ops.to_host(ops.linear(ops.to_device(x), ops.place(W))), REF.linear(x, W), RTOL[fmt])


def test_attention_model_sized(ops, backend):
    if backend != "gpu":
        pytest.skip("model-sized shapes run on the GPU only")
    r = rng(18)
    H, Hkv, hd, S = 32, 8, 128, 4000
    k, v, kd, vd = _cache(ops, r, Hkv, S, hd, cap=4096)
    q = randn(r, 1, H, hd)
    for window in (None, 1024):
        got = ops.to_host(ops.attention(ops.to_device(q), kd, vd, S - 1, window))
        assert_close(got, REF.attention(q, k, v, S - 1, window), 1e-5)
    q = randn(r, 64, H, hd)
    got = ops.to_host(ops.attention(ops.to_device(q), kd[:, :S], vd[:, :S], S - 64, None))
    assert_close(got, REF.attention(q, k, v, S - 64, None), 1e-5)
