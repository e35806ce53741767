"""One huge-page-backed allocation for many weight arrays.

Decode reads every FFN weight row once per token; the sparse FFN reads a scattered subset of rows. On
4 KiB pages each scattered row costs a TLB miss, and NumPy only asks the kernel for transparent huge
pages on allocations of 4 MiB or more, so small models' per-layer matrices (SmolLM2: 0.9 MB in q8) miss
out. Packing the matrices into one 2 MiB-aligned buffer puts them on huge pages where the system allows
(THP "madvise" or "always"): the 25% sparse FFN ran 15-20% faster on SmolLM2 (docs/dev/PERF_NOTES.md).

FFN bundles (`Arena.bundle_ffn`): one layer's gate, up and down_t rows of neuron i, then their scale rows,
in one span padded to a cache line:  [gate_i | up_i | down_i | gate_s_i | up_s_i | down_s_i]. The matrices
become row-strided views (every row still contiguous, so NumPy and every kernel read them as before). A
sparse FFN reads one contiguous span per active neuron instead of six scattered pieces, which the kernel
prefetches whole, two levels deep: the 25%-active FFN went from ~0.48 to ~0.33 of the dense FFN time on
Qwen2.5-0.5B-shaped layers (docs/dev/PERF_NOTES.md section 6).
"""
from __future__ import annotations

import ctypes

import numpy as np

from .quant import QMatrix, take_rows

HUGE_PAGE = 2 << 20
ALIGN = 64                      # every array starts on a cache line (the kernels' vector loads like it)


def array_parts(w) -> list[np.ndarray]:
    if isinstance(w, QMatrix):
        return [w.data] + ([w.scales] if w.scales is not None else [])
    return [w]


def padded_nbytes(nbytes: int) -> int:
    return nbytes + (-nbytes) % ALIGN


def _bundle_parts(gate, up, down_t) -> list[np.ndarray] | None:
    """[data..., scales...] of the FFN matrices in bundle order, or None if they cannot share bundles
    (different formats or shapes: such a layer keeps separate matrices)."""
    mats = [w for w in (gate, up, down_t) if w is not None]
    kinds = {(w.fmt, tuple(w.shape)) if isinstance(w, QMatrix) else ("array", w.shape) for w in mats}
    if len(kinds) != 1 or any(p.ndim != 2 for w in mats for p in array_parts(w)):
        return None
    parts = [array_parts(w) for w in mats]
    return [p[0] for p in parts] + [p[1] for p in parts if len(p) > 1]


def _span_bytes(parts: list[np.ndarray]) -> int:
    return padded_nbytes(sum(p.shape[1] * p.itemsize for p in parts))


def bundle_stride(gate, up, down_t) -> int | None:
    """Bytes of one neuron's span (a multiple of ALIGN), or None if these matrices cannot be bundled."""
    parts = _bundle_parts(gate, up, down_t)
    return None if parts is None else _span_bytes(parts)


def ffn_nbytes(gate, up, down_t, n_rows: int | None = None) -> int:
    """Arena bytes `bundle_ffn` (or, for matrices that cannot be bundled, `copy_weight`) will take for
    n_rows neurons (default: all)."""
    F = up.shape[0]
    n = F if n_rows is None else n_rows
    stride = bundle_stride(gate, up, down_t)
    if stride is None:
        return sum(padded_nbytes(p.nbytes // max(F, 1) * n)
                   for w in (gate, up, down_t) if w is not None for p in array_parts(w))
    return stride * n


def bundle_layers(layers):
    """Yield each layer's (gate, up, down_t) laid out as neuron bundles in one arena sized for all of
    them, layer by layer (a caller that stores each triple over the layer's matrices frees the originals
    as the arena fills). layers: objects with gate / up / down_t."""
    arena = Arena(sum(ffn_nbytes(lw.gate, lw.up, lw.down_t) for lw in layers))
    for lw in layers:
        release_free_memory()            # the originals the caller dropped (heap-allocated, see there)
        yield arena.bundle_ffn(lw.gate, lw.up, lw.down_t)
    release_free_memory()


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):     # not glibc (TypeError: Windows)
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand freed heap pages back to the system (glibc malloc_trim; a no-op elsewhere).

    A model build allocates float32 temporaries between the compact weights it keeps, and glibc raises
    its mmap threshold after the first large free, so later arrays of a few MB come from the heap and,
    freed, stay in the process's RSS. Trimming once per tensor and once per bundled layer costs
    milliseconds and took the 0.5B Qwen's q8 build from 1.16 GB peak RSS to 0.84 GB."""
    if _TRIM is not None:
        _TRIM(0)


def aligned_bytes(nbytes: int, align: int, zeroed: bool = False) -> np.ndarray:
    """uint8 [nbytes] starting on an `align`-byte boundary: a view into a buffer `align` bytes larger,
    which it keeps alive (NumPy's allocator aligns to 16 bytes; NumPy madvises large buffers for THP)."""
    raw = (np.zeros if zeroed else np.empty)(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]


class Arena:
    """A 2 MiB-aligned byte buffer with `copy_in(array) -> view` (C-contiguous, same dtype and shape)."""

    def __init__(self, nbytes: int):
        self._raw = aligned_bytes(nbytes, HUGE_PAGE)
        self._pos = 0
        self._end = nbytes

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

    def bundle_ffn(self, gate, up, down_t, rows: np.ndarray | None = None) -> tuple:
        """One layer's (gate or None, up, down_t) [F, D] -> arena-backed twins laid out as FFN bundles
        (module docstring); matrices that cannot share bundles are copied separately instead.
        rows: int neuron indices to keep (e.g. a hybrid plan's cold neurons), default all."""
        if rows is not None:
            rows = np.asarray(rows, dtype=np.intp)
        parts = _bundle_parts(gate, up, down_t)
        if parts is None:
            return tuple(self.copy_weight(w if rows is None or w is None else take_rows(w, rows))
                         for w in (gate, up, down_t))
        if rows is not None:
            parts = [p[rows] for p in parts]
        F, stride = parts[0].shape[0], _span_bytes(parts)
        block = self._reserve(F * stride).reshape(F, stride)          # [F, stride] bytes, row i = neuron i
        views, offset = [], 0
        for p in parts:
            width = p.shape[1] * p.itemsize
            view = block[:, offset:offset + width].view(p.dtype)   # [F, cols], row stride = stride bytes
            view[...] = p
            views.append(view)
            offset += width
        n = sum(w is not None for w in (gate, up, down_t))
        data, scales = views[:n], views[n:] or [None] * n
        out = iter(QMatrix(w.fmt, (F, w.shape[1]), d, s) if isinstance(w, QMatrix) else d
                   for w, d, s in zip([w for w in (gate, up, down_t) if w is not None], data, scales))
        return tuple(None if w is None else next(out) for w in (gate, up, down_t))

    def _reserve(self, n: int) -> np.ndarray:
        if self._pos + n > self._end:
            raise ValueError("arena too small")            # a sizing bug, never a user error
        view = self._raw[self._pos:self._pos + n]
        self._pos += padded_nbytes(n)
        return view

    def copy_in(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        view = self._reserve(a.nbytes).view(a.dtype).reshape(a.shape)
        view[...] = a
        return view
