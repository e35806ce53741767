"""Device memory and transfers of the GPU backend: a budgeted CuPy memory pool, placed weights
(DeviceMatrix) and host <-> device copies. CupyOps (pipower/_gpu/ops.py) adds the ops on top.

This is the placement / transfer / memory half of the device contract (pipower.hybrid.device.DeviceOps:
owns / place / to_device / to_host / add_from_host / zeros / scope / synchronize / allocated_bytes /
peak_bytes / limit_bytes). CuPy is imported when a DeviceMemory is built, never when this module is
imported.

Weights: `place` turns a float32 array [N] into a CuPy float32 array and a matrix [N, K] (array or QMatrix)
into a DeviceMatrix kept in its format: f32, f16 or q8 (layouts as pipower.quant). q4 is refused.

Memory: every allocation of this object goes through its own CuPy MemoryPool (cupy.cuda.MemoryPool with
set_limit(limit_bytes)), so allocated_bytes() is what this object holds now (weights, cache, live
temporaries), peak_bytes() is tracked at each allocation, and an allocation that would pass the limit
raises DeviceMemoryError (CuPy's OutOfMemoryError is converted too). Arrays a caller makes with CuPy
directly live in CuPy's default pool and are not counted.
"""
from __future__ import annotations

import contextlib

import numpy as np

from ..errors import BackendError, DeviceMemoryError, InvalidArgumentError, UnsupportedModelError
from ..quant import BLOCK, QMatrix

F32 = np.float32
FORMATS = ("f32", "f16", "q8")     # what a DeviceMatrix holds (and the kernels take)
POOL_ROUND = 512                   # CuPy's pool rounds allocations up to this


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class DeviceMatrix:
    """A weight matrix [N, K] in device memory: fmt in ("f32", "f16", "q8"); data / scales CuPy arrays
    laid out as pipower.quant.QMatrix (f32 float32 [N, K]; f16 float16 [N, K]; q8 int8 [N, K] + float16
    scales [N, K / 32])."""

    __slots__ = ("data", "fmt", "scales", "shape")

    def __init__(self, fmt: str, shape: tuple, data, scales=None):
        self.fmt, self.shape, self.data, self.scales = fmt, tuple(shape), data, scales

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes) + (int(self.scales.nbytes) if self.scales is not None else 0)

    def __repr__(self) -> str:
        return f"DeviceMatrix({self.fmt}, {self.shape[0]}x{self.shape[1]})"


class DeviceMemory:
    """One CUDA device's budgeted memory: weight placement, transfers and accounting (see the module doc)."""

    native_formats = FORMATS

    def __init__(self, limit_bytes: int | None = None, device: int = 0):
        from . import status
        ok, why = status()
        if not ok:
            raise BackendError(f"the GPU backend is not available: {why}")
        import cupy

        self.xp = cupy            # the array module: CupyOps' inherited NumpyOps code runs on it
        n_dev = cupy.cuda.runtime.getDeviceCount()
        if not 0 <= int(device) < n_dev:
            raise InvalidArgumentError(f"device {device} does not exist ({n_dev} CUDA device(s))")
        if limit_bytes is not None and int(limit_bytes) < 0:
            raise InvalidArgumentError(f"limit_bytes must be >= 0 or None, got {limit_bytes}")
        self.device = int(device)
        self.limit_bytes = None if limit_bytes is None else int(limit_bytes)
        self._pool = cupy.cuda.MemoryPool()
        if self.limit_bytes is not None:
            self._pool.set_limit(size=self.limit_bytes)
        self._peak = 0
        self.transfers = {"to_device": 0, "to_host": 0, "bytes_to_device": 0, "bytes_to_host": 0}
        self._staging: np.ndarray | None = None    # pinned host float32 buffer for add_from_host
        self._staging_copied = None                # CUDA event: the last copy out of it finished

    @property
    def _cp(self):
        """The cupy module (bench/hybrid.py tells a CuPy device from the stand-in by this attribute)."""
        return self.xp

    # -- memory ----------------------------------------------------------------------------------------
    def _malloc(self, size: int):
        """The allocator of everything this object allocates: the limit check, then the private pool."""
        if self.limit_bytes is not None:
            held = self._pool.used_bytes()
            need = held + _cdiv(size, POOL_ROUND) * POOL_ROUND
            if need > self.limit_bytes:
                raise DeviceMemoryError(f"allocating {size} bytes would hold {need} bytes on device "
                                        f"{self.device}, over the {self.limit_bytes}-byte limit")
        mem = self._pool.malloc(size)
        self._peak = max(self._peak, self._pool.used_bytes())
        return mem

    @contextlib.contextmanager
    def _on_device(self):
        """Current device = ours, allocations through our pool; CuPy's OOM becomes DeviceMemoryError."""
        cp = self.xp
        try:
            with cp.cuda.Device(self.device), cp.cuda.using_allocator(self._malloc):
                yield
        except cp.cuda.memory.OutOfMemoryError as exc:
            raise DeviceMemoryError(f"device {self.device} out of memory (limit {self.limit_bytes}, "
                                    f"held {self._pool.used_bytes()} bytes): {exc}") from exc

    def scope(self):
        """Contract: allocations inside go through our limited pool (HybridOps wraps each forward)."""
        return self._on_device()

    def allocated_bytes(self) -> int:
        return int(self._pool.used_bytes())

    def peak_bytes(self) -> int:
        return max(self._peak, self.allocated_bytes())

    def synchronize(self) -> None:
        self.xp.cuda.Device(self.device).synchronize()

    # -- contract: placement and transfers -------------------------------------------------------------
    def owns(self, a) -> bool:
        if isinstance(a, DeviceMatrix):
            return True
        return isinstance(a, self.xp.ndarray) and a.device.id == self.device

    def place(self, w):
        """Host weight -> device copy: float32 [N] -> CuPy float32; [N, K] array / QMatrix -> DeviceMatrix."""
        if self.owns(w):
            return w
        cp = self.xp
        if isinstance(w, QMatrix):
            if w.fmt == "q4":
                raise UnsupportedModelError(f"q4 weights ({w.shape[0]}x{w.shape[1]}) are not supported on the "
                                            f"GPU backend; use weights='q8' or 'f16' for the GPU part")
            if w.fmt not in self.native_formats:
                raise InvalidArgumentError(f"unknown weight format {w.fmt!r}")
            self._check_qmatrix(w)
            with self._on_device():
                data = cp.asarray(np.ascontiguousarray(w.data))
                scales = None if w.scales is None else cp.asarray(np.ascontiguousarray(w.scales))
            return DeviceMatrix(w.fmt, w.shape, data, scales)
        if isinstance(w, np.ndarray):
            if w.ndim not in (1, 2):
                raise InvalidArgumentError(f"place expects a [N] or [N, K] weight, got shape {w.shape}")
            if not np.issubdtype(w.dtype, np.floating):
                raise InvalidArgumentError(f"place expects a float weight, got {w.dtype}")
            a = np.ascontiguousarray(w, dtype=F32)
            with self._on_device():
                d = cp.asarray(a)
            return d if a.ndim == 1 else DeviceMatrix("f32", a.shape, d)
        raise InvalidArgumentError(f"cannot place {type(w).__name__} on the device")

    @staticmethod
    def _check_qmatrix(w: QMatrix) -> None:
        N, K = w.shape
        want = {"f32": np.float32, "f16": np.float16, "q8": np.int8}[w.fmt]
        if w.data.dtype != want or w.data.shape != (N, K):
            raise InvalidArgumentError(f"{w.fmt} weight data must be {np.dtype(want)} {(N, K)}, "
                                       f"got {w.data.dtype} {w.data.shape}")
        if w.fmt == "q8":
            if K % BLOCK:
                raise InvalidArgumentError(f"q8 weight K={K} is not a multiple of {BLOCK}")
            if w.scales is None or w.scales.dtype != np.float16 or w.scales.shape != (N, K // BLOCK):
                raise InvalidArgumentError(f"q8 scales must be float16 {(N, K // BLOCK)}")

    def to_device(self, a):
        if self.owns(a):
            return a
        a = np.asarray(a)
        self.transfers["to_device"] += 1
        self.transfers["bytes_to_device"] += a.nbytes
        with self._on_device():
            return self.xp.asarray(a)

    def add_from_host(self, dst, a):
        """dst += a: dst a float32 device array, a a host float32 array of the same shape (the hybrid
        FFN's cold partial sum). a is copied into pinned host memory and sent with an asynchronous copy
        on the current stream, followed there by the add: the host does not wait for the device's queued
        work (a plain upload from pageable memory would). Returns dst.

        The staging buffer is reused call after call; before refilling it the host waits for the event
        recorded after the previous copy, which has long finished by then (a layer's work lies between)."""
        cp = self.xp
        a = np.ascontiguousarray(a, dtype=F32)
        if not self.owns(dst) or dst.dtype != F32 or tuple(dst.shape) != a.shape:
            raise InvalidArgumentError(f"add_from_host needs a float32 device array shaped like the host "
                                       f"array {a.shape}, got {type(dst).__name__} {getattr(dst, 'shape', '')}")
        self.transfers["to_device"] += 1
        self.transfers["bytes_to_device"] += a.nbytes
        with self._on_device():
            if self._staging_copied is not None:
                self._staging_copied.synchronize()
            if self._staging is None or self._staging.size < a.size:
                mem = cp.cuda.alloc_pinned_memory(a.nbytes)          # page-locked host memory
                self._staging = np.frombuffer(mem, F32, a.size)     # keeps `mem` alive
            staged = self._staging[:a.size].reshape(a.shape)
            np.copyto(staged, a)
            stream = cp.cuda.get_current_stream()
            part = cp.empty(a.shape, F32)                           # budgeted pool, freed after the add
            part.set(staged, stream=stream)                         # async: the source is pinned
            self._staging_copied = cp.cuda.Event(disable_timing=True)
            self._staging_copied.record(stream)
            dst += part
        return dst

    def to_host(self, a) -> np.ndarray:
        if isinstance(a, DeviceMatrix):
            raise InvalidArgumentError("to_host got a placed weight; weights stay on the device")
        if not self.owns(a):
            raise InvalidArgumentError("to_host got a host array: the scheduler lost track of where data lives")
        self.transfers["to_host"] += 1
        self.transfers["bytes_to_host"] += a.nbytes
        with self._on_device():
            return self.xp.asnumpy(a)                      # synchronises the stream

    def zeros(self, shape):
        with self._on_device():
            return self.xp.zeros(shape, F32)
