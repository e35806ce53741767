"""A drafter's reduced output vocabulary: logits over a subset of the token ids only.

A small model's output head is a large share of its decode step (Qwen2.5-Coder-0.5B: 151,936 x 896
weights, ~27% of the bytes a step reads), and a drafter only needs its argmax (or a sample). Drafting
over a subset - the first `size` ids, the tokenizer's stop ids, and every id already in the context -
makes each draft step cheaper. The verifying forward still runs the full head, so the generated text is
unchanged: a token outside the subset can only be missed by the draft (a rejection), never emitted
wrongly. For sampled drafts the draft distribution is the one over the subset (zero elsewhere), which
is what the speculative sampling rule needs.

Why the first ids: byte-level BPE vocabularies (Qwen2, LLaMA-3, GPT-2 style) number tokens in merge
order, and earlier merges are the more frequent pairs of the tokenizer's training corpus, so a prefix of
the ids is a frequency cut-off that needs no corpus. Identifiers of the code at hand enter through the
context.

Shapes: V vocabulary, D hidden size, n ids in the subset.
"""
from __future__ import annotations

import numpy as np

from . import panels
from .errors import InvalidArgumentError
from .panels import Panels
from .quant import QMatrix, take_rows


def head_rows(w, ids: np.ndarray, pack: bool):
    """Rows `ids` of an output head [V, D] in its own format -> [n, D]: Panels (repacked when `pack`,
    else a row-major QMatrix), QMatrix or float32 array."""
    if isinstance(w, Panels):
        rows = panels.rows(w, ids)
        return panels.pack(rows) if pack else rows
    if isinstance(w, (QMatrix, np.ndarray)):
        return take_rows(w, ids)
    raise InvalidArgumentError(f"a draft vocabulary needs the output head in host memory, got "
                               f"{type(w).__name__} (a draft vocabulary runs on the CPU engine)")


class DraftVocab:
    """Output ids a drafter computes logits for: the first `size` ids, `always` (stop ids), and every id
    seen in a context passed to cover(). `weights` are the head rows in the order of `ids`."""

    def __init__(self, lm_head, vocab_size: int, size: int, always=()):
        if size < 1:
            raise InvalidArgumentError(f"a draft vocabulary needs at least one id, got {size}")
        always = np.asarray(sorted(i for i in always if 0 <= i < vocab_size), dtype=np.int64)
        base = np.union1d(np.arange(min(size, vocab_size), dtype=np.int64), always)
        self.lm_head = lm_head
        self.vocab_size = vocab_size
        self._covered = np.zeros(vocab_size, dtype=bool)                     # [V]
        self._covered[base] = True
        self._base_ids = base
        self._base = head_rows(lm_head, base, pack=True)                   # [n_base, D], read every step
        self._extra_ids = np.zeros(0, dtype=np.int64)
        self._extra = None                                                  # [n_extra, D] row-major
        self.ids = base                                                     # [n] logits column -> token id

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def weights(self) -> tuple:
        return (self._base,) if self._extra is None else (self._base, self._extra)

    def cover(self, context: np.ndarray) -> None:
        """Add the ids of `context` (int [T]) that the subset lacks (rows gathered once per new id)."""
        ctx = np.asarray(context, dtype=np.int64)
        if ctx.size and (ctx.min() < 0 or ctx.max() >= self.vocab_size):
            raise InvalidArgumentError(f"token id out of range for a {self.vocab_size}-token vocabulary")
        new = np.unique(ctx[~self._covered[ctx]])
        if not new.size:
            return
        self._covered[new] = True
        self._extra_ids = np.concatenate([self._extra_ids, new])
        self._extra = head_rows(self.lm_head, self._extra_ids, pack=False)
        self.ids = np.concatenate([self._base_ids, self._extra_ids])

    def full_logits(self, logits: np.ndarray) -> np.ndarray:
        """Subset logits [n] -> [V] with -inf outside the subset (what a sampler takes)."""
        out = np.full(self.vocab_size, -np.inf, dtype=np.float32)
        out[self.ids] = logits
        return out
