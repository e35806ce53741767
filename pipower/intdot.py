"""Integer dot products over int8-quantized activations: the exact NumPy reference.

The compiled kernels (pipower/_cpu/_int8_impl.h) compute y = W x for q4 and q8 weights W by quantizing x
per 32-block to int8 (as llama.cpp quantizes activations to Q8_0) and summing 4/8-bit x int8 products
exactly in integers; the float work left is one fma per block in a fixed order. This module does the same
arithmetic bit for bit, so tests compare the kernels to it with `array_equal`, and it bounds the error
against the float path (`dot` vs `dequantize(W) @ x`). The rules (see the header for the same text):

    activations, per token and 32-block:  dx = max|x| / 127;  q = rint(x / dx) via x * (1 / dx)
    one row, per block b:                 isum_b = sum w * q   (w = nibble - 8, or the int8)  exact int32
    lane b % 16 of acc[16], in block order: acc = fma(float(isum_b), float32(dw_b * dx_b), acc)
    result: acc[i] + acc[i+8] -> + [i+4] -> + [i+2] -> s[0] + s[1]
    q4m (w = (nibble - 8) d + o per block) adds its offsets' term, kept apart from the lanes:
        xs_b = float32(float(sum_j q_j) * dx_b);  off = fma(o_b, xs_b, off) in block order from 0
        result = lane tree + off

Where the integer path sits next to the float path: its error is the activation rounding, at most
dx / 2 = max|x| / 254 per element of a block, i.e. relative ~0.4% per element, averaging out over a row
(tests/test_intdot.py bounds it); the float path keeps x exact.
"""
from __future__ import annotations

import numpy as np

from .quant import QMatrix

QB = 32      # elements per block
LANES = 16   # float accumulators of a row, block b goes to lane b % 16


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [T, K] (K a multiple of 32) -> (q int8 [T, K], dx float32 [T, K/32]).

    A block whose max |x| is not finite gets q = 0 and dx = that max, so NaN/inf reach the result."""
    x = np.asarray(x, dtype=np.float32)
    T, K = x.shape
    xb = x.reshape(T, K // QB, QB)
    amax = np.abs(xb).max(axis=-1)                                        # NaN propagates, as in C
    dx = (amax / np.float32(127)).astype(np.float32)
    finite = amax <= np.finfo(np.float32).max
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where((dx != 0) & finite, np.float32(1) / np.where(dx != 0, dx, 1), 0).astype(np.float32)
        scaled = (xb * inv[..., None]).astype(np.float32)
    q = np.clip(np.rint(np.where(finite[..., None], scaled, 0)), -127, 127).astype(np.int8)
    return q.reshape(T, K), dx


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c with ONE rounding (IEEE fma), elementwise, exactly.

    a * b is exact in float64; s = p + c rounds, and TwoSum gives the exact error e (p + c = s + e).
    Rounding s to float32 is then right except when s is exactly halfway between two float32 values and
    e != 0: the true value lies off the tie, on e's side."""
    with np.errstate(invalid="ignore", over="ignore"):       # inf * 0 and overflow behave as in C
        p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    bb = s - p
    e = (p - (s - bb)) + (c64 - bb)
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    toward = np.where(s > r64, np.inf, -np.inf).astype(np.float32)
    other = np.nextafter(r, toward)
    with np.errstate(invalid="ignore"):
        tie = (s != r64) & (np.abs(s - r64) * 2 == np.abs(other.astype(np.float64) - r64)) & (e != 0)
        # at a tie, the float32 on e's side of s is the correctly rounded fma
        pick_other = tie & ((other.astype(np.float64) - s) * e > 0)
        pick_r = tie & ((r64 - s) * e > 0)
    out = np.where(pick_other, other, r)
    return np.where(pick_r, r, out).astype(np.float32)


def lane_tree(acc: np.ndarray) -> np.ndarray:
    """acc float32 [..., 16] -> [...]: the kernels' fixed reduction order."""
    s8 = (acc[..., :8] + acc[..., 8:]).astype(np.float32)
    s4 = (s8[..., :4] + s8[..., 4:]).astype(np.float32)
    return ((s4[..., 0] + s4[..., 2]) + (s4[..., 1] + s4[..., 3])).astype(np.float32)


def q4_nibbles(m: QMatrix) -> np.ndarray:
    """q4 QMatrix -> its weights as signed ints (nibble - 8), int32 [N, K] in element order."""
    N = m.data.shape[0]
    p = m.data.reshape(N, -1, QB // 2).astype(np.int32)                 # [N, nb, 16]
    return np.concatenate([(p & 15) - 8, (p >> 4) - 8], axis=-1).reshape(N, -1)


FORMATS = ("q4", "q8", "q4m")   # weight formats with integer dot products


def dot(m: QMatrix, x: np.ndarray) -> np.ndarray:
    """Y [T, N] = W x over int8-quantized activations, bit for bit what the compiled kernels give.
    m: q4 or q8 QMatrix [N, K]; x: float32 [T, K] (or [K])."""
    if m.fmt not in FORMATS:
        raise ValueError(f"integer dot products are defined for q4, q8 and q4m weights, not {m.fmt}")
    x2 = np.atleast_2d(np.asarray(x, dtype=np.float32))
    q, dx = quantize_activations(x2)
    w = m.data.astype(np.int32) if m.fmt == "q8" else q4_nibbles(m)
    N, K = w.shape
    nb = K // QB
    # exact per-block integer sums [T, N, nb]
    isum = np.einsum("nbj,tbj->tnb", w.reshape(N, nb, QB), q.reshape(-1, nb, QB).astype(np.int32),
                     dtype=np.int64).astype(np.int32)
    scale = (m.scales.astype(np.float32)[None, :, :] * dx[:, None, :]).astype(np.float32)   # [T, N, nb]
    acc = np.zeros(isum.shape[:2] + (LANES,), dtype=np.float32)
    for g in range(0, nb, LANES):
        n = min(LANES, nb - g)
        acc[..., :n] = fma32(isum[..., g:g + n].astype(np.float32), scale[..., g:g + n], acc[..., :n])
    y = lane_tree(acc)
    if m.fmt == "q4m":
        xs = (q.reshape(-1, nb, QB).sum(axis=-1, dtype=np.int32).astype(np.float32) * dx).astype(np.float32)  # [T, nb]
        o = m.offsets.astype(np.float32)                                                  # [N, nb]
        off = np.zeros(isum.shape[:2], dtype=np.float32)                                  # [T, N]
        for b in range(nb):
            off = fma32(np.broadcast_to(o[None, :, b], off.shape), np.broadcast_to(xs[:, b, None], off.shape), off)
        y = (y + off).astype(np.float32)
    return y if np.ndim(x) == 2 else y[0]
