"""Lazy loader of the CUDA kernels shipped as pipower/_gpu/*.cu.

Each .cu file becomes one `cupy.RawModule` (compiled by NVRTC for the device's architecture; CuPy also
keeps the binary in its on-disk kernel cache), built the first time one of its kernels is asked for and
cached per device id. Importing this module imports neither CuPy nor compiles anything.

KERNELS lists every kernel by name with the file defining it; a test parses the sources and checks the
list matches their `extern "C" __global__` functions, so a renamed kernel is caught without a GPU.
"""
from __future__ import annotations

import re
import threading

from ..errors import BackendError
from . import SOURCE_DIR

KERNELS: dict[str, str] = {
    # rmsnorm.cu
    "rms_norm_f32": "rmsnorm.cu",
    # ffn.cu: sparse FFN (hidden = act(gate x) * (up x) per neuron, then h @ down_t rows)
    "ffn_hidden_f16": "ffn.cu",
    "ffn_hidden_q8": "ffn.cu",
    "ffn_threshold_hidden_f16": "ffn.cu",
    "ffn_threshold_hidden_q8": "ffn.cu",
    "ffn_down_f16": "ffn.cu",
    "ffn_down_q8": "ffn.cu",
    "sum_partials_f32": "ffn.cu",
    "act_f32": "ffn.cu",
    # linear.cu: GEMV with compact weights, row dequantization
    "gemv_f16": "linear.cu",
    "gemv_q8": "linear.cu",
    "dequant_rows_f16": "linear.cu",
    "dequant_rows_q8": "linear.cu",
    # attention.cu: decode attention (split over keys, then combined), RoPE
    "attn_decode_partial": "attention.cu",
    "attn_decode_combine": "attention.cu",
    "rope_f32": "attention.cu",
}

OPTIONS = ("-std=c++14",)

_modules: dict[tuple[int, str], object] = {}     # (device id, file) -> cupy.RawModule
_functions: dict[tuple[int, str], object] = {}   # (device id, kernel) -> cupy.RawKernel
_lock = threading.Lock()


_INCLUDE = re.compile(r'^#include "([\w.]+\.cuh)"[ \t]*$', re.MULTILINE)


def source(file: str) -> str:
    """The CUDA source text of one shipped .cu file, its `#include "x.cuh"` lines replaced by the
    headers next to it (NVRTC compiles one string; the headers are pipower's own)."""
    def inline(m):
        return f'#line 1 "{m.group(1)}"\n' + (SOURCE_DIR / m.group(1)).read_text() + f'\n#line 1 "{file}"'
    return _INCLUDE.sub(inline, (SOURCE_DIR / file).read_text())


def get(name: str, device: int = 0):
    """The kernel `name` (a cupy.RawKernel) on device `device`, compiling its module on first use."""
    key = (device, name)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    try:
        file = KERNELS[name]
    except KeyError:
        raise KeyError(f"no GPU kernel named {name!r}; known: {', '.join(sorted(KERNELS))}") from None
    import cupy

    with _lock, cupy.cuda.Device(device):
        mod = _modules.get((device, file))
        if mod is None:
            mod = cupy.RawModule(code=source(file), options=OPTIONS)
            _modules[(device, file)] = mod
        try:
            fn = mod.get_function(name)        # compiles (NVRTC) and loads the module the first time
        except cupy.cuda.compiler.CompileException as exc:
            raise BackendError(f"compiling {file} for device {device} failed: {exc}") from exc
        _functions[key] = fn
    return fn
