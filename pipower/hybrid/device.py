"""The device side of the hybrid engine: the contract a GPU ops backend meets (`DeviceOps`), and a
NumPy stand-in (`StandInDeviceOps`).

Device ops never receive host arrays (InvalidArgumentError); the hybrid ops move data explicitly
(to_device / to_host), so every transfer is visible and counted. `pipower._gpu.ops.CupyOps` is the CUDA
implementation.

`StandInDeviceOps` meets the contract with NumPy inside: CI (no GPU) runs the hybrid scheduler through
it. Device arrays are a marked ndarray subclass, so a host array reaching a device op raises (CuPy
refuses them too), and memory is accounted like a device pool with a hard limit.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Protocol

import numpy as np

from ..errors import DeviceMemoryError, InvalidArgumentError     # DeviceMemoryError: still importable here
from ..ops import NumpyOps, Threshold
from ..quant import QMatrix


class DeviceOps(Protocol):
    """What HybridOps needs of a device backend: NumpyOps' ops on device arrays, plus placement,
    transfers and memory accounting. Shapes as NumpyOps (T tokens, D hidden, F FFN neurons, N x K a
    weight, H / Hkv query / kv heads, hd head dim, S cached positions); "device array" is the backend's
    array type (a CuPy array, a StandInArray), "placed weight" what `place` returned."""

    name: str
    native_formats: tuple[str, ...]     # weight formats the device ops run without converting
    limit_bytes: int | None             # None, or the hard cap: no allocation may take the total past it
    transfers: dict[str, int]           # to_device / to_host: copies; bytes_to_device / bytes_to_host
    fused_threshold: bool               # ffn takes a pipower.ops.Threshold (one token, selection fused)
    batch_invariant: bool               # a token's result never depends on the batch (up to 64 tokens)

    # -- placement, transfers, memory --------------------------------------------------------------
    def owns(self, a) -> bool:
        """a lives on the device (a device array, or a placed weight)."""

    def place(self, w):
        """Host weight (float32 [N] / [N, K], or QMatrix [N, K]) -> its device copy, counted against the
        limit until the ops object goes; DeviceMemoryError past it. A placed weight is returned as is."""

    def to_device(self, a):
        """Host ndarray -> device array of the same shape and dtype (float32 / int32 / bool)."""

    def to_host(self, a) -> np.ndarray:
        """Device array -> host ndarray (waits for queued device work)."""

    def add_from_host(self, dst, a):
        """dst += a, dst a float32 device array, a a host float32 array of its shape; the host does not
        wait for queued device work (CupyOps: pinned staging memory, an asynchronous copy). -> dst."""

    def zeros(self, shape):
        """float32 device zeros (KV cache storage), counted against the limit while referenced."""

    def synchronize(self) -> None:
        """Wait for queued device work (timing)."""

    def scope(self) -> contextlib.AbstractContextManager:
        """Context: every device allocation inside goes through the budgeted pool (HybridOps enters it
        around each forward, so selector and scheduler temporaries count against the limit too)."""

    def allocated_bytes(self) -> int:
        """Bytes held now: weights, caches, live temporaries."""

    def peak_bytes(self) -> int:
        """The most bytes held at once since construction."""

    # -- ops: device arrays in, new device arrays out ----------------------------------------------
    def rms_norm(self, x, weight, eps: float):
        """x [..., D], weight [D] (placed) -> [..., D]."""

    def activation(self, name: str, x):
        """Elementwise activation by HF name (silu, gelu, gelu_pytorch_tanh, relu...) -> x's shape."""

    def linear(self, x, weight, bias=None):
        """x [T, K], weight placed [N, K], bias [N] or None -> [T, N]."""

    def ffn(self, x, gate, up, down_t, act: str, idx=None):
        """x [T, D]; gate (None: plain MLP), up, down_t placed [F, D] -> [T, D]. idx: None (all
        neurons), int32 [n] sorted unique neuron ids, or bool [T, F] per-token mask."""

    def rope(self, x, cos, sin):
        """x [T, nh, hd], cos / sin [T, hd/2] -> [T, nh, hd] (HF rotate-half pairs (i, i + hd/2))."""

    def attention(self, q, k, v, start_pos: int, window: int | None = None):
        """q [T, H, hd]; k, v [Hkv, S, hd] cache views -> [T, H * hd], causal from start_pos (and a
        sliding window of `window` positions when given)."""


class StandInArray(np.ndarray):
    """A NumPy array standing for device memory (see module doc). Like CuPy, it refuses arithmetic with
    host arrays (other than scalars and 0-d arrays): an unintended host/device mix fails in CI."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        args = []
        for a in inputs + tuple(kwargs.get("out", ())):
            if isinstance(a, np.ndarray) and not isinstance(a, StandInArray) and a.ndim > 0:
                raise TypeError(f"{ufunc.__name__}: a host array {a.shape} mixed with a device array "
                                f"(move it with to_device / to_host first)")
        for a in inputs:
            args.append(a.view(np.ndarray) if isinstance(a, StandInArray) else a)
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, StandInArray) else o for o in kwargs["out"])
        result = getattr(ufunc, method)(*args, **kwargs)
        if isinstance(result, tuple):
            return tuple(_dev(r) if isinstance(r, np.ndarray) else r for r in result)
        return _dev(result) if isinstance(result, np.ndarray) else result


class StandInWeight:
    """A placed weight: the host object it copies (array or QMatrix) and its bytes."""

    def __init__(self, w):
        self.w = w
        self.nbytes = int(w.nbytes)
        self.shape = tuple(w.shape)
        self.fmt = w.fmt if isinstance(w, QMatrix) else "f32"

    def __repr__(self) -> str:
        return f"StandInWeight({self.fmt}, {self.shape})"


def _dev(a: np.ndarray) -> StandInArray:
    return np.asarray(a).view(StandInArray)


class StandInDeviceOps:
    """NumPy reference ops behind the device contract (DeviceOps), with transfer and memory accounting.

    Memory: placed weights are held until the ops object goes, zeros() buffers (KV caches) until
    their last reference goes; temporaries are not tracked (a real pool frees them at once; the
    scheduler's temporaries are [T, D]-sized).
    """

    name = "standin"

    def __init__(self, limit_bytes: int | None = None, inner=None):
        """inner: the ops that do the arithmetic (default the NumPy reference; the CPU engine's ops
        make an emulated device fast enough for whole evaluations, pipower.eval budget points)."""
        self.ref = inner if inner is not None else NumpyOps(1)
        self.native_formats = self.ref.native_formats if inner is not None else ("f32", "f16", "q8", "q4")
        self.limit_bytes = limit_bytes
        self._held = 0
        self._peak = 0
        self.transfers = {"to_device": 0, "to_host": 0, "bytes_to_device": 0, "bytes_to_host": 0}

    @property
    def fused_threshold(self) -> bool:
        """ffn takes a Threshold when the ops doing the arithmetic do."""
        return bool(getattr(self.ref, "fused_threshold", False))

    @property
    def batch_invariant(self) -> bool:
        """As the ops doing the arithmetic."""
        return bool(getattr(self.ref, "batch_invariant", False))

    # -- contract -----------------------------------------------------------------------------------
    def owns(self, a) -> bool:
        return isinstance(a, (StandInArray, StandInWeight))

    def _allocate(self, nbytes: int, what: str) -> None:
        if self.limit_bytes is not None and self._held + nbytes > self.limit_bytes:
            raise DeviceMemoryError(f"allocating {what} ({nbytes} bytes) would hold {self._held + nbytes} "
                                    f"bytes on the device, over the {self.limit_bytes}-byte limit")
        self._held += nbytes
        self._peak = max(self._peak, self._held)

    def place(self, w):
        if self.owns(w):
            return w
        if not isinstance(w, (np.ndarray, QMatrix)):
            raise InvalidArgumentError(f"cannot place {type(w).__name__} on the device")
        self._allocate(int(w.nbytes), f"a {tuple(w.shape)} weight")
        return StandInWeight(w)

    def to_device(self, a) -> StandInArray:
        if self.owns(a):
            return a
        a = np.asarray(a)
        self.transfers["to_device"] += 1
        self.transfers["bytes_to_device"] += a.nbytes
        return _dev(a.copy())

    def add_from_host(self, dst, a):
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not isinstance(dst, StandInArray) or dst.dtype != np.float32 or dst.shape != a.shape:
            raise InvalidArgumentError(f"add_from_host needs a float32 device array shaped like the host array "
                            f"{a.shape}, got {type(dst).__name__} {getattr(dst, 'shape', '')}")
        self.transfers["to_device"] += 1
        self.transfers["bytes_to_device"] += a.nbytes
        dst += _dev(a)
        return dst

    def to_host(self, a) -> np.ndarray:
        if not self.owns(a):
            raise InvalidArgumentError("to_host got a host array: the scheduler lost track of where data lives")
        self.transfers["to_host"] += 1
        self.transfers["bytes_to_host"] += a.nbytes
        return np.array(a, copy=True).view(np.ndarray)

    def zeros(self, shape) -> StandInArray:
        n = int(np.prod(shape)) * 4
        self._allocate(n, f"a {tuple(shape)} buffer")
        buf = _dev(np.zeros(shape, np.float32))
        weakref.finalize(buf, self._release, n)     # freed with its last reference, as a pool frees it
        return buf

    def _release(self, nbytes: int) -> None:
        self._held -= nbytes

    def synchronize(self) -> None:
        pass

    def scope(self):
        return contextlib.nullcontext()

    def allocated_bytes(self) -> int:
        return self._held

    def peak_bytes(self) -> int:
        return self._peak

    # -- ops: check every array operand is on the device, compute with the reference --------------
    def _host(self, *arrays):
        out = []
        for a in arrays:
            if a is None:
                out.append(None)
            elif isinstance(a, StandInWeight):
                out.append(a.w)
            elif isinstance(a, StandInArray):
                out.append(a.view(np.ndarray))
            elif isinstance(a, Threshold):               # ffn's fused selection: not an array
                out.append(a)
            else:
                raise InvalidArgumentError(f"device op got a host {type(a).__name__} {getattr(a, 'shape', '')}: "
                                f"move it with to_device first")
        return out

    def rms_norm(self, x, weight, eps):
        x, weight = self._host(x, weight)
        return _dev(self.ref.rms_norm(x, weight, eps))

    def activation(self, name, x):
        (x,) = self._host(x)
        return _dev(self.ref.activation(name, x))

    def linear(self, x, weight, bias=None):
        x, weight, bias = self._host(x, weight, bias)
        return _dev(self.ref.linear(x, weight, bias))

    def ffn(self, x, gate, up, down_t, act, idx=None):
        x, gate, up, down_t, idx = self._host(x, gate, up, down_t, idx)
        return _dev(self.ref.ffn(x, gate, up, down_t, act, idx))

    def rope(self, x, cos, sin):
        x, cos, sin = self._host(x, cos, sin)
        return _dev(self.ref.rope(x, cos, sin))

    def attention(self, q, k, v, start_pos, window=None):
        q, k, v = self._host(q, k, v)
        return _dev(self.ref.attention(q, k, v, start_pos, window))
