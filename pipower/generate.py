"""The decode loop as generators: token ids, then text pieces with stop-sequence handling.

`prefill` and `decode_one_token` stay separate small steps (gpt-fast's shape) so the sparse and hybrid
engines can swap what happens inside a step without touching the loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .cache import KVCache
from .errors import ContextLengthError, InvalidArgumentError
from .sampling import Sampler

PREFILL_CHUNK = 512   # tokens per prefill call: bounds the [H, T, S] attention-score buffer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""          # "eos", "stop", "length", "context"
    ffn_sparsity: float = 0.0      # fraction of FFN neurons skipped (prefill + decode); 0 = dense
    drafted: int = 0               # speculative decoding: tokens the drafter proposed
    accepted: int = 0              # ... and how many of them the model kept

    @property
    def draft_acceptance(self) -> float:
        """accepted / drafted (0.0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # the first new token comes out of prefill; decode steps = new_tokens - 1
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


def prefill(transformer, ids: np.ndarray, cache: KVCache) -> np.ndarray:
    """Run the prompt through the model in chunks; -> logits of the last position [V]."""
    logits = None
    for s in range(0, len(ids), PREFILL_CHUNK):
        chunk = ids[s:s + PREFILL_CHUNK]
        logits = transformer.forward(chunk, cache, last_only=True)
    return logits[-1]


def decode_one_token(transformer, token: int, cache: KVCache) -> np.ndarray:
    return transformer.forward(np.array([token]), cache, last_only=True)[-1]


def start(transformer, prompt_ids, stats: GenerationStats, cache: KVCache | None = None
          ) -> tuple[KVCache, np.ndarray]:
    """Check the prompt and prefill it (timed into stats) -> (the cache, logits of its last position [V])."""
    ids = np.asarray(prompt_ids, dtype=np.int64)
    cache = cache or transformer.new_cache()
    if len(ids) == 0:
        raise InvalidArgumentError("empty prompt: give at least one token (most models want BOS)")
    if len(ids) >= cache.max_len:
        raise ContextLengthError(f"prompt of {len(ids)} tokens does not fit the context of {cache.max_len} "
                                 f"(one position is needed for the first new token)")
    stats.prompt_tokens = len(ids)
    t0 = time.perf_counter()
    logits = prefill(transformer, ids, cache)
    stats.prefill_seconds = time.perf_counter() - t0
    stats.stop_reason = "length"
    return cache, logits


def generate_ids(transformer, prompt_ids, sampler: Sampler, max_tokens: int, stop_ids: Iterable[int],
                 stats: GenerationStats, cache: KVCache | None = None) -> Iterator[int]:
    """Yield new token ids until a stop id (not yielded), max_tokens, or the context is full."""
    cache, logits = start(transformer, prompt_ids, stats, cache)
    stop_ids = frozenset(stop_ids)
    for n in range(max_tokens):
        token = sampler(logits)
        if token in stop_ids:
            stats.stop_reason = "eos"
            return
        stats.new_tokens += 1
        yield token
        if n + 1 == max_tokens:
            return
        if cache.length >= cache.max_len:
            stats.stop_reason = "context"
            return
        # time only the model step, not the consumer's work between yields
        t_step = time.perf_counter()
        logits = decode_one_token(transformer, token, cache)
        stats.decode_seconds += time.perf_counter() - t_step


def stream_text(token_iter: Iterator[int], stream_decoder, stop: Iterable[str], stats: GenerationStats
                ) -> Iterator[str]:
    """Turn token ids into text pieces; cut at the first stop string (not emitted).

    Text that might be the start of a stop string is held back until it is clearly not one.
    """
    stop = [s for s in stop if s]
    text, emitted = "", 0
    for token in token_iter:
        text += stream_decoder.feed(token)
        if stop:
            hits = [i for i in (text.find(s, max(emitted - len(s) + 1, 0)) for s in stop) if i >= 0]
            if hits:
                cut = min(hits)
                if cut > emitted:
                    yield text[emitted:cut]
                stats.stop_reason = "stop"
                if hasattr(token_iter, "close"):   # stop the model loop now, not at garbage collection
                    token_iter.close()
                return
            safe = len(text) - _held_back(text, stop)
        else:
            safe = len(text)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text += stream_decoder.flush()
    if len(text) > emitted:
        yield text[emitted:]


def _held_back(text: str, stop: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
