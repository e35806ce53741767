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
    ChainDrafter      several drafters (e.g. lookup + another model); each round the one expected to give
                      the most tokens per unit of time drafts (propose_round: per-drafter acceptance,
                      lookup rated by its match length, drafting cost measured)

Shapes: V vocab; k drafted tokens per round; the context is prompt + emitted tokens, the last of which
(the "pending" token) is not yet in the model's KV cache.
"""
from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable, Iterator

import numpy as np

from .cache import KVCache
from .draft_vocab import DraftVocab
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
# Longest n-gram prompt lookup matches. Simulated on the stored greedy HumanEval outputs (chat, all 164
# problems, the draft policy below, measured verify costs): 8 instead of 3 gives Qwen2.5-Coder-1.5B 9%
# more tokens per unit of time and 0.5B 8% (each match length keeps its own acceptance record, and long
# matches earn long drafts); 12 or 16 add nothing.
MAX_NGRAM = 8
PRIOR_ACCEPTANCE = 0.7    # a drafter's acceptance rate before it has drafted anything
PRIOR_WEIGHT = 2.0        # ... worth this many observed draft tokens
MEMORY = 0.85             # each round keeps this share of a drafter's earlier acceptance counts


class VerifyCost:
    """Running estimate of what a verifying forward costs, in one-token forwards (steps), from the
    generation's own forwards: the mean seconds of a one-token forward and of each T-token forward seen.
    The cost is far from linear in T: the first extra token costs most (Qwen2.5-Coder-1.5B q8, 2 threads:
    T = 2 / 4 / 8 / 16 cost 1.18 / 1.27 / 1.39 / 2.25 steps), so a per-token price fitted to short
    forwards kept drafts short when longer ones were nearly free."""

    def __init__(self, prior: float = VERIFY_COST, weight: float = 0.2):
        self.prior, self.weight = prior, weight
        self.step = None                     # seconds of a one-token forward
        self.seconds: dict[int, float] = {}  # T >= 2 -> seconds of a T-token forward
        self._curve: list[float] | None = None   # forward_steps(0 .. MAX_DRAFT), until the next add

    def add(self, tokens: int, seconds: float) -> None:
        self._curve = None
        if tokens == 1:
            self.step = seconds if self.step is None else self.step + self.weight * (seconds - self.step)
        elif tokens > 1:
            old = self.seconds.get(tokens)
            self.seconds[tokens] = seconds if old is None else old + self.weight * (seconds - old)

    def forward_steps(self, drafts: int) -> float:
        """What verifying `drafts` tokens costs: a forward over drafts + 1 tokens, in steps. Measured
        sizes as measured; between two, interpolated; past the largest, its line from one step (the
        mean extra cost per token so far); none measured (or no step yet): 1 + prior * drafts.
        draft_plan asks for every length each round: the curve is worked out once per measurement."""
        if not 0 <= drafts <= MAX_DRAFT:
            return self._steps([drafts + 1])[0]
        if self._curve is None:
            self._curve = self._steps(range(1, MAX_DRAFT + 2))
        return self._curve[drafts]

    def _steps(self, sizes) -> list[float]:
        """The cost in steps of a forward over each of `sizes` tokens (forward_steps' rules)."""
        if self.step is None or self.step <= 0 or not self.seconds:
            return [1.0 + self.prior * max(T - 1, 0) for T in sizes]
        known = {n: max(1.0, s / self.step) for n, s in self.seconds.items()}
        out = []
        for T in sizes:
            if T <= 1:
                out.append(1.0)
                continue
            if T in known:
                out.append(known[T])
                continue
            below = max((n for n in known if n < T), default=1)
            above = min((n for n in known if n > T), default=None)
            c_below = known.get(below, 1.0)
            if above is None:
                out.append(c_below + (c_below - 1.0) / max(below - 1, 1) * (T - below))
            else:
                out.append(c_below + (known[above] - c_below) * (T - below) / (above - below))
        return out


# The verify cost curve of each transformer this process has drafted for: measured once before its first
# drafted generation (calibrate_verify_cost), then kept up to date by every generation's forwards.
_VERIFY_COSTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
CALIBRATION_TOKENS = (2, 3, 4, 6, 8, 12, MAX_DRAFT + 1)


def calibrate_verify_cost(transformer, repeats: int = 2) -> VerifyCost:
    """A VerifyCost for `transformer` with every verify size measured: forwards over T new tokens
    (CALIBRATION_TOKENS, and one-token steps) on a scratch cache after a 32-token context, interleaved,
    `repeats` rounds after a warm-up. Learning the curve from a generation's own forwards alone left the
    sizes it never tried at a guess, and a guess from short forwards (the costliest per token) kept
    drafts short: simulated on HumanEval, drafts with the measured curve give 1.5B 7% more tokens per
    unit of time. Costs ~30 decode steps, once per model and process (verify_cost_for)."""
    cost = VerifyCost()
    sizes = (1,) + CALIBRATION_TOKENS
    limit = getattr(transformer.config, "max_position_embeddings", None) or 4096
    context = max(1, min(32, limit - max(sizes)))
    cache = transformer.new_cache(context + max(sizes))
    ids = (np.arange(context + max(sizes), dtype=np.int64) * 7919 + 11) % transformer.config.vocab_size
    transformer.forward(ids[:context], cache)
    for r in range(repeats + 1):
        for T in sizes:
            t0 = time.perf_counter()
            transformer.forward(ids[context:context + T], cache, last_only=False)
            seconds = time.perf_counter() - t0
            cache.truncate(context)
            if r:                                      # round 0 warms up
                cost.add(T, seconds)
    log.info("verify cost in decode steps: %s", ", ".join(f"T={T} {cost.forward_steps(T - 1):.2f}"
                                                        for T in sizes[1:]))
    return cost


def verify_cost_for(transformer) -> VerifyCost:
    """The transformer's verify cost curve: calibrated on first use, then shared by its generations."""
    cost = _VERIFY_COSTS.get(transformer)
    if cost is None:
        cost = _VERIFY_COSTS[transformer] = calibrate_verify_cost(transformer)
    return cost


def draft_plan(acceptance: float, room: int, cost=VERIFY_COST, draft_cost: float = 0.0,
               fixed: float = 0.0) -> tuple[int, float]:
    """-> (the draft length that maximizes expected tokens per unit of time, that rate relative to plain
    decoding) when each drafted token is accepted with probability `acceptance` once the ones before it
    were: (1 + a + .. + a^k) tokens for verify(k) + fixed + draft_cost k steps. cost: what verifying k
    drafts costs in steps, a function of k (VerifyCost.forward_steps) or a number c for 1 + c k;
    draft_cost: drafting one token; fixed: what a round costs the drafter before its first draft, e.g.
    catching its cache up with tokens accepted since it last ran; all in decode steps of the model.
    (0, 1.0) = not worth drafting now."""
    verify = cost if callable(cost) else (lambda k: 1.0 + cost * k)
    best, best_gain, tokens = 0, 1.0, 1.0
    for k in range(1, min(room, MAX_DRAFT) + 1):
        tokens += acceptance ** k
        gain = tokens / (verify(k) + fixed + draft_cost * k)
        if gain > best_gain:
            best, best_gain = k, gain
    return best, best_gain


def draft_length(acceptance: float, room: int, cost: float = VERIFY_COST, draft_cost: float = 0.0,
                 fixed: float = 0.0) -> int:
    """draft_plan's length."""
    return draft_plan(acceptance, room, cost, draft_cost, fixed)[0]


class DrafterRecord:
    """What one drafter has shown in this generation: its per-token acceptance. Acceptance counts each accepted draft token a success and the first rejected one
    a failure; a draft accepted whole has no failure, so short drafts that always pass raise the estimate
    (a per-round rate such as n / (n + 1) would cap it near the draft's own length and keep drafts short:
    measured, Qwen2.5-Coder-0.5B drafting for 1.5B held 2 tokens per round at 96% acceptance)."""

    def __init__(self):
        self.accepted = self.rejected = 0.0      # decayed counts

    @property
    def acceptance(self) -> float:
        return (self.accepted + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (self.accepted + self.rejected + PRIOR_WEIGHT)

    def add(self, drafted: int, accepted: int) -> None:
        self.accepted = MEMORY * self.accepted + accepted
        self.rejected = MEMORY * self.rejected + (1 if accepted < drafted else 0)

    def idle(self) -> None:
        """A round without this drafter: its record fades towards the prior, so it is tried again."""
        self.accepted *= MEMORY
        self.rejected *= MEMORY


def leaf_drafters(drafter) -> list:
    """The drafters a chain chooses from (a plain drafter: itself)."""
    return list(drafter.drafters) if isinstance(drafter, ChainDrafter) else [drafter]


def propose_round(drafter, context: np.ndarray, room: int, sampler, records: dict, cost: "VerifyCost"):
    """Draft for one verifying forward. Each drafter is rated by the tokens per unit of time it is
    expected to give (draft_plan: its acceptance so far, the verify cost and its own drafting cost); the
    best one drafts, for its best length. Prompt lookup costs nothing to ask, so it proposes first and is
    rated by the length of the n-gram it matched (a 3-gram match is a far better bet than a 1-gram one,
    each has its own record); a model drafter is only run when chosen.
    -> (drafts, their distributions or None, the record key of the drafter that drafted or None).
    records: key -> DrafterRecord, kept for one generation."""
    step = cost.step
    best = (1.0, None, None, None)                    # (rate, leaf, key, drafts, or the length to run)
    for leaf in leaf_drafters(drafter):
        if isinstance(leaf, LookupDrafter):
            drafts, _ = leaf.propose(context, room, sampler)
            if not drafts:
                continue
            key = (id(leaf), leaf.matched)
            rec = records.setdefault(key, DrafterRecord())
            k, rate = draft_plan(rec.acceptance, len(drafts), cost.forward_steps)
            candidate = (rate, leaf, key, drafts[:k])
        else:
            key = (id(leaf), None)
            rec = records.setdefault(key, DrafterRecord())
            per_token = getattr(leaf, "seconds_per_token", None)
            if per_token is None:
                # never timed: its first round is free, so that its step gets timed
                k, rate = draft_plan(rec.acceptance, room, cost.forward_steps)
            elif step is None:
                # its cost is known but not the model's own step: the drafter cannot be priced, so this
                # round goes without it (a one-token forward, which times the step); a drafter that was
                # taken as free here kept drafting at any cost (measured: sparse self-drafts whose step
                # cost 1.5 dense steps made generation 2x slower)
                continue
            else:
                k, rate = draft_plan(rec.acceptance, room, cost.forward_steps, per_token / step,
                                     leaf.catch_up_seconds(context) / step)
            candidate = (rate, leaf, key, k)
        if rate > best[0]:
            best = candidate
    rate, leaf, key, plan = best
    if leaf is None:
        return [], None, None
    if not isinstance(plan, int):                     # lookup: already proposed
        return plan, None, key
    drafts, dists = leaf.propose(context, plan, sampler)
    drafts = drafts[:plan]
    return drafts, (None if dists is None else dists[:len(drafts)]), (key if drafts else None)


class LookupDrafter:
    """Prompt lookup decoding: match the last n tokens (n = max_ngram .. 1) to their latest earlier
    occurrence in the context and propose the tokens that followed it. Deterministic proposals, i.e.
    a draft distribution that is a point mass on each proposed token."""

    name = "lookup"

    def __init__(self, max_ngram: int = MAX_NGRAM):
        self.max_ngram = max_ngram
        self.matched = 0          # length of the n-gram the last proposal matched (0: none)

    def propose(self, context: np.ndarray, k: int, sampler: Sampler | None = None) -> tuple[list[int], None]:
        L = context.shape[0]
        for n in range(min(self.max_ngram, L - 1), 0, -1):
            # windows start at i <= L - 1 - n, so each has a continuation context[i + n]
            windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)
            hits = np.flatnonzero((windows == context[L - n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                self.matched = n
                return context[start:start + k].tolist(), None
        self.matched = 0
        return [], None

    def rollback(self, context_len: int) -> None:
        """Nothing to undo: the lookup keeps no state."""


class ModelDrafter:
    """Drafts with a transformer on its own KV cache: another model with the same vocabulary, or the
    target model's own weights under a sparse FFN selector (the selector is set only while drafting).
    Greedy drafts take the argmax; sampled drafts sample with the generation's own settings and return
    the distributions they sampled from (needed by the acceptance rule)."""

    def __init__(self, transformer, selector=None, name: str = "model", max_len: int | None = None,
                 vocab: DraftVocab | None = None):
        self.transformer = transformer
        self.selector = selector
        self.name = name
        self.vocab = vocab                   # logits over this subset of the ids only (None: all)
        self.cache = transformer.new_cache(max_len)
        self.tokens: list[int] = []          # what self.cache holds, position by position
        self.seconds_per_token: float | None = None   # one-token draft forwards, running estimate
        self.seconds_per_extra: float | None = None   # each token past the first in a catch-up forward

    def _forward(self, ids) -> np.ndarray:
        t = self.transformer
        saved, t.ffn_neurons = t.ffn_neurons, self.selector
        t0 = time.perf_counter()
        try:
            head = None if self.vocab is None else self.vocab.weights
            return t.forward(np.asarray(ids, dtype=np.int64), self.cache, last_only=True, head=head)[-1]
        finally:
            t.ffn_neurons = saved
            dt = time.perf_counter() - t0
            if len(ids) == 1:
                self.seconds_per_token = dt if self.seconds_per_token is None else \
                    self.seconds_per_token + 0.2 * (dt - self.seconds_per_token)
            elif self.seconds_per_token is not None:
                # a catch-up forward (accepted drafts of another drafter, or a whole prompt): the time
                # of its tokens past the first, per token
                per = max(0.0, dt - self.seconds_per_token) / (len(ids) - 1)
                self.seconds_per_extra = per if self.seconds_per_extra is None else \
                    self.seconds_per_extra + 0.2 * (per - self.seconds_per_extra)

    def _shared_prefix(self, ctx: list[int]) -> int:
        """How many leading context tokens the cache holds already (the last one is always fed again).
        The longest common prefix by bisection over list-slice comparisons (C loops): a round asks twice
        (pricing, then drafting), and a token-by-token Python scan of a long context cost more than the
        comparisons themselves."""
        n = min(len(self.tokens), len(ctx))
        if self.tokens[:n] == ctx[:n]:
            keep = n                                   # the usual case: the context extends the cache
        else:
            lo, hi = 0, n - 1                          # prefix lo matches, prefix hi + 1 does not
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.tokens[:mid] == ctx[:mid]:
                    lo = mid
                else:
                    hi = mid - 1
            keep = lo
        return min(keep, len(ctx) - 1)

    def catch_up_seconds(self, context: np.ndarray) -> float:
        """Expected extra seconds of this drafter's first forward in a round beyond a one-token step:
        the context tokens its cache lacks (accepted since it last drafted), past the one it always feeds."""
        ctx = context.tolist()
        missing = len(ctx) - 1 - self._shared_prefix(ctx)
        if missing <= 0 or self.seconds_per_token is None:
            return 0.0
        per = self.seconds_per_extra if self.seconds_per_extra is not None else \
            VERIFY_COST * self.seconds_per_token
        return missing * per

    def propose(self, context: np.ndarray, k: int, sampler: Sampler | None = None):
        """-> (k draft tokens, their draft distributions [k, V] or None for greedy)."""
        ctx = context.tolist()
        keep = self._shared_prefix(ctx)           # the last context token is fed below, for its logits
        self.cache.truncate(keep)
        del self.tokens[keep:]
        k = min(k, self.cache.max_len - len(ctx))
        if k <= 0:
            return [], None
        if self.vocab is not None:
            self.vocab.cover(context)             # ids of the context join the draft vocabulary
        logits = self._forward(ctx[keep:])
        self.tokens.extend(ctx[keep:])
        drafts, dists = [], []
        greedy = sampler is None or sampler.params.temperature == 0
        for i in range(k):
            if greedy:
                tok = int(np.argmax(logits)) if self.vocab is None else int(self.vocab.ids[np.argmax(logits)])
            else:
                q = sampler.distribution(logits if self.vocab is None else self.vocab.full_logits(logits))
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
    """Several drafters. In a generation, propose_round picks one per round by its expected rate;
    propose() on its own (outside speculative_ids) asks them in turn and takes the first proposal."""

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
    records: dict[int, DrafterRecord] = {}
    cost = verify_cost_for(transformer)
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
        room = min(max_tokens - emitted, cache.max_len - cache.length - 1)
        drafts, dists, used = propose_round(drafter, np.asarray(context, dtype=np.int64), room, sampler,
                                            records, cost) if room > 0 else ([], None, None)
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
        for key, rec in records.items():
            if key == used:
                rec.add(len(drafts), n)
            else:
                rec.idle()
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
              "model with trained predictors at tau_pred TAU, default 0), model:M (another model with the "
              "same vocabulary: a GGUF file, HF directory or known name, e.g. model:qwen2.5-coder-0.5b "
              "drafting for qwen2.5-coder-1.5b; loaded with this model's backend and threads), or several "
              "joined by '+' (each round the one expected to give the most tokens per second drafts, e.g. "
              "lookup+model:qwen2.5-coder-0.5b); a model drafter may end in @N: it computes logits only for "
              "the first N token ids, the stop ids and the ids already in the context (a cheaper draft step, "
              "the text unchanged; e.g. sparse:0.5@32768); in the library also a loaded Model with the same "
              "vocabulary")


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
    base, at, size = spec.rpartition("@")
    if at and size.isdigit():                  # a draft vocabulary: the first `size` ids (+ stops, context)
        drafter = make_drafter(model, base)
        if not isinstance(drafter, ModelDrafter) or int(size) < 1:
            raise InvalidArgumentError(f"unknown draft {spec!r}: @N (N a positive number of token ids) follows "
                                       f"a model drafter (sparse:, act:, pred:, model:)")
        head = drafter.transformer.lm_head
        tok = model.tokenizer
        stops = set() if tok is None else set(tok.stop_ids) | ({tok.eos_id} - {None})
        drafter.vocab = DraftVocab(head, head.shape[0], int(size), always=stops)
        drafter.name = spec
        return drafter
    from .sparse.modes import make_selector
    kind, _, arg = spec.partition(":")
    if kind == "model" and arg:
        from .api import load
        other = load(arg, backend=model.backend, threads=model.transformer.ops.n_threads, progress=False)
        check_same_vocabulary(model, other)
        return ModelDrafter(other.transformer, other.transformer.ffn_neurons, name=spec)
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
    """Speculative output equals plain output because the verifying forward is batch invariant (the
    compiled CPU backend, the GPU's CupyOps, a hybrid engine of the two): warn on the NumPy reference
    (BLAS rounds a batch differently from one token, so greedy text may differ in rare near-ties) and
    refuse any other engine (a device stand-in over the NumPy reference)."""
    if getattr(ops, "batch_invariant", False):
        return
    if getattr(ops, "name", "") != "numpy":
        raise InvalidArgumentError(f"speculative decoding (draft=) needs a batch-invariant engine (the compiled "
                                   f"CPU backend, a GPU, or a hybrid of the two); the {getattr(ops, 'name', '?')} "
                                   f"engine is not: its verification could round differently from single steps")
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
