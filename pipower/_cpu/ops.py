"""CythonOps: NumpyOps with the ops that pipower._cpu compiles, run on `n_threads` OpenMP threads.

Only what a kernel accelerates is overridden; everything else is the NumPy reference it inherits, and
tests compare each override to that reference.
"""
from __future__ import annotations

import numpy as np

from ..errors import BackendError
from ..ops import NumpyOps
from . import AVAILABLE, IMPORT_ERROR, kernels


class CythonOps(NumpyOps):
    name = "cython"

    def __init__(self, n_threads: int = 1):
        if not AVAILABLE:
            raise BackendError(f"the Cython extension pipower._cpu is not built ({IMPORT_ERROR})")
        super().__init__(n_threads)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """x: [..., D] (usually [T, D]), weight: [D] -> new float32 array shaped like x."""
        # No-ops (no copy) for the float32 C-contiguous arrays the graph passes.
        x = np.ascontiguousarray(x, dtype=np.float32)
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        x2 = x.reshape(-1, x.shape[-1])                         # [T, D]
        return kernels.rms_norm(x2, weight, eps, n_threads=self.n_threads).reshape(x.shape)
