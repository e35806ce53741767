"""One huge-page-backed allocation for many weight arrays.

Decode reads every FFN weight row once per token; the sparse FFN reads a scattered subset of rows. On
4 KiB pages each scattered row costs a TLB miss, and NumPy only asks the kernel for transparent huge
pages on allocations of 4 MiB or more, so small models' per-layer matrices (SmolLM2: 0.9 MB in q8) miss
out. Packing the matrices into one 2 MiB-aligned buffer puts them on huge pages where the system allows
(THP "madvise" or "always"): the 25% sparse FFN ran 15-20% faster on SmolLM2 (docs/PERF_NOTES.md).
"""
from __future__ import annotations

import numpy as np

from .quant import QMatrix

HUGE_PAGE = 2 << 20
ALIGN = 64                      # every array starts on a cache line (the kernels' vector loads like it)


def array_parts(w) -> list[np.ndarray]:
    if isinstance(w, QMatrix):
        return [w.data] + ([w.scales] if w.scales is not None else [])
    return [w]


def padded_nbytes(nbytes: int) -> int:
    return nbytes + (-nbytes) % ALIGN


class Arena:
    """A 2 MiB-aligned byte buffer with `copy_in(array) -> view` (C-contiguous, same dtype and shape)."""

    def __init__(self, nbytes: int):
        self._raw = np.empty(nbytes + HUGE_PAGE, np.uint8)     # NumPy madvises large buffers for THP
        self._pos = (-self._raw.ctypes.data) % HUGE_PAGE
        self._end = self._pos + nbytes

    @classmethod
    def for_weights(cls, weights) -> Arena:
        """An arena just big enough for these float32 arrays / QMatrix objects (None entries skipped)."""
        return cls(sum(padded_nbytes(p.nbytes) for w in weights if w is not None for p in array_parts(w)))

    def copy_weight(self, w):
        """A float32 array or QMatrix -> its arena-backed twin (None stays None)."""
        if w is None:
            return None
        if isinstance(w, QMatrix):
            data = self.copy_in(w.data)
            scales = None if w.scales is None else self.copy_in(w.scales)
            return QMatrix(w.fmt, w.shape, data, scales)
        return self.copy_in(w)

    def copy_in(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        n = a.nbytes
        if self._pos + n > self._end:
            raise ValueError("arena too small")            # a sizing bug, never a user error
        view = self._raw[self._pos:self._pos + n].view(a.dtype).reshape(a.shape)
        view[...] = a
        self._pos += padded_nbytes(n)
        return view
