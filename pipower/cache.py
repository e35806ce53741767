"""KV cache: per layer, keys and values of every position seen so far.

Storage grows by doubling up to `max_len`, so a short chat does not allocate the full context
(Qwen2.5's 32k context would be ~800 MB of fp32 cache per sequence).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import ContextLengthError, InvalidArgumentError


def _host_zeros(layer: int, shape: tuple) -> np.ndarray:
    return np.zeros(shape, np.float32)


class KVCache:
    """alloc(layer, shape) -> zeroed float32 storage for one layer: the ops' `kv_buffer`, so a layer
    that runs on the GPU keeps its cache there (pipower.hybrid)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, initial: int = 256,
                 alloc: Callable[[int, tuple], np.ndarray] = _host_zeros):
        self.max_len = max_len
        self.length = 0                       # positions filled (same for every layer after a step)
        self._alloc = alloc
        cap = min(initial, max_len)
        # head-major so one KV head's keys are contiguous for the decode attention kernel
        shape = (n_kv_heads, cap, head_dim)
        self._k = [alloc(i, shape) for i in range(n_layers)]    # per layer [Hkv, capacity, hd]
        self._v = [alloc(i, shape) for i in range(n_layers)]

    @property
    def capacity(self) -> int:
        return self._k[0].shape[1]

    def _grow(self, needed: int) -> None:
        if needed > self.max_len:
            raise ContextLengthError(f"sequence of {needed} tokens exceeds the context length {self.max_len}")
        cap = self.capacity
        while cap < needed:
            cap = min(cap * 2, self.max_len)
        for store in (self._k, self._v):
            for i, old in enumerate(store):
                new = self._alloc(i, (old.shape[0], cap, old.shape[2]))
                new[:, :self.length] = old[:, :self.length]
                store[i] = new

    def update_and_fetch(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append k, v ([T, Hkv, hd]) at positions length .. length+T of `layer`; return views [Hkv, S, hd].

        `length` advances only in `advance()`, once per forward, after all layers have appended.
        """
        T = k.shape[0]
        end = self.length + T
        if end > self.capacity:
            self._grow(end)
        self._k[layer][:, self.length:end] = k.transpose(1, 0, 2)
        self._v[layer][:, self.length:end] = v.transpose(1, 0, 2)
        return self._k[layer][:, :end], self._v[layer][:, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget positions length.. (speculative decoding rolls back rejected draft tokens); the storage
        stays, and the next forward overwrites those positions."""
        if not 0 <= length <= self.length:
            raise InvalidArgumentError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0
