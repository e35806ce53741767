"""GPU backend (CuPy RawKernels over the .cu files in this folder). CuPy is imported lazily, never when
pipower is imported: a machine without CuPy or without a device just reports the GPU as unavailable.
"""
from __future__ import annotations

from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent   # the .cu kernel sources ship here as package data

_status: tuple[bool, str | None] | None = None


def status() -> tuple[bool, str | None]:
    """(usable, reason it is not). Cached after the first call (importing CuPy takes ~a second)."""
    global _status
    if _status is None:
        _status = _probe()
    return _status


def available() -> bool:
    """True iff CuPy imports and sees at least one CUDA device."""
    return status()[0]


def cu_sources() -> list[Path]:
    """The kernel source files shipped with the package, sorted by name."""
    return sorted(SOURCE_DIR.glob("*.cu"))


def _probe() -> tuple[bool, str | None]:
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - ImportError, or a CuPy built for another CUDA failing at import
        return False, f"cupy not importable ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver / no device: CuPy raises CUDARuntimeError
        return False, f"no CUDA device ({type(exc).__name__}: {exc})"
    if n < 1:
        return False, "no CUDA device"
    return True, None
