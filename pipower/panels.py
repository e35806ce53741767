"""Weight panels: q4 / q8 matrices repacked 16 rows at a time for the integer-dot kernels.

A panel interleaves 16 rows in 4-byte chunks, so one 64-byte vector holds weights 4c .. 4c+3 of each of
the 16 rows and a VNNI dot against 4 broadcast activation bytes advances all 16 rows at once, with no
horizontal sums (pipower/_cpu/_panel_impl.h). The values are the QMatrix's, only moved:

    q8: data uint8 [P, nb, 8, 16, 4]: chunk c of row r of block b = int8 weight + 128
    q4: data uint8 [P, nb, 4, 16, 4]: the q4 bytes as stored (byte j: element j low, element j + 16 high),
        bytes 4v .. 4v+3 of row r in vector v
    scales float16 [P, nb, 16]
    q4m: data as q4, scales as above, offsets float16 [P, nb, 16] (o of each row's block, pipower.quant)
with P = ceil(N / 16) panels (rows past N: zero weights and scales), nb = K / 32 blocks. The arrays are
flattened to [P, nb, bytes per block] for the kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError
from .quant import QMatrix

PANEL = 16
FORMATS = ("q4", "q8", "q4m")
CHUNKS = {"q8": 8, "q4": 4, "q4m": 4}          # 64-byte vectors per block of a panel


@dataclass(frozen=True)
class Panels:
    """A q4 / q8 / q4m weight matrix [N, K] as panels of 16 rows (module docstring)."""
    fmt: str
    shape: tuple                     # (N, K) of the logical matrix
    data: np.ndarray                 # uint8 [P, K/32, 64 * CHUNKS[fmt]]
    scales: np.ndarray               # float16 [P, K/32, 16]
    offsets: np.ndarray | None = None  # float16 [P, K/32, 16] for q4m, else None

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes + (0 if self.offsets is None else self.offsets.nbytes)

    def __repr__(self) -> str:
        return f"Panels({self.fmt}, {self.shape[0]}x{self.shape[1]}, {self.nbytes / 2**20:.1f} MiB)"


def pack(m: QMatrix) -> Panels:
    """QMatrix (q4 / q8 / q4m) -> Panels with the same values."""
    if not isinstance(m, QMatrix) or m.fmt not in FORMATS:
        raise InvalidArgumentError(f"weight panels hold q4, q8 or q4m QMatrix weights, got {m!r}")
    N, K = m.shape
    nb, P = K // 32, -(-N // PANEL)
    C = CHUNKS[m.fmt]
    full = N // PANEL                                  # panels without padding rows
    # Written straight into the result through strided views: no padded or transposed temporary, so
    # packing a 150k-row output head costs its own bytes once more at most (first-load peak memory).
    data = np.zeros((P, nb, C, PANEL, 4), dtype=np.uint8)
    scales = np.zeros((P, nb, PANEL), dtype=np.float16)
    rows = m.data.view(np.uint8)
    for dst, src, n in ((data[:full], rows[:full * PANEL], PANEL), (data[full:], rows[full * PANEL:], N % PANEL)):
        if src.shape[0]:
            view = src.reshape(-1, n, nb, C, 4).transpose(0, 2, 3, 1, 4)                 # [p, nb, C, n, 4]
            if m.fmt == "q8":                          # int8 w -> w + 128 as uint8
                np.bitwise_xor(view, np.uint8(0x80), out=dst[..., :n, :])
            else:
                dst[..., :n, :] = view
    return Panels(m.fmt, (N, K), data.reshape(P, nb, C * 64), _pack_blockwise(m.scales, P),
                  None if m.offsets is None else _pack_blockwise(m.offsets, P))


def _pack_blockwise(sc: np.ndarray, P: int) -> np.ndarray:
    """Per-(row, block) float16 values [N, nb] -> [P, nb, 16] (rows past N: zeros)."""
    N, nb = sc.shape
    full = N // PANEL
    out = np.zeros((P, nb, PANEL), dtype=np.float16)
    out[:full] = sc[:full * PANEL].reshape(full, PANEL, nb).transpose(0, 2, 1)
    if N % PANEL:
        out[full, :, :N % PANEL] = sc[full * PANEL:].T
    return out


def rows(p: Panels, idx=None) -> QMatrix:
    """Rows idx (all by default) of the panels back as a row-major QMatrix (the inverse of pack)."""
    N, K = p.shape
    nb, C = K // 32, CHUNKS[p.fmt]
    idx = np.arange(N) if idx is None else np.asarray(idx, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= N):
        raise InvalidArgumentError(f"row index out of range for a {N}-row matrix")
    data = p.data.reshape(-1, nb, C, PANEL, 4)[idx // PANEL, :, :, idx % PANEL, :]        # [n, nb, C, 4]
    data = data.reshape(idx.size, nb * C * 4)
    if p.fmt == "q8":
        data = (data ^ np.uint8(0x80)).view(np.int8)
    scales = p.scales[idx // PANEL, :, idx % PANEL]                                          # [n, nb]
    offsets = None if p.offsets is None else np.ascontiguousarray(p.offsets[idx // PANEL, :, idx % PANEL])
    return QMatrix(p.fmt, (idx.size, K), np.ascontiguousarray(data), np.ascontiguousarray(scales), offsets)


def unpack(p: Panels) -> QMatrix:
    """Panels -> the row-major QMatrix they were packed from."""
    return rows(p)


def _stackable(ms) -> bool:
    """Matrices (QMatrix or Panels) that can lie back to back as one: two or more, the same q4 / q8
    format and K, every one but the last a whole number of panels."""
    m0 = ms[0]
    return (len(ms) >= 2 and m0.fmt in FORMATS and all(m.fmt == m0.fmt and m.shape[1] == m0.shape[1] for m in ms)
            and not any(m.shape[0] % PANEL for m in ms[:-1]))


def pack_adjacent(ms: list) -> list:
    """QMatrix list (q4 / q8) -> one Panels each, laid out back to back in one allocation when they can
    be (_stackable) so that joined() sees one matrix: projections of one input (q, k, v) then run as one
    kernel call over their rows, with the same bits per row. Otherwise each is packed on its own."""
    if not all(isinstance(m, QMatrix) for m in ms) or not _stackable(ms):
        return [pack(m) for m in ms]
    m0 = ms[0]
    whole = pack(QMatrix(m0.fmt, (sum(m.shape[0] for m in ms), m0.shape[1]),
                         np.concatenate([m.data for m in ms]), np.concatenate([m.scales for m in ms]),
                         None if m0.offsets is None else np.concatenate([m.offsets for m in ms])))
    out, p0 = [], 0
    for m in ms:
        p1 = p0 + -(-m.shape[0] // PANEL)
        out.append(Panels(m.fmt, m.shape, whole.data[p0:p1], whole.scales[p0:p1],
                          None if whole.offsets is None else whole.offsets[p0:p1]))
        p0 = p1
    return out


def _owner(a: np.ndarray):
    """The object that owns a's memory (the root array, or the buffer a cached model maps)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a if a.base is None else a.base


def _span(arrays: list):
    """One view over C-contiguous arrays that lie back to back in one owner's memory, or None."""
    a0, at = arrays[0], arrays[0].ctypes.data
    for a in arrays:
        if (not a.flags.c_contiguous or a.dtype != a0.dtype or a.shape[1:] != a0.shape[1:]
                or a.ctypes.data != at or _owner(a) is not _owner(a0)):
            return None
        at += a.nbytes
    rows = sum(a.shape[0] for a in arrays)
    return np.lib.stride_tricks.as_strided(a0, shape=(rows,) + a0.shape[1:], strides=a0.strides,
                                           writeable=False)


def joined(ps) -> Panels | None:
    """Panels that lie back to back in memory (pack_adjacent, or a prepared-model cache that kept them
    so) as one Panels of all their rows, in order; None if they do not."""
    if not all(type(p) is Panels for p in ps) or not _stackable(ps):
        return None
    p0 = ps[0]
    data, scales = _span([p.data for p in ps]), _span([p.scales for p in ps])
    offsets = None if p0.offsets is None else _span([p.offsets for p in ps])
    if data is None or scales is None or (p0.offsets is not None and offsets is None):
        return None
    return Panels(p0.fmt, (sum(p.shape[0] for p in ps), p0.shape[1]), data, scales, offsets)
