"""Next-token choice from a logits row: greedy, temperature, top-k, top-p (nucleus)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError as SamplingError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0    # 0 = greedy (argmax); llama.cpp's --temp
    top_k: int = 0              # 0 = no top-k cut
    top_p: float = 1.0          # 1 = no nucleus cut
    seed: int | None = None     # None = fresh entropy each call

    def __post_init__(self):
        if not self.temperature >= 0:
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits: float32 [V] -> token id."""
        if self.params.temperature == 0:
            return int(np.argmax(logits))
        order, probs = self._candidates(logits)
        return int(order[self.rng.choice(order.shape[0], p=probs)])

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The probabilities [V] (float64) this sampler draws from: temperature, then top-k, then top-p.
        Greedy (temperature 0) is the point mass on the argmax."""
        out = np.zeros(logits.shape[-1], dtype=np.float64)
        if self.params.temperature == 0:
            out[int(np.argmax(logits))] = 1.0
            return out
        order, probs = self._candidates(logits)
        out[order] = probs
        return out

    def _candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (token ids, most likely first; their renormalized probabilities) after top-k and top-p."""
        p = self.params
        z = logits.astype(np.float64) / p.temperature
        candidates = np.arange(z.shape[0])
        if p.top_k and p.top_k < z.shape[0]:
            candidates = np.argpartition(-z, p.top_k - 1)[:p.top_k]
        order = candidates[np.argsort(-z[candidates], kind="stable")]   # most likely first
        probs = np.exp(z[order] - z[order[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return order, probs
