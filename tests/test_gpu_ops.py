"""The GPU backend's own properties: what tests/test_backend_ops.py (every op of every backend against
NumpyOps, CupyOps included) does not cover: the kernels' bitwise properties, the device's own argument
checks, the device contract (transfers, pinned staging, placement) and the memory limit.

Runs on two backends (the `cupy_ops` fixture of conftest.py):
  gpu  @pytest.mark.gpu: real CuPy on a CUDA device; skipped when pipower._gpu.available() is False.
       `pytest -m gpu tests/test_gpu_ops.py tests/test_backend_ops.py` runs only these.
  emu  no GPU needed: the same CupyOps code over pipower._gpu.emulator, i.e. the .cu kernels compiled
       for the host (fibers as CUDA threads, so shuffles and barriers behave) and a NumPy stand-in for
       CuPy. It checks kernel logic and every launch (argument C types, pointer dtypes, grids, aligned
       vector loads, out-of-bounds writes), not speed nor the device's math library; skipped without g++.
Plus checks that need neither: importing the GPU modules does not import CuPy, kernels.KERNELS matches
the kernels defined in the sources, and (when CuPy's NVRTC loads) every source compiles with NVRTC.
"""
import gc
import re
import subprocess
import sys

import numpy as np
import pytest

from pipower import _gpu
from pipower._gpu import emulator, kernels
from pipower.errors import InvalidArgumentError, UnsupportedModelError
from pipower.hybrid.device import DeviceMemoryError
from pipower.quant import quantize


@pytest.fixture
def ops(cupy_ops):
    return cupy_ops()


def rng(seed=0):
    return np.random.default_rng(seed)


def randn(r, *shape, scale=1.0):
    return (r.standard_normal(shape) * scale).astype(np.float32)


def _ffn_weights(r, F, D, fmt):
    return tuple(quantize(randn(r, F, D, scale=0.3), fmt) for _ in range(3))


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
    k((1, 1), (256,), (x, wq, wd, y, np.int32(2), np.int32(64), np.int32(1)))
    assert (np.asarray(y) == 0).all()
    with pytest.raises(emulator.EmulationError, match="numpy.int32"):
        k((1, 1), (256,), (x, wq, wd, y, 2, np.int32(64), np.int32(1)))
    with pytest.raises(emulator.EmulationError, match="float32 array"):
        k((1, 1), (256,), (x, x, wd, y, np.int32(2), np.int32(64), np.int32(1)))
    with pytest.raises(emulator.EmulationError, match="misaligned"):
        k((1, 1), (256,), (cp.zeros((1, 65))[:, 1:], wq, wd, y, np.int32(2), np.int32(64), np.int32(1)))
    with pytest.raises(emulator.EmulationError, match="outside"):
        k((1, 1), (256,), (x, wq, wd, cp.empty((1, 1)), np.int32(2), np.int32(64), np.int32(1)))


# -- kernels ------------------------------------------------------------------------------------------
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


# -- batch invariance: row t of a T-token call is bitwise a one-token call on that row ---------------------
T_BATCH = 11                 # two token tiles of the kernels (TOK_TILE = 8), the second one partial


def assert_rows_batch_invariant(f, x, r):
    """f(x)[t] == f(x[t:t+1]) bit for bit, and a row does not change when its neighbours do."""
    whole = f(x)
    np.testing.assert_array_equal(whole, np.concatenate([f(x[t:t + 1]) for t in range(len(x))]))
    y = x.copy()
    y[1:] = randn(r, len(x) - 1, *x.shape[1:])
    np.testing.assert_array_equal(f(y)[0], whole[0])


@pytest.mark.parametrize("fmt,K", [("f16", 96), ("f16", 33), ("q8", 96)])
def test_linear_is_batch_invariant(ops, fmt, K):
    r = rng(21)
    W = ops.place(quantize(randn(r, 37, K, scale=0.3), fmt))
    assert_rows_batch_invariant(lambda a: ops.to_host(ops.linear(ops.to_device(a), W)), randn(r, T_BATCH, K), r)


@pytest.mark.parametrize("fmt", ["f16", "q8"])
@pytest.mark.parametrize("act,gated", [("silu", True), ("relu", False)])
@pytest.mark.parametrize("listed", [False, True])
def test_ffn_is_batch_invariant(ops, fmt, act, gated, listed):
    """Dense and an index list shared by the rows; relu zeros exercise the down kernel's per-token skips."""
    r = rng(22)
    F, D = 130, 96
    g, u, d = (ops.place(m) for m in _ffn_weights(r, F, D, fmt))
    idx = ops.to_device(np.sort(r.choice(F, 70, replace=False)).astype(np.int32)) if listed else None
    assert_rows_batch_invariant(
        lambda a: ops.to_host(ops.ffn(ops.to_device(a), g if gated else None, u, d, act, idx)), randn(r, T_BATCH, D), r)


@pytest.mark.parametrize("window", [None, 70])
def test_attention_rows_are_batch_invariant(ops, window):
    """T query rows after start_pos cached tokens == each row decoded alone over its own prefix (GQA, head
    dim not a multiple of 32, caches with spare capacity, long enough prefixes to split over keys), and
    both agree with the reference."""
    from pipower.ops import NumpyOps
    r = rng(23)
    H, Hkv, hd, start, cap = 4, 2, 40, 150, 200
    S = start + T_BATCH
    k_host, v_host = randn(r, Hkv, cap, hd), randn(r, Hkv, cap, hd)
    k, v = ops.to_device(k_host), ops.to_device(v_host)
    q_host = randn(r, T_BATCH, H, hd)
    q = ops.to_device(q_host)
    whole = ops.to_host(ops.attention(q, k[:, :S], v[:, :S], start, window))
    for t in range(T_BATCH):
        p = start + t
        alone = ops.to_host(ops.attention(q[t:t + 1], k[:, :p + 1], v[:, :p + 1], p, window))
        np.testing.assert_array_equal(whole[t:t + 1], alone, err_msg=f"row {t}")
    want = NumpyOps().attention(q_host, k_host[:, :S], v_host[:, :S], start, window)
    np.testing.assert_allclose(whole, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_ffn_device_argument_checks(ops):
    """What only the device checks (the common checks run in test_backend_ops.py): index arrays on the
    device and of an integer type (int64 converted), float32 activations, one weight format, [F, D]."""
    r = rng(12)
    F, D = 20, 64
    g, u, d = (ops.place(w) for w in _ffn_weights(r, F, D, "f16"))
    x = ops.to_device(randn(r, 1, D))
    with pytest.raises(InvalidArgumentError, match="integer"):
        ops.ffn(x, g, u, d, "silu", ops.to_device(np.array([1.0], np.float32)))
    with pytest.raises(InvalidArgumentError, match="device array"):
        ops.ffn(x, g, u, d, "silu", np.array([1, 2], np.int32))
    with pytest.raises(InvalidArgumentError, match="float32"):
        ops.ffn(ops.to_device(np.zeros((1, D), np.float64)), g, u, d, "silu")
    with pytest.raises(InvalidArgumentError, match="one format"):
        ops.ffn(x, ops.place(quantize(randn(r, F, D), "q8")), u, d, "silu")
    with pytest.raises(InvalidArgumentError, match="expected"):
        ops.ffn(ops.to_device(randn(r, 1, 32)), g, u, d, "silu")
    ok = ops.ffn(x, g, u, d, "silu", ops.to_device(np.array([1, 5], np.int64)))      # int64 is converted
    assert ok.shape == (1, D)


# -- the device contract -------------------------------------------------------------------------------
def test_contract_transfers_and_ownership(ops):
    for a in (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int32), np.array([True, False])):
        d = ops.to_device(a)
        assert ops.owns(d) and not ops.owns(a)
        back = ops.to_host(d)
        assert isinstance(back, np.ndarray) and back.dtype == a.dtype
        np.testing.assert_array_equal(back, a)
    assert ops.transfers["to_device"] == 3 and ops.transfers["to_host"] == 3
    with pytest.raises(InvalidArgumentError):
        ops.to_host(np.zeros(2, np.float32))
    with pytest.raises(InvalidArgumentError, match="to_device"):
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


def test_memory_limit(cupy_ops):
    limit = 1 << 20
    ops = cupy_ops(limit_bytes=limit)
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
