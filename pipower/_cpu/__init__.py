"""pipower's compiled CPU kernels (Cython + OpenMP), if they were built.

Importing this package never fails: when the extension is missing or broken, AVAILABLE is False and
IMPORT_ERROR says why; pipower.backend then refuses backend="cython" and `pipower info` reports it.

    AVAILABLE     bool
    IMPORT_ERROR  str | None   "ImportError: ..." when not AVAILABLE
    BUILD_INFO    dict         how the extension was compiled (empty when not AVAILABLE):
                               openmp, openmp_version, cflags, ldflags, compiler, cython, portable,
                               simd (instruction sets targeted), max_threads (omp_get_max_threads at import),
                               omp_wait_policy, gomp_spincount (as libgomp loaded them), path
    kernels       the extension module, or None
"""
from __future__ import annotations

import os

from ..threads import openmp_env_defaults

AVAILABLE: bool = False
IMPORT_ERROR: str | None = None
BUILD_INFO: dict = {}
kernels = None

# Before libgomp loads with the extension: idle OpenMP workers spin briefly, then sleep instead of
# spinning on a core that NumPy's BLAS pool needs (measurements in pipower/threads.py). A user's
# OMP_WAIT_POLICY / GOMP_SPINCOUNT wins.
openmp_env_defaults()

try:
    from . import _kernels as kernels
except Exception as exc:  # ImportError, or a broken .so (undefined symbol, wrong ABI) - report, don't raise
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    AVAILABLE = True
    BUILD_INFO = {
        "openmp": kernels.OPENMP,
        "openmp_version": kernels.OPENMP_VERSION,
        "cflags": kernels.CFLAGS,
        "ldflags": kernels.LDFLAGS,
        "compiler": kernels.COMPILER,
        "cython": kernels.CYTHON_VERSION,
        "portable": kernels.PORTABLE,
        "simd": kernels.SIMD,
        "max_threads": kernels.openmp_max_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "path": kernels.__file__,
    }

__all__ = ["AVAILABLE", "BUILD_INFO", "IMPORT_ERROR", "kernels"]
