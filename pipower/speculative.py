"""Lossless speculative decoding: a drafter proposes tokens, the model verifies them in one batched forward.

The verifying forward over [pending token, d1..dk] gives, row by row, bitwise the logits that k + 1
single-token decode steps would give (the compiled backend's batch invariance, tests/test_cpu_batch.py),
so greedy output is token for token the plain greedy output whatever the drafter proposes; with
temperature > 0 the speculative sampling rule (Leviathan et al. 2023, Chen et al. 2023) keeps the output
distributed exactly as the model's own sampling. Drafters:

    LookupDrafter     prompt lookup: the latest earlier occurrence of the last n-gram of the context
                      proposes what followed it (no model; free when it hits, silent when it does not)
    ModelDrafter      a model with the same vocabulary drafts greedily or by sampling, on its own KV
                      cache: another pipower Model, or this model itself with a sparse FFN selector
                      ("sparse:S", "pred:FILE[:tau]": a self-draft whose accuracy only moves speed)
    ChainDrafter      the first drafter that proposes something (e.g. lookup, then sparse)

Shapes: V vocab; k drafted tokens per round; the context is prompt + emitted tokens, the last of which
(the "pending" token) is not yet in the model's KV cache.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

import numpy as np

from .cache import KVCache
from .errors import InvalidArgumentError
from .generate import GenerationStats, start
from .sampling import Sampler

log = logging.getLogger(__name__)
MAX_DRAFT = 16            # longest draft verified in one forward
# What verifying one more token costs, in decode steps: a T-token forward costs ~1 + VERIFY_COST (T - 1)
# steps (bench/batch.py, Qwen2.5-Coder-0.5B q8 on 2 cores: T = 4 ~1.6x and T = 8 ~2.5x a step). The
# starting value; a generation then measures its own forwards (VerifyCost), since the ratio depends on
# the weight format, the integer dots and how busy the machine is.
VERIFY_COST = 0.35
PRIOR_ACCEPTANCE = 0.7    # a drafter's acceptance rate before it has drafted anything
ACCEPTANCE_WEIGHT = 0.3   # weight of the latest round in the running acceptance estimate


class VerifyCost:
    """Running estimate of what one more verified token costs, relative to a one-token forward: the
    mean seconds of one-token forwards (rounds without a draft) and of the extra tokens of longer ones."""

    def __init__(self, prior: float = VERIFY_COST, weight: float = 0.2):
        self.prior, self.weight = prior, weight
        self.step = self.extra = None        # seconds: a one-token forward; one more token in a forward

    def add(self, tokens: int, seconds: float) -> None:
        if tokens == 1:
            self.step = seconds if self.step is None else self.step + self.weight * (seconds - self.step)
        elif self.step is not None:
            per = max(0.0, seconds - self.step) / (tokens - 1)
            self.extra = per if self.extra is None else self.extra + self.weight * (per - self.extra)

    @property
    def ratio(self) -> float:
        if self.step is None or self.extra is None or self.step <= 0:
            return self.prior
        return min(2.0, max(0.02, self.extra / self.step))


def draft_length(acceptance: float, room: int, cost: float = VERIFY_COST) -> int:
    """The draft length that maximizes expected tokens per unit of verify cost, when each drafted token
    is accepted with probability `acceptance` once the ones before it were: (1 + a + .. + a^k) tokens for
    1 + cost k steps. 0 = not worth drafting now."""
    best, best_gain, tokens = 0, 1.0, 1.0
    for k in range(1, min(room, MAX_DRAFT) + 1):
        tokens += acceptance ** k
        gain = tokens / (1 + cost * k)
        if gain > best_gain:
            best, best_gain = k, gain
    return best


class LookupDrafter:
    """Prompt lookup decoding: match the last n tokens (n = max_ngram .. 1) to their latest earlier
    occurrence in the context and propose the tokens that followed it. Deterministic proposals, i.e.
    a draft distribution that is a point mass on each proposed token."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def propose(self, context: np.ndarray, k: int, sampler: Sampler | None = None) -> tuple[list[int], None]:
        L = context.shape[0]
        for n in range(min(self.max_ngram, L - 1), 0, -1):
            # windows start at i <= L - 1 - n, so each has a continuation context[i + n]
            windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)
            hits = np.flatnonzero((windows == context[L - n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return context[start:start + k].tolist(), None
        return [], None

    def rollback(self, context_len: int) -> None:
        """Nothing to undo: the lookup keeps no state."""


class ModelDrafter:
    """Drafts with a transformer on its own KV cache: another model with the same vocabulary, or the
    target model's own weights under a sparse FFN selector (the selector is set only while drafting).
    Greedy drafts take the argmax; sampled drafts sample with the generation's own settings and return
    the distributions they sampled from (needed by the acceptance rule)."""

    def __init__(self, transformer, selector=None, name: str = "model", max_len: int | None = None):
        self.transformer = transformer
        self.selector = selector
        self.name = name
        self.cache = transformer.new_cache(max_len)
        self.tokens: list[int] = []          # what self.cache holds, position by position

    def _forward(self, ids) -> np.ndarray:
        t = self.transformer
        saved, t.ffn_neurons = t.ffn_neurons, self.selector
        try:
            return t.forward(np.asarray(ids, dtype=np.int64), self.cache, last_only=True)[-1]
        finally:
            t.ffn_neurons = saved

    def propose(self, context: np.ndarray, k: int, sampler: Sampler | None = None):
        """-> (k draft tokens, their draft distributions [k, V] or None for greedy)."""
        ctx = context.tolist()
        keep = 0                                  # longest prefix of the cache that the context shares
        for a, b in zip(self.tokens, ctx):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ctx) - 1)            # the last context token is fed below, for its logits
        self.cache.truncate(keep)
        del self.tokens[keep:]
        k = min(k, self.cache.max_len - len(ctx))
        if k <= 0:
            return [], None
        logits = self._forward(ctx[keep:])
        self.tokens.extend(ctx[keep:])
        drafts, dists = [], []
        greedy = sampler is None or sampler.params.temperature == 0
        for i in range(k):
            if greedy:
                tok = int(np.argmax(logits))
            else:
                q = sampler.distribution(logits)
                tok = int(sampler.rng.choice(q.shape[0], p=q))
                dists.append(q)
            drafts.append(tok)
            if i + 1 < k:
                logits = self._forward([tok])
                self.tokens.append(tok)
        return drafts, (None if greedy else np.stack(dists))

    def rollback(self, context_len: int) -> None:
        """Forget cached positions past context_len (they held rejected drafts)."""
        if len(self.tokens) > context_len:
            self.cache.truncate(context_len)
            del self.tokens[context_len:]


class ChainDrafter:
    """Ask each drafter in turn; the first non-empty proposal is the draft."""

    def __init__(self, drafters: list):
        self.drafters = drafters
        self.name = "+".join(d.name for d in drafters)

    def propose(self, context: np.ndarray, k: int, sampler: Sampler | None = None):
        for d in self.drafters:
            drafts, dists = d.propose(context, k, sampler)
            if drafts:
                return drafts, dists
        return [], None

    def rollback(self, context_len: int) -> None:
        for d in self.drafters:
            d.rollback(context_len)


def accept_greedy(drafts: list[int], logits: np.ndarray) -> tuple[int, int]:
    """logits [k+1, V] of the verifying forward -> (drafts accepted, the model's next token after them)."""
    targets = np.argmax(logits, axis=-1)
    n = 0
    while n < len(drafts) and drafts[n] == int(targets[n]):
        n += 1
    return n, int(targets[n])


def accept_sampled(drafts: list[int], draft_dists, logits: np.ndarray, sampler: Sampler) -> tuple[int, int]:
    """The speculative sampling rule. Draft token i (drawn from q_i; a point mass for deterministic
    drafters) is kept with probability min(1, p_i(d) / q_i(d)), p_i the model's own sampling distribution
    at that position; at the first rejection the next token comes from max(0, p_i - q_i), renormalized;
    if every draft is kept, from p_{k+1}. The emitted tokens are then distributed exactly as sampling
    the model token by token. -> (drafts accepted, next token)."""
    rng = sampler.rng
    for i, d in enumerate(drafts):
        p = sampler.distribution(logits[i])
        if draft_dists is None:
            q = np.zeros_like(p)
            q[d] = 1.0
        else:
            q = draft_dists[i]
        if q[d] > 0 and rng.random() < min(1.0, p[d] / q[d]):
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        if total <= 0:                      # p == q: cannot happen after a rejection, but stay safe
            residual, total = p, p.sum()
        return i, int(rng.choice(residual.shape[0], p=residual / total))
    return len(drafts), int(rng.choice(logits.shape[-1], p=sampler.distribution(logits[len(drafts)])))


def speculative_ids(transformer, prompt_ids, sampler: Sampler, max_tokens: int, stop_ids: Iterable[int],
                    stats: GenerationStats, drafter, cache: KVCache | None = None) -> Iterator[int]:
    """Like generate.generate_ids (same tokens for greedy, same distribution when sampling), with drafts
    verified k + 1 at a time. stats gains drafted / accepted counts."""
    cache, logits = start(transformer, prompt_ids, stats, cache)
    stop_ids = frozenset(stop_ids)
    if max_tokens == 0:
        return
    token = sampler(logits)
    context = [int(i) for i in prompt_ids]
    acceptance = PRIOR_ACCEPTANCE
    cost = VerifyCost()
    emitted = 0
    while True:
        if token in stop_ids:
            stats.stop_reason = "eos"
            return
        stats.new_tokens += 1
        emitted += 1
        yield token
        if emitted == max_tokens:
            return
        if cache.length >= cache.max_len:          # no position left for the pending token
            stats.stop_reason = "context"
            return
        context.append(token)
        t_step = time.perf_counter()
        room = draft_length(acceptance, min(max_tokens - emitted, cache.max_len - cache.length - 1), cost.ratio)
        drafts, dists = drafter.propose(np.asarray(context, dtype=np.int64), room, sampler) if room > 0 \
            else ([], None)
        drafts = drafts[:room]
        base = cache.length
        t_fwd = time.perf_counter()
        rows = transformer.forward(np.asarray([token] + drafts, dtype=np.int64), cache, last_only=False)
        cost.add(1 + len(drafts), time.perf_counter() - t_fwd)
        if sampler.params.temperature == 0:
            n, nxt = accept_greedy(drafts, rows)
        else:
            n, nxt = accept_sampled(drafts, dists, rows, sampler)
        cache.truncate(base + 1 + n)                # pending token + accepted drafts stay cached
        drafter.rollback(len(context) + n)
        stats.decode_seconds += time.perf_counter() - t_step
        stats.drafted += len(drafts)
        stats.accepted += n
        if drafts:   # per-token acceptance of this round: n accepted, then one rejection (if any)
            rate = n / (n + 1) if n < len(drafts) else (n + 1) / (n + 2)
            acceptance += ACCEPTANCE_WEIGHT * (rate - acceptance)
        else:        # no draft this round: drift back towards the prior, so drafting is tried again
            acceptance += 0.1 * (PRIOR_ACCEPTANCE - acceptance)
        for d in drafts[:n]:
            if d in stop_ids:
                stats.stop_reason = "eos"
                return
            stats.new_tokens += 1
            emitted += 1
            context.append(d)
            yield d
            if emitted == max_tokens:
                return
        token = nxt


# ---- drafters from their names (API and CLI) -------------------------------------------------------
DRAFT_HELP = ("lookup (prompt lookup), sparse:S (this model with an oracle FFN selector calibrated to skip "
              "fraction S of the neurons), act:TAU (oracle selector at one tau_act), pred:FILE[:TAU] (this "
              "model with trained predictors at tau_pred TAU, default 0), or several joined by '+' (the first "
              "that proposes something drafts, e.g. lookup+sparse:0.5); in the library also a loaded Model "
              "with the same vocabulary")


def make_drafter(model, spec):
    """A drafter for `model` from a spec: a name (DRAFT_HELP), a pipower Model, or a list of these."""
    if isinstance(spec, (list, tuple)):
        parts = [make_drafter(model, s) for s in spec]
        return parts[0] if len(parts) == 1 else ChainDrafter(parts)
    if not isinstance(spec, str):
        if not hasattr(spec, "transformer"):
            raise InvalidArgumentError(f"draft must be a name ({DRAFT_HELP}) or a pipower Model, got "
                                       f"{type(spec).__name__}")
        check_same_vocabulary(model, spec)
        return ModelDrafter(spec.transformer, spec.transformer.ffn_neurons, name=f"model:{spec.source}")
    if "+" in spec:
        return make_drafter(model, [s for s in spec.split("+")])
    from .sparse.modes import make_selector
    kind, _, arg = spec.partition(":")
    try:
        if kind == "lookup" and not arg:
            return LookupDrafter()
        if kind == "sparse" and arg:
            selector = make_selector(model, target_sparsity=float(arg))
        elif kind == "act" and arg:
            selector = make_selector(model, act_threshold=float(arg))
        elif kind == "pred" and arg:
            path, _, tau = arg.rpartition(":") if _looks_like_tau(arg) else (arg, "", "0")
            selector = make_selector(model, predictors=path, pred_threshold=float(tau))
        else:
            raise ValueError
    except ValueError:
        raise InvalidArgumentError(f"unknown draft {spec!r}; use {DRAFT_HELP}") from None
    return ModelDrafter(model.transformer, selector, name=spec)


def _looks_like_tau(arg: str) -> bool:
    head, sep, tail = arg.rpartition(":")
    if not sep or not head:
        return False
    try:
        float(tail)
    except ValueError:
        return False
    return True


def check_verifier(ops) -> None:
    """Speculative output equals plain output because the compiled CPU backend is batch invariant: refuse
    the device engines (their batched kernels are not), warn on the NumPy reference (BLAS rounds a
    batch differently from one token, so greedy text may differ in rare near-ties)."""
    from .ops import NumpyOps
    if not isinstance(ops, NumpyOps):
        raise InvalidArgumentError("speculative decoding (draft=) runs on the CPU engine only: its "
                                   "verification needs the compiled backend's batch invariance")
    if getattr(ops, "name", "") == "numpy":
        log.warning("speculative decoding on the NumPy reference backend: batched verification rounds "
                    "differently from single steps, so greedy text can differ from plain decoding in rare "
                    "near-ties (the compiled backend is bitwise batch invariant)")


def check_same_vocabulary(model, other) -> None:
    """A drafting model must speak the target's token ids: same vocabulary size and token strings."""
    a, b = model.tokenizer, other.tokenizer
    if model.config.vocab_size != other.config.vocab_size:
        raise InvalidArgumentError(f"the draft model has {other.config.vocab_size} token ids, the model "
                                   f"{model.config.vocab_size}: a draft model needs the same tokenizer")
    if a is None or b is None:
        raise InvalidArgumentError("a draft model needs a tokenizer on both models to check that they share "
                                   "the vocabulary")
    if a.vocab_size != b.vocab_size or any(a.token_text(i) != b.token_text(i) for i in range(a.vocab_size)):
        raise InvalidArgumentError("the draft model's tokenizer differs from the model's (token strings do not "
                                   "match): a draft model needs the same tokenizer")
