"""CPU emulation of the shipped CUDA kernels, for tests on machines without a GPU. The library never uses it.

Two pieces, so tests can run CupyOps end to end on the CPU:

* `get(name, device)`: a drop-in for `kernels.get`. Each .cu file is compiled by the host C++ compiler
  against a small shim: the CUDA threads of a block are cooperative fibers (ucontext), so
  `__syncthreads` and the warp shuffles behave as on a device; blocks run one after another. Launches are
  checked the way the device would not tell you: every scalar argument must have the exact C type of
  its parameter (numpy int32 / int64 / float32), every pointer argument an array of a matching dtype
  (size-0 arrays are NULL, as CuPy's), vector loads must be aligned (ushort2 / char4 4 bytes, ushort4 /
  float2 8, float4 16), a block that cannot reach its barrier is reported, and arrays allocated by
  `FakeCupy` carry guard bytes checked after each launch (writes out of bounds).
* `FakeCupy`: a NumPy-backed stand-in for the part of CuPy that CupyOps uses (_gpu/ops.py, _gpu/memory.py
  and the NumpyOps code it inherits, which reaches CuPy as `self.xp`). Allocations go through the active allocator (`cuda.using_allocator`) into a pool with CuPy's
  512-byte rounding and `set_limit`, are 256-byte aligned like CuPy's, and start as 0xFF bytes (NaN) so
  unwritten output shows.
  Asynchronous copies from pinned host memory (`ndarray.set(pinned, stream=...)`) are checked for the
  host-side hazard: the source must not change until an event recorded after the copy (or the device)
  has been synchronised; a later copy that finds it changed raises EmulationError.

What it cannot show: speed, memory-model races beyond barriers, the device's exact math library (erff,
expf, tanhf differ from the host's in the last ulp) and anything about the real NVRTC / driver.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import types
import weakref
from pathlib import Path

import numpy as np

from . import kernels
from .kernels import KERNELS

CXX = shutil.which("g++") or shutil.which("c++")

SHIM_FILE = "emulator_shim.h"    # the host-side CUDA shim, next to the .cu files (package data)

_SIG = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.DOTALL)
_SCALARS = {"int": (np.int32, ctypes.c_int32), "long long": (np.int64, ctypes.c_int64),
            "float": (np.float32, ctypes.c_float)}
_POINTEES = {"float": ("float32",), "unsigned short": ("float16", "uint16"), "signed char": ("int8",),
             "int": ("int32",)}


def signatures(src: str) -> dict[str, list[tuple[str, str, bool]]]:
    """kernel name -> [(parameter name, base C type, is pointer)] of every extern "C" __global__ in src."""
    out = {}
    for name, params in _SIG.findall(src):
        plist = []
        for p in params.split(","):
            p = " ".join(p.replace("__restrict__", " ").split())
            is_ptr = "*" in p
            words = p.replace("*", " ").split()
            pname = words[-1]
            base = " ".join(w for w in words[:-1] if w != "const")
            plist.append((pname, base, is_ptr))
        out[name] = plist
    return out


def _emulation_source(src: str) -> str:
    """The .cu text rewritten for the host compiler (CUDA keywords and intrinsics onto the shim)."""
    s = src
    s = re.sub(r'asm\("cvt\.f32\.f16 %0, %1;"\s*:\s*"=f"\((\w+)\)\s*:\s*"h"\((\w+)\)\);', r"\1 = emu_h2f(\2);", s)
    s = re.sub(r"extern\s+__shared__\s+(\w+)\s+(\w+)\[\];", r"\1* \2 = (\1*)emu_dyn_smem;", s)
    s = re.sub(r"reinterpret_cast<", "emu_cast<", s)
    for kw, rep in (("__global__", ""), ("__device__", ""), ("__forceinline__", "inline"),
                    ("__restrict__", "__restrict"), ("__shared__", "static")):
        s = re.sub(rf"\b{kw}\b", rep, s)
    if "asm(" in s:
        raise RuntimeError("the emulator does not know an inline asm statement in this kernel source")
    return s


def _wrappers(sigs: dict) -> str:
    out = []
    for name, params in sigs.items():
        decl = ", ".join(f"{'const ' if p else ''}{b}{'*' if p else ''} {n}" for n, b, p in params)
        cast = ", ".join(f"const_cast<{b}*>({n})" if p else n for n, b, p in params)
        out.append(f'extern "C" int emu_launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
                   f'unsigned long long smem{", " if decl else ""}{decl}) {{\n'
                   f"    emu_error = 0;\n"
                   f"    std::function<void()> body = [=]() {{ {name}({cast}); }};\n"
                   f"    emu_launch(gx, gy, gz, bx, smem, body);\n"
                   f"    return emu_error;\n}}\n")
    return "\n".join(out)


class EmulationError(AssertionError):
    """An emulated launch broke a rule the device would break silently or fatally."""


_build_lock = threading.Lock()
_libs: dict[str, tuple] = {}
_BUILD_DIR = Path(tempfile.gettempdir()) / "pipower-gpu-emulator"


def _library(file: str):
    """(ctypes library, signatures) of one .cu file, compiled once per source text."""
    with _build_lock:
        if file in _libs:
            return _libs[file]
        if CXX is None:
            raise RuntimeError("no host C++ compiler (g++) to emulate the CUDA kernels")
        src = kernels.source(file)                        # headers inlined, as NVRTC gets it
        sigs = signatures(src)
        shim = (kernels.SOURCE_DIR / SHIM_FILE).read_text()
        code = shim + "\n#line 1 \"" + file + "\"\n" + _emulation_source(src) + "\n" + _wrappers(sigs)
        digest = hashlib.sha256(code.encode()).hexdigest()[:16]
        _BUILD_DIR.mkdir(exist_ok=True)
        so = _BUILD_DIR / f"{Path(file).stem}-{digest}.so"
        if not so.exists():
            cpp = _BUILD_DIR / f"{so.stem}.{os.getpid()}.cpp"        # per process: parallel runs
            cpp.write_text(code)
            tmp = _BUILD_DIR / f"{so.stem}.{os.getpid()}.so.tmp"
            r = subprocess.run([CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared",
                                "-Wno-unknown-pragmas", str(cpp), "-o", str(tmp)],
                               check=False, capture_output=True, text=True, timeout=300)
            if r.returncode:
                raise RuntimeError(f"emulating {file}: the host compiler failed:\n{r.stderr}")
            tmp.replace(so)
            cpp.unlink()
        lib = ctypes.CDLL(str(so))
        _libs[file] = (lib, sigs)
        return _libs[file]


class EmuKernel:
    """Callable like cupy.RawKernel: kernel(grid, block, args, shared_mem=0)."""

    def __init__(self, name: str):
        self.name = name
        lib, sigs = _library(KERNELS[name])
        self.params = sigs[name]
        self.fn = getattr(lib, f"emu_launch_{name}")
        self.fn.restype = ctypes.c_int
        self.fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_ulonglong] + \
            [ctypes.c_void_p if p else _SCALARS[b][1] for _, b, p in self.params]

    def __call__(self, grid, block, args, shared_mem: int = 0):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        if block[1:] != (1, 1):
            raise EmulationError(f"{self.name}: the emulator runs 1-D blocks only, got {block}")
        if not (0 < grid[0] < 2**31 and 0 < grid[1] < 65536 and 0 < grid[2] < 65536):
            raise EmulationError(f"{self.name}: invalid grid {grid}")
        if len(args) != len(self.params):
            raise EmulationError(f"{self.name}: {len(args)} arguments for {len(self.params)} parameters")
        cargs, arrays = [], []
        for a, (pname, base, is_ptr) in zip(args, self.params):
            if is_ptr:
                if not isinstance(a, np.ndarray):
                    raise EmulationError(f"{self.name}: parameter {pname} ({base}*) got {type(a).__name__}")
                if a.dtype.name not in _POINTEES[base]:
                    raise EmulationError(f"{self.name}: parameter {pname} ({base}*) got a {a.dtype} array")
                cargs.append(a.__array_interface__["data"][0] if a.size else None)
                arrays.append(a)
            else:
                want = _SCALARS[base][0]
                if type(a) is not want:
                    raise EmulationError(f"{self.name}: parameter {pname} ({base}) got {type(a).__name__}, "
                                         f"expected numpy.{want.__name__}")
                cargs.append(a.item())
        err = self.fn(grid[0], grid[1], grid[2], block[0], shared_mem, *cargs)
        if err & 4:
            raise EmulationError(f"{self.name}: invalid launch (block {block}, shared memory {shared_mem})")
        if err & 2:
            raise EmulationError(f"{self.name}: threads of a block never met at a barrier (divergent "
                                 f"__syncthreads / shuffle)")
        if err & 1:
            raise EmulationError(f"{self.name}: misaligned vector load")
        for a in arrays:
            _check_guards(a, self.name)


def get(name: str, device: int = 0) -> EmuKernel:
    """Drop-in for kernels.get (device ignored)."""
    return EmuKernel(name)


# ---- FakeCupy -----------------------------------------------------------------------------------------
GUARD = 256
_guards: dict[int, tuple] = {}     # id(buffer) -> (weakref to buffer, offset, nbytes)


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _check_guards(a: np.ndarray, who: str) -> None:
    info = _guards.get(id(_root(a)))
    if info is None:
        return
    ref, off, nbytes = info
    buf = ref()
    if buf is None:
        return
    if (buf[:off] != 0xAB).any() or (buf[off + nbytes:] != 0xAB).any():
        raise EmulationError(f"{who}: wrote outside a {nbytes}-byte array")


class FakeArray(np.ndarray):
    """A NumPy array standing for CuPy device memory (`.data.ptr`, `.device.id` as CuPy's)."""

    def set(self, arr, stream=None):
        """Host -> device copy. With a stream and a pinned source it is asynchronous on a device: the
        copy is done here at once, but the source stays registered as in flight until synchronised."""
        arr = np.asarray(arr)
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"set: shape/dtype mismatch {arr.shape} {arr.dtype} -> {self.shape} {self.dtype}")
        _check_in_flight(arr, "set")
        self.view(np.ndarray)[...] = arr
        if stream is not None and _is_pinned(arr):
            _STATE.copies += 1
            _STATE.in_flight.append((_STATE.copies, arr.ctypes.data, arr.nbytes, arr.tobytes()))

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0] if self.size else 0)

    @property
    def device(self):
        return types.SimpleNamespace(id=0)

    def __array_finalize__(self, obj):
        self._mem = getattr(obj, "_mem", None)

    def copy(self, order="C"):
        out = _STATE.module.empty(self.shape, self.dtype)
        out[...] = self
        return out


class _OutOfMemoryError(MemoryError):
    pass


class _Block:
    def __init__(self, pool, size):
        self.pool, self.size = pool, size

    def __del__(self):
        self.pool.used -= self.size


class _Pool:
    def __init__(self):
        self.used, self.limit = 0, 0

    def set_limit(self, size=None, fraction=None):
        self.limit = int(size or 0)

    def used_bytes(self):
        return self.used

    def total_bytes(self):
        return self.used

    def malloc(self, size):
        size = -(-int(size) // 512) * 512
        if self.limit and self.used + size > self.limit:
            raise _OutOfMemoryError(f"out of memory allocating {size} bytes (limit {self.limit})")
        self.used += size
        return _Block(self, size)


def _is_pinned(a: np.ndarray) -> bool:
    p = a.ctypes.data
    return any(lo <= p and p + a.nbytes <= hi for lo, hi in _STATE.pinned)


def _check_in_flight(a: np.ndarray, who: str) -> None:
    """Raise if `a` overlaps the source of an unsynchronised async copy whose bytes have changed since."""
    p, n = a.ctypes.data, a.nbytes
    for _, ptr, nbytes, snapshot in _STATE.in_flight:
        if ptr < p + n and p < ptr + nbytes:
            now = (ctypes.c_char * nbytes).from_address(ptr).raw
            if now != snapshot:
                raise EmulationError(f"{who}: host memory of an asynchronous copy changed before the copy was "
                                     f"known to be finished (synchronise an event recorded after it first)")


class _Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._upto = 0

    def record(self, stream=None):
        self._upto = _STATE.copies                    # the copies queued before this point

    def synchronize(self):
        done = [c for c in _STATE.in_flight if c[0] <= self._upto]
        for _, ptr, nbytes, snapshot in done:
            if (ctypes.c_char * nbytes).from_address(ptr).raw != snapshot:
                raise EmulationError("event.synchronize: the source of an async copy changed before the "
                                     "copy finished")
        _STATE.in_flight[:] = [c for c in _STATE.in_flight if c[0] > self._upto]


def _alloc_pinned(nbytes: int):
    buf = np.empty(max(int(nbytes), 1), np.uint8)
    span = (buf.ctypes.data, buf.ctypes.data + buf.nbytes)
    pinned = _STATE.pinned
    pinned.append(span)
    weakref.finalize(buf, pinned.remove, span)
    return buf


class _Device:
    def __init__(self, device_id=0):
        self.id = int(device_id)
        self.attributes = {"MultiProcessorCount": 4}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        _STATE.in_flight.clear()


class _State(threading.local):
    allocator = None
    module = None

    def __init__(self):
        self.pinned = []          # (start, end) addresses of live pinned host buffers
        self.in_flight = []       # (seq, source address, bytes, snapshot) of unsynchronised async copies
        self.copies = 0           # async copies queued so far (seq numbers)


_STATE = _State()


def _alloc(shape, dtype) -> FakeArray:
    shape = (shape,) if np.isscalar(shape) else tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    mem = _STATE.allocator(nbytes) if _STATE.allocator is not None else None
    buf = np.empty(nbytes + 3 * GUARD, np.uint8)
    off = GUARD + (-(buf.ctypes.data + GUARD)) % 256
    buf[:] = 0xAB
    buf[off:off + nbytes] = 0xFF
    _guards[id(buf)] = (weakref.ref(buf), off, nbytes)
    weakref.finalize(buf, _guards.pop, id(buf), None)
    arr = buf[off:off + nbytes].view(dtype).reshape(shape).view(FakeArray)
    arr._mem = mem
    return arr


def FakeCupy() -> types.ModuleType:
    """A fresh NumPy-backed stand-in module for `cupy` (see the module doc)."""
    m = types.ModuleType("cupy")
    m.ndarray = FakeArray

    @contextlib.contextmanager
    def using_allocator(fn):
        prev = _STATE.allocator
        _STATE.allocator = fn
        try:
            yield
        finally:
            _STATE.allocator = prev

    m.cuda = types.SimpleNamespace(
        Device=_Device, MemoryPool=_Pool, using_allocator=using_allocator,
        Event=_Event, alloc_pinned_memory=_alloc_pinned, get_current_stream=lambda: "default-stream",
        memory=types.SimpleNamespace(OutOfMemoryError=_OutOfMemoryError),
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))

    def empty(shape, dtype=np.float32):
        return _alloc(shape, dtype)

    def zeros(shape, dtype=np.float32):
        a = _alloc(shape, dtype)
        a[...] = 0
        return a

    def asarray(a, dtype=None):
        if isinstance(a, FakeArray) and (dtype is None or a.dtype == dtype):
            return a
        a = np.asarray(a, dtype=dtype)
        out = _alloc(a.shape, a.dtype)
        out[...] = a
        return out

    def ascontiguousarray(a, dtype=None):
        if a.flags.c_contiguous and (dtype is None or a.dtype == np.dtype(dtype)):
            return a
        out = _alloc(a.shape, dtype or a.dtype)
        out[...] = a
        return out

    def wrap(f):
        def g(*args, **kwargs):
            return np.asarray(f(*args, **kwargs)).view(FakeArray)
        return g

    m.empty, m.zeros, m.asarray, m.ascontiguousarray = empty, zeros, asarray, ascontiguousarray
    m.empty_like = lambda a, dtype=None: _alloc(a.shape, dtype or a.dtype)
    def asnumpy(a):
        _STATE.in_flight.clear()                      # a device -> host copy synchronises the stream
        return np.array(a, copy=True).view(np.ndarray)
    m.asnumpy = asnumpy
    for fname in ("matmul", "tile", "arange", "where", "exp", "any", "flatnonzero", "abs"):
        setattr(m, fname, wrap(getattr(np, fname)))
    _STATE.module = m
    return m
