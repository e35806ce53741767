"""`pipower.info()`: what this installation can run, and what it would use by default."""
from __future__ import annotations

import platform
import sys


def info() -> dict:
    """A JSON-able report: versions, backends available and the default, extension build, threads, BLAS, GPU."""
    import numpy as np
    from threadpoolctl import threadpool_info

    from . import _cpu, _gpu
    from .backend import default_threads
    gpu_ok, gpu_why = _gpu.status()
    default = "cython" if _cpu.AVAILABLE else "numpy"
    return {
        "pipower": __import__("pipower").__version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "backends": {
            "numpy": {"available": True},
            "cython": {"available": _cpu.AVAILABLE, "error": _cpu.IMPORT_ERROR, "build": _cpu.BUILD_INFO,
                       "integer_kernels": integer_kernels() if _cpu.AVAILABLE else None,
                       "silu": silu_kernel() if _cpu.AVAILABLE else None},
            "gpu": {"available": gpu_ok, "error": gpu_why, "devices": gpu_devices() if gpu_ok else []},
        },
        "default_backend": default,
        "fallback_warning": None if _cpu.AVAILABLE else
        "compiled CPU kernels missing: the NumPy reference backend runs instead (much slower)",
        "threads": default_threads(),
        "blas": [{k: p.get(k) for k in ("internal_api", "version", "num_threads", "architecture", "filepath")}
                 for p in threadpool_info() if p.get("user_api") == "blas"],
    }


def silu_kernel() -> str:
    """How the dense FFN's SiLU products run: compiled over NumPy's own exp loop, or NumPy's ufuncs and why."""
    from ._cpu import _kernels
    why = _kernels.SILU_UNAVAILABLE
    return "compiled, on NumPy's float32 exp loop" if not why else f"NumPy ufuncs (slower, same bits): {why}"


def integer_kernels() -> dict:
    """The integer-dot kernels this CPU and build run ("c", "avx2", "avxvnni", "avx512vnni"; chosen at run
    time by CPUID) and the one q4 / q8 projections use: the fastest, or PIPOWER_INT_ISA's ({"error": ...}
    when that variable names one this machine lacks)."""
    from ._cpu import _linear
    from .errors import InvalidArgumentError
    try:
        names, default = _linear.integer_kernels()
    except InvalidArgumentError as exc:
        return {"available": list(_linear.available_integer_kernels()), "error": str(exc)}
    return {"available": list(names), "default": default}


def gpu_devices() -> list[dict]:
    """Name and memory of each CUDA device (CuPy is importable when this is called)."""
    import cupy
    out = []
    for i in range(cupy.cuda.runtime.getDeviceCount()):
        props = cupy.cuda.runtime.getDeviceProperties(i)
        with cupy.cuda.Device(i):
            free, total = cupy.cuda.runtime.memGetInfo()
        name = props["name"]
        out.append({"id": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_total_bytes": int(total), "memory_free_bytes": int(free),
                    "compute_capability": f"{props['major']}.{props['minor']}"})
    return out


def model_info(model) -> dict:
    """What a loaded model is and how it is held in memory."""
    c, t = model.config, model.transformer
    return {
        "source": model.source, "arch": c.arch, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
        "ffn": c.intermediate_size, "heads": f"{c.num_attention_heads}/{c.num_key_value_heads}",
        "vocab": c.vocab_size, "backend": model.backend, "weights": model.weights,
        "weight_MiB_per_token": round(t.nbytes_per_token / 2**20, 1), "fingerprint": model.fingerprint[:16],
        "placement": model.plan.summary() if getattr(model, "plan", None) is not None else {"kind": "cpu"},
        "ffn_layout": ffn_layout(t),
    }


def ffn_layout(transformer) -> str:
    """How the host FFN matrices sit in memory: "bundled" (neuron bundles, pipower.arena: what the CPU
    engine lays out at load), "panels" (weight panels for integer dots, pipower.panels; the sparse FFN
    bundles them on first use), "separate" (three matrices) or "device" (no host FFN, e.g. all on a GPU)."""
    import numpy as np

    from .panels import Panels
    from .quant import QMatrix
    if any(isinstance(lw.up, Panels) for lw in transformer.layers):
        return "panels"
    layers = [lw for lw in transformer.layers if isinstance(lw.up, (QMatrix, np.ndarray))]
    if not layers:
        return "device"
    try:
        from ._cpu import linear_ops
    except ImportError:
        return "separate"
    kinds = {linear_ops.ffn_layout(lw.gate, lw.up, lw.down_t) for lw in layers}
    return kinds.pop() if len(kinds) == 1 else "mixed"
