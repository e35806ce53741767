"""Rotary position embedding frequencies, including HF's `rope_scaling` variants (linear, llama3).

Computed in float32 like HF's LlamaRotaryEmbedding, so angles round the same way as the oracle's.
"""
from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig


def inv_frequencies(config: ModelConfig) -> np.ndarray:
    """-> float32 [hd/2]: the angle per position of each rotated pair."""
    hd = config.head_dim
    exponents = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    return inv_freq.astype(np.float32)


def _llama3(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1's frequency-dependent scaling: long wavelengths divided by `factor`, short ones kept,
    a smooth blend in between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def cos_sin(inv_freq: np.ndarray, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions start .. start+n -> (cos, sin), each float32 [n, hd/2]."""
    pos = np.arange(start, start + n, dtype=np.float32)
    angles = np.outer(pos, inv_freq).astype(np.float32)
    return np.cos(angles), np.sin(angles)
