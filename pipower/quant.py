"""Compact in-memory weight formats and their NumPy references (quantize / dequantize).

Decode is memory-bound, so bytes per weight set tokens/s. Every format keeps a matrix [N, K] row-major
(row = one output neuron, K = the input dimension), so a row's bytes are contiguous for GEMV, for the
sparse FFN's row gathers and for the row-wise axpy over `down_t`.

| fmt | data                                   | scales                      | bytes/weight |
|-----|----------------------------------------|-----------------------------|--------------|
| f32 | float32 [N, K]                         | -                           | 4            |
| f16 | float16 [N, K]                         | -                           | 2            |
| q8  | int8 [N, K]; w = q * d                 | float16 [N, K/32] (d)       | 1.0625       |
| q4  | uint8 [N, K/2]; w = (nibble - 8) * d   | float16 [N, K/32] (d)       | 0.5625       |
| q4m | as q4; w = (nibble - 8) * d + o        | d, and offsets o alike      | 0.625        |

q8 is llama.cpp's Q8_0 rule (d = max|w| / 127, q = round(w / d)), q4 its Q4_0 rule (d = m / -8 with m the
signed value of largest magnitude, nibble = min(15, floor(w / d + 8.5))). q4 packing inside a 32-block,
as Q4_0: byte j (0..15) holds element j in its low nibble and element j + 16 in its high nibble.
q4m is an affine 4-bit grid per block (llama.cpp's Q4_1 and Q4_K: a scale and a minimum per 32 weights),
written with the nibble - 8 of q4 so that the integer dots run q4's kernel and add one offset term per
block (pipower.intdot). From floats it takes Q4_1's rule on the stored (float16) scale and offset:
d = (max - min) / 15, o = min + 8 d, nibble = clip(rint((w - o) / d) + 8, 0, 15); a GGUF Q4_1 or Q4_K
tensor converts to it directly, without requantizing (pipower.loader.native).
Error bounds per element: q8 |e| <= d / 2 = max|w| / 254 of its block; q4 |e| <= d = max|w| / 8 (d / 2
except at the clamped top end: the value opposite the extreme can only reach 7 d, as in Q4_0); q4m
|e| <= d / 2 plus the float16 rounding of o (<= |o| / 2048) at the ends of the range.
Scales are rounded to float16 *before* quantizing, so the bound holds for the stored scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError, UnsupportedModelError

FORMATS = ("f32", "f16", "q8", "q4", "q4m")
# what every row kernel takes (float dots, the sparse FFN's neuron rows, the devices' uploads); q4m has
# dense integer dots over weight panels only (pipower.panels)
ROW_FORMATS = ("f32", "f16", "q8", "q4")
BLOCK = 32


@dataclass(frozen=True)
class QMatrix:
    """A weight matrix [N, K] in one of FORMATS. Each row of data/scales is contiguous; arrays are
    C-contiguous except in FFN bundles (pipower.arena), where rows are strided views into one span."""
    fmt: str
    shape: tuple                     # (N, K) of the logical float matrix
    data: np.ndarray                 # see the module table
    scales: np.ndarray | None = None  # float16 [N, K / 32] for q8 / q4 / q4m
    offsets: np.ndarray | None = None  # float16 [N, K / 32] for q4m (o), else None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.data, self.scales, self.offsets) if a is not None)

    def __repr__(self) -> str:
        return f"QMatrix({self.fmt}, {self.shape[0]}x{self.shape[1]}, {self.nbytes / 2**20:.1f} MiB)"


def _blocks(w: np.ndarray) -> np.ndarray:
    N, K = w.shape
    if K % BLOCK:
        raise UnsupportedModelError(f"a {N}x{K} matrix cannot be stored as q8/q4/q4m: K={K} is not a multiple "
                                    f"of {BLOCK}; use weights='f16' or 'f32'")
    return w.reshape(N, K // BLOCK, BLOCK)


def quantize(w: np.ndarray, fmt: str) -> QMatrix:
    """float32 [N, K] -> QMatrix in `fmt`."""
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise InvalidArgumentError(f"quantize expects a 2-D matrix, got shape {w.shape}")
    if fmt == "f32":
        return QMatrix(fmt, w.shape, w)
    if fmt == "f16":
        return QMatrix(fmt, w.shape, w.astype(np.float16))
    _blocks(w)                                                        # K % 32 check, clear error
    rows = max(1, _CHUNK_FLOATS // w.shape[1])
    if w.shape[0] > rows:     # row chunks bound the float32 temporaries (a 150k-row embedding: ~4x 0.5 GB)
        parts = [_quantize_blocks(w[i:i + rows], fmt) for i in range(0, w.shape[0], rows)]
        return QMatrix(fmt, w.shape, *(None if p[0] is None else np.concatenate(p) for p in zip(*parts)))
    return QMatrix(fmt, w.shape, *_quantize_blocks(w, fmt))


_CHUNK_FLOATS = 1 << 24            # 64 MiB of float32 per quantization chunk


def _quantize_blocks(w: np.ndarray, fmt: str) -> tuple:
    """float32 [n, K] -> (data, scales, offsets) of q8 / q4 / q4m (see the module table; offsets None
    but for q4m)."""
    b = _blocks(w)                                                    # [n, K/32, 32]
    if fmt == "q8":
        d = (np.abs(b).max(axis=-1) / 127).astype(np.float16)         # [N, K/32]
        inv = _safe_inverse(d)
        q = np.rint(b * inv[..., None]).clip(-127, 127).astype(np.int8)
        return q.reshape(w.shape), d, None
    if fmt == "q4m":
        lo, hi = b.min(axis=-1), b.max(axis=-1)
        d = ((hi - lo) / 15).astype(np.float16)
        o = (lo + 8 * d.astype(np.float32)).astype(np.float16)
        inv = _safe_inverse(d)
        nib = np.clip(np.rint((b - o.astype(np.float32)[..., None]) * inv[..., None]) + 8, 0, 15).astype(np.uint8)
        packed = nib[..., :16] | (nib[..., 16:] << 4)
        return packed.reshape(w.shape[0], w.shape[1] // 2), d, o
    # q4: the signed extreme maps to -8, so the range [-8, 7] is used fully on one side
    idx = np.abs(b).argmax(axis=-1)[..., None]
    m = np.take_along_axis(b, idx, axis=-1)[..., 0]
    d = (m / -8).astype(np.float16)
    inv = _safe_inverse(d)
    nib = np.minimum(15, np.floor(b * inv[..., None] + 8.5)).astype(np.uint8)   # [N, K/32, 32]
    packed = nib[..., :16] | (nib[..., 16:] << 4)                                # [N, K/32, 16]
    return packed.reshape(w.shape[0], w.shape[1] // 2), d, None


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore"):
        return np.where(d32 != 0, 1 / d32, 0).astype(np.float32)


def take_rows(w, rows: np.ndarray):
    """Rows `rows` of a float32 array or QMatrix [N, K] -> the same format [len(rows), K], contiguous."""
    if isinstance(w, QMatrix):
        def pick(a):
            return None if a is None else np.ascontiguousarray(a[rows])
        return QMatrix(w.fmt, (len(rows), w.shape[1]), pick(w.data), pick(w.scales), pick(w.offsets))
    return np.ascontiguousarray(w[rows])


def dequantize(m: QMatrix, rows: np.ndarray | None = None) -> np.ndarray:
    """QMatrix -> float32 [N, K] (or only `rows`, int indices -> [len(rows), K])."""
    data = m.data if rows is None else m.data[rows]
    if m.fmt == "f32":
        return np.array(data, dtype=np.float32)
    if m.fmt == "f16":
        return data.astype(np.float32)
    d = (m.scales if rows is None else m.scales[rows]).astype(np.float32)     # [n, K/32]
    n, K = data.shape[0], m.shape[1]
    if m.fmt == "q8":
        vals = data.reshape(n, K // BLOCK, BLOCK).astype(np.float32)
    else:
        packed = data.reshape(n, K // BLOCK, BLOCK // 2)
        vals = np.concatenate([packed & 0xF, packed >> 4], axis=-1).astype(np.float32) - 8
    if m.fmt == "q4m":
        o = (m.offsets if rows is None else m.offsets[rows]).astype(np.float32)
        return (vals * d[..., None] + o[..., None]).reshape(n, K)
    return (vals * d[..., None]).reshape(n, K)
