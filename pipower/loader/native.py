"""GGUF 4-bit tensors straight into pipower's q4m format, block by block (no requantization), and the
per-matrix choice of weights="native".

q4m (pipower.quant) stores per block of 32 weights a float16 scale d and offset o with
w = (nibble - 8) d + o. Three GGUF types are this affine 4-bit grid already:

    Q4_0  block of 32:  f16 d, 16 bytes of nibbles;                   w = d (q - 8)   (o = 0: exact)
    Q4_1  block of 32:  f16 d, f16 m, 16 bytes of nibbles;            w = d q + m
    Q4_K  block of 256: f16 d, f16 dmin, 12 bytes of 6-bit scales and minimums (8 of each), 128 bytes of
          nibbles;      sub-block s of 32: w = (d sc_s) q - (dmin m_s)

Both keep their nibbles q exactly (re-packed to q4's order: byte i of a block holds element i low and
element i + 16 high; Q4_K's 64-element groups hold sub-block 2g in the low nibbles of 32 bytes and 2g + 1
in the high ones). The scale and offset are rounded to float16 once: Q4_1's d is float16 already and o =
m + 8 d; Q4_K's d sc_s takes up to 17 significant bits (relative rounding <= 2^-11, a 4096th of a step
at the ends of the range). The result is far closer to the file than requantizing its float values
(tests/test_native_q4m.py measures both).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import Q4_K

from ..quant import QMatrix

BLOCK = 32
Q4_1_BYTES = 20            # f16 d, f16 m, 16 bytes of nibbles
Q4_K_BYTES = 144           # f16 d, f16 dmin, 12 bytes of scales, 128 bytes of nibbles
Q4_0_BYTES = 18            # f16 d, 16 bytes of nibbles
CONVERTIBLE = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K)


def native_format(ggml_type: int) -> str:
    """weights="native": the format a matrix stored as ggml_type loads into. The file's 4-bit matrices
    keep their blocks (q4m); every other one is q8, the default format (Q5 / Q6 / Q8 types lose at most
    q8's rounding; F16 / F32 matrices are quantized to it)."""
    return "q4m" if ggml_type in CONVERTIBLE else "q8"


def _packed_q4(nib: np.ndarray) -> np.ndarray:
    """nibbles uint8 [..., 32] in element order -> q4's bytes [..., 16]."""
    return nib[..., :16] | (nib[..., 16:] << 4)


def from_q4_0(raw: np.ndarray, shape: tuple) -> QMatrix:
    """Q4_0 (w = d (q - 8)) bytes -> q4m with offset 0: exactly the file's values."""
    N, K = shape
    b = np.ascontiguousarray(raw).reshape(N, K // BLOCK, Q4_0_BYTES)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0]
    data = np.ascontiguousarray(b[..., 2:]).reshape(N, K // 2)
    return QMatrix("q4m", (N, K), data, d, np.zeros_like(d))


def from_q4_1(raw: np.ndarray, shape: tuple) -> QMatrix:
    """raw: the tensor's bytes, uint8 (any shape, rows of whole blocks); shape (N, K) -> q4m QMatrix."""
    N, K = shape
    b = np.ascontiguousarray(raw).reshape(N, K // BLOCK, Q4_1_BYTES)
    d = b[..., 0:2].copy().view(np.float16)[..., 0]                                 # [N, nb]
    m = b[..., 2:4].copy().view(np.float16)[..., 0]
    o = (m.astype(np.float32) + 8 * d.astype(np.float32)).astype(np.float16)
    data = np.ascontiguousarray(b[..., 4:]).reshape(N, K // 2)                       # Q4_1 packs as q4 does
    return QMatrix("q4m", (N, K), data, np.ascontiguousarray(d), o)


def from_q4_k(raw: np.ndarray, shape: tuple) -> QMatrix:
    """raw: the tensor's bytes, uint8; shape (N, K), K a multiple of 256 -> q4m QMatrix."""
    N, K = shape
    nsb = N * (K // 256)
    b = np.ascontiguousarray(raw).reshape(nsb, Q4_K_BYTES)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)                         # [nsb, 1]
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = Q4_K.get_scale_min(b[:, 4:16])                                          # [nsb, 8] each
    scale = (d * sc.astype(np.float32)).astype(np.float16)                           # [nsb, 8]
    o = (8 * scale.astype(np.float32) - dmin * mn.astype(np.float32)).astype(np.float16)
    qs = b[:, 16:].reshape(nsb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    nib = (qs & np.uint8(15)).reshape(nsb, 8, 32)                                    # sub-block s, element order
    data = _packed_q4(nib).reshape(N, K // 2)
    return QMatrix("q4m", (N, K), data, scale.reshape(N, K // BLOCK), o.reshape(N, K // BLOCK))


def to_q4m(raw: np.ndarray, ggml_type: int, shape: tuple) -> QMatrix:
    """A Q4_0, Q4_1 or Q4_K tensor's bytes -> q4m QMatrix [N, K]."""
    if ggml_type == GGMLQuantizationType.Q4_0:
        return from_q4_0(raw, shape)
    if ggml_type == GGMLQuantizationType.Q4_1:
        return from_q4_1(raw, shape)
    if ggml_type == GGMLQuantizationType.Q4_K:
        return from_q4_k(raw, shape)
    raise ValueError(f"no direct q4m conversion from {GGMLQuantizationType(ggml_type).name}")
