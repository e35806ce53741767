"""Speculative decoding: greedy output is token for token the plain greedy output with every drafter,
and the sampling rule keeps the model's distribution (checked statistically, with a control that a
wrong rule fails the same check)."""
import numpy as np
import pytest

from pipower import _cpu
from pipower.config import ModelConfig
from pipower.draft_vocab import DraftVocab
from pipower.errors import InvalidArgumentError
from pipower.generate import GenerationStats, generate_ids
from pipower.sampling import Sampler, SamplingParams
from pipower.speculative import (ChainDrafter, LookupDrafter, ModelDrafter, accept_greedy, accept_sampled,
                                 speculative_ids)

from helpers_models import CFG, random_tensors

needs_ext = pytest.mark.skipif(not _cpu.AVAILABLE, reason="compiled kernels not built")


def transformer(seed=5, fmt="q8", dot="float", cfg=CFG, gain=6.0):
    """A tiny model whose layers matter: projections scaled up (at random_tensors' 0.1 scale the tied
    embedding decides every argmax and the model repeats itself)."""
    from pipower._cpu.ops import CythonOps
    from pipower.model import Transformer
    tensors = {k: (v * gain if ("mlp." in k or "self_attn." in k) and k.endswith("weight") else v)
               for k, v in random_tensors(cfg, seed=seed).items()}
    return Transformer(ModelConfig.from_dict(cfg), tensors, CythonOps(2, dot), weights=fmt)


def prompts(n=12, seed=0):
    """Random prompts with repeats in them, so prompt lookup finds n-grams to propose."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        motif = rng.integers(3, CFG["vocab_size"], rng.integers(3, 9)).tolist()
        noise = rng.integers(3, CFG["vocab_size"], rng.integers(1, 12)).tolist()
        out.append(noise + motif + noise[:3] + motif + rng.integers(3, CFG["vocab_size"], 2).tolist())
    return out


def plain(t, ids, n, stop=(), max_len=None):
    s = GenerationStats()
    return list(generate_ids(t, ids, Sampler(SamplingParams()), n, stop, s, t.new_cache(max_len))), s


def spec(t, ids, n, drafter, stop=(), max_len=None):
    s = GenerationStats()
    return list(speculative_ids(t, ids, Sampler(SamplingParams()), n, stop, s, drafter, t.new_cache(max_len))), s


@needs_ext
@pytest.mark.parametrize("fmt,dot", [("q8", "float"), ("f16", "float"), ("q4", "int8")])
def test_greedy_output_is_the_plain_greedy_output_with_every_drafter(fmt, dot):
    from pipower.sparse.oracle import OracleSelector
    t = transformer(fmt=fmt, dot=dot)
    other = transformer(seed=9, fmt=fmt, dot=dot)           # a different model, same vocabulary
    drafters = {
        "lookup": lambda: LookupDrafter(),
        "self-dense": lambda: ModelDrafter(t, None, "self"),     # a perfect drafter: every draft accepted
        "self-sparse": lambda: ModelDrafter(t, OracleSelector(t, 0.3), "act:0.3"),
        "other-model": lambda: ModelDrafter(other, None, "other"),
        "lookup+other": lambda: ChainDrafter([LookupDrafter(), ModelDrafter(other, None, "other")]),
        # a draft vocabulary of 40 of the 96 ids (+ the context's): rejections where the model's token
        # is outside it, the same text
        "other-model@40": lambda: ModelDrafter(other, None, "other@40",
                                               vocab=DraftVocab(other.lm_head, CFG["vocab_size"], 40)),
        "self-sparse@40": lambda: ModelDrafter(t, OracleSelector(t, 0.3), "act:0.3@40",
                                               vocab=DraftVocab(t.lm_head, CFG["vocab_size"], 40, always=[95])),
    }
    for name, make in drafters.items():
        accepted = drafted = 0
        for ids in prompts():
            want, _ = plain(t, ids, 40)
            got, s = spec(t, ids, 40, make())
            assert got == want, name
            accepted, drafted = accepted + s.accepted, drafted + s.drafted
            assert 0 <= s.accepted <= s.drafted
        assert drafted > 0, name
        if name == "self-dense":
            assert accepted == drafted                       # the multi-token acceptance path is exercised
        else:
            assert accepted < drafted or name == "lookup"    # rejections (and rollbacks) happen too


@needs_ext
def test_stops_and_limits_match_plain_generation():
    t = transformer()
    for ids in prompts(6, seed=1):
        want, _ = plain(t, ids, 30)
        stop = {want[7]}                                     # a token that appears mid-output
        for max_len in (None, len(ids) + 11):
            for n in (0, 1, 5, 30):
                a, sa = plain(t, ids, n, stop, max_len)
                b, sb = spec(t, ids, n, ModelDrafter(t, None, "self", max_len), stop, max_len)
                assert a == b and sa.stop_reason == sb.stop_reason and sa.new_tokens == sb.new_tokens


def test_lookup_proposes_what_followed_the_latest_match():
    d = LookupDrafter(max_ngram=3)
    ctx = np.array([5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3])
    assert d.propose(ctx, 2)[0] == [7, 8]                    # latest earlier "1 2 3" is followed by 7 8
    assert d.propose(np.array([4, 4, 6]), 3)[0] == []         # no earlier 6, 4 6, ...
    assert d.propose(np.array([1, 2, 1]), 5)[0] == [2, 1]     # a 1-gram match, continuation to the end


def test_accept_greedy_keeps_the_agreeing_prefix_and_the_models_next_token():
    logits = np.eye(6, dtype=np.float32)[[2, 4, 1, 3]]           # argmax per row: 2, 4, 1, 3
    assert accept_greedy([2, 4, 1], logits) == (3, 3)
    assert accept_greedy([2, 5, 1], logits) == (1, 4)
    assert accept_greedy([], logits[:1]) == (0, 2)


# ---- the sampling rule, statistically --------------------------------------------------------------
V = 6


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _first_two(rule_rng_seed, n, deterministic, broken=False):
    """Joint counts [V, V] of the first two emitted tokens when p depends on the previous token:
    p1 = softmax(A), p2(.|t1) = softmax(B[t1]); drafts from q1, q2(.|d1) (or fixed tokens).
    deterministic == "subset": q1, q2 are zero outside ids 0..3 (a drafter with a draft vocabulary)."""
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=V) * 1.5, rng.normal(size=(V, V)) * 1.5
    QA, QB = rng.normal(size=V) * 1.5, rng.normal(size=(V, V)) * 1.5
    sampler = Sampler(SamplingParams(temperature=1.0, seed=rule_rng_seed))
    draw = np.random.default_rng(rule_rng_seed + 1)
    counts = np.zeros((V, V))
    for _ in range(n):
        if deterministic is True:
            d = [2, 3]
            dists = None
        else:
            cut = np.where(np.arange(V) < 4, 0.0, -np.inf) if deterministic == "subset" else np.zeros(V)
            q1 = _softmax(QA + cut)
            d1 = int(draw.choice(V, p=q1))
            q2 = _softmax(QB[d1] + cut)
            d = [d1, int(draw.choice(V, p=q2))]
            dists = np.stack([q1, q2])
        rows = np.stack([A, B[d[0]], np.zeros(V)]).astype(np.float32)   # the third row is unused here
        if broken:            # a wrong rule: believe the drafts came from p (accept with probability 1)
            dists = np.stack([sampler.distribution(rows[0]), sampler.distribution(rows[1])])
        k, nxt = accept_sampled(d, dists, rows, sampler)
        out = d[:k] + [nxt]
        if len(out) < 2:     # the next round would sample the second token from p2(.|first)
            out.append(int(sampler.rng.choice(V, p=sampler.distribution(B[out[0]].astype(np.float32)))))
        counts[out[0], out[1]] += 1
    p1 = _softmax(A)
    joint = p1[:, None] * np.stack([_softmax(B[i]) for i in range(V)])
    return counts, joint


def _chi2_p(counts, joint):
    from scipy.stats import chisquare
    n = counts.sum()
    return chisquare(counts.ravel(), joint.ravel() * n).pvalue


@pytest.mark.parametrize("deterministic", (True, False, "subset"))
def test_speculative_sampling_keeps_the_models_distribution(deterministic):
    counts, joint = _first_two(11, 12000, deterministic)
    assert _chi2_p(counts, joint) > 1e-3
    bad, joint = _first_two(11, 12000, deterministic, broken=True)
    assert _chi2_p(bad, joint) < 1e-6                          # the check has the power to see a wrong rule


# ---- the API ---------------------------------------------------------------------------------------
def test_bad_draft_specs_are_refused():
    from pipower.speculative import make_drafter

    class Stub:
        transformer = None
    for spec in ("nope", "sparse", "lookup:3", "pred:", "model:", 3.5, "lookup@100", "model:@100"):
        with pytest.raises(InvalidArgumentError):
            make_drafter(Stub(), spec)


def test_a_missing_draft_model_is_a_clear_error(tmp_path):
    import pipower
    from pipower.speculative import make_drafter

    class Stub:
        backend = "numpy"
        transformer = type("T", (), {"ops": type("O", (), {"n_threads": 1})()})()
    with pytest.raises(pipower.PipowerError, match="nothing.gguf|not found|No such"):
        make_drafter(Stub(), f"model:{tmp_path / 'nothing.gguf'}")


def test_a_draft_model_with_another_vocabulary_is_refused():
    from pipower.speculative import check_same_vocabulary

    class Tok:
        def __init__(self, words):
            self.words, self.vocab_size = words, len(words)

        def token_text(self, i):
            return self.words[i]

    class M:
        def __init__(self, words, n=None):
            self.tokenizer = Tok(words)
            self.config = type("C", (), {"vocab_size": n or len(words)})()
    check_same_vocabulary(M(["a", "b"]), M(["a", "b"]))
    with pytest.raises(InvalidArgumentError, match="same tokenizer"):
        check_same_vocabulary(M(["a", "b"]), M(["a", "c"]))
    with pytest.raises(InvalidArgumentError, match="token ids"):
        check_same_vocabulary(M(["a", "b"]), M(["a", "b", "c"]))


def test_real_model_greedy_text_identical_with_lookup_and_sparse_drafts():
    import pipower
    try:
        path = pipower.fetch("smollm2-135m", progress=False)
    except pipower.FetchError as e:
        pytest.skip(f"cannot fetch: {e}")
    m = pipower.load(path)
    prompts_ = ["def is_prime(n):", "The quick brown fox", "import numpy as np\n\ndef moving_average(x, w):",
                "class Stack:\n    def __init__(self):"]
    for p in prompts_:
        want = m.generate_ids(p, max_tokens=48)
        for draft in ("lookup", "act:0.1", "lookup+act:0.1", f"model:{path}", f"lookup+model:{path}",
                      "act:0.1@4096", f"lookup+model:{path}@8192"):
            assert m.generate_ids(p, max_tokens=48, draft=draft) == want, (p, draft)
            st = m.last_stats
            assert st.drafted >= st.accepted >= 0 and 0.0 <= st.draft_acceptance <= 1.0


@pytest.mark.slow
def test_qwen_humaneval_chat_greedy_identical_with_every_drafter():
    """Many real prompts: the first 12 HumanEval chat prompts, 160 new tokens, lookup and lookup + sparse
    self-draft against plain greedy on Qwen2.5-Coder-0.5B (q8), and lookup on q4 with integer dots."""
    import pipower
    from pipower.eval.humaneval import chat_messages, load_problems
    try:
        path = pipower.fetch("qwen2.5-coder-0.5b", progress=False)
    except pipower.FetchError as e:
        pytest.skip(f"cannot fetch: {e}")
    for weights, drafts in (("q8", ("lookup", "lookup+sparse:0.5")), ("q4", ("lookup",))):
        m = pipower.load(path, weights=weights)
        for problem in load_problems()[:12]:
            msgs = chat_messages(problem)
            want = m.chat(msgs, max_tokens=160)
            for draft in drafts:
                assert m.chat(msgs, max_tokens=160, draft=draft) == want, (weights, problem["task_id"], draft)


def test_acceptance_record_is_not_capped_by_short_drafts():
    """Two-token drafts that always pass must read as a near-perfect drafter (so drafts grow), not as
    the 3/4 a per-round rate would give; a drafter that fails at once reads as a poor one; one left idle
    drifts back to the prior."""
    from pipower.speculative import PRIOR_ACCEPTANCE, DrafterRecord
    good, bad = DrafterRecord(), DrafterRecord()
    for _ in range(20):
        good.add(2, 2)
        bad.add(4, 0)
    assert good.acceptance > 0.9 and bad.acceptance < 0.2
    for _ in range(60):
        bad.idle()
    assert abs(bad.acceptance - PRIOR_ACCEPTANCE) < 0.05


@needs_ext
def test_each_drafter_of_a_chain_is_rated_by_its_own_record():
    """propose_round rates lookup by the record of the n-gram length it matched and a model by its own:
    a chain whose lookup keeps failing drafts with the model, one whose lookup always passes drafts with
    lookup (and never runs the model); the output is the plain output either way."""
    from pipower.speculative import DrafterRecord, VerifyCost, propose_round
    t = transformer()
    other = transformer(seed=9)
    lookup, model = LookupDrafter(), ModelDrafter(other, None, "other")
    chain = ChainDrafter([lookup, model])
    ctx = np.asarray(prompts()[0], dtype=np.int64)
    assert lookup.propose(ctx, 4)[0] and lookup.matched >= 1
    for lookup_ok, want_leaf in ((False, model), (True, lookup)):
        records = {}
        for n in range(4):
            rec = records.setdefault((id(lookup), n), DrafterRecord())
            for _ in range(30):
                rec.add(8, 8 if lookup_ok else 0)
        drafts, dists, key = propose_round(chain, ctx, 16, Sampler(SamplingParams()), records, VerifyCost())
        assert key == (id(want_leaf), None if want_leaf is model else lookup.matched) and 1 <= len(drafts) <= 16
    for ids in prompts(4):
        want, _ = plain(t, ids, 30)
        got, _ = spec(t, ids, 30, ChainDrafter([LookupDrafter(), ModelDrafter(other, None, "other")]))
        assert got == want


def test_draft_length_and_the_verify_cost_estimate():
    from pipower.speculative import VerifyCost, draft_length
    assert draft_length(0.0, 16) == 0 and draft_length(0.3, 16, cost=0.5) == 0    # not worth drafting
    assert draft_length(0.95, 16, cost=0.05) > draft_length(0.95, 16, cost=0.5) >= 1
    assert draft_length(0.99, 3, cost=0.01) == 3                                   # room bounds it
    # drafting that costs time shortens drafts, and stops them when it eats the gain
    assert draft_length(0.9, 16, cost=0.1, draft_cost=0.4) < draft_length(0.9, 16, cost=0.1)
    assert draft_length(0.6, 16, cost=0.1, draft_cost=0.6) == 0
    # the verify cost curve, in steps: the prior's line until a step and a longer forward are timed
    c = VerifyCost(prior=0.35)
    assert c.forward_steps(0) == 1.0 and abs(c.forward_steps(4) - 2.4) < 1e-9
    c.add(4, 0.5)                          # no one-token forward measured yet: still the prior
    assert abs(c.forward_steps(3) - 2.05) < 1e-9
    c.add(1, 0.1)
    c.add(5, 0.18)                         # T = 4: 5 steps (measured), T = 5: 1.8 steps
    assert abs(c.forward_steps(3) - 5.0) < 1e-9 and abs(c.forward_steps(4) - 1.8) < 1e-9
    c = VerifyCost()
    c.add(1, 0.1)
    c.add(2, 0.12)
    c.add(9, 0.15)                         # concave: the first extra token costs most
    assert abs(c.forward_steps(1) - 1.2) < 1e-9 and abs(c.forward_steps(8) - 1.5) < 1e-9
    assert abs(c.forward_steps(4) - (1.2 + 0.3 * 3 / 7)) < 1e-9                    # interpolated
    assert abs(c.forward_steps(12) - (1.5 + 0.5 / 8 * 4)) < 1e-9                   # extrapolated
    # with that curve, long drafts are nearly free: drafted longer than the line through T = 2 allows
    assert draft_length(0.7, 16, cost=c.forward_steps) > draft_length(0.7, 16, cost=0.2)


class _TimedDrafter:
    """A model-like drafter with a known step time that counts its calls (propose_round's pricing)."""
    name = "timed"

    def __init__(self, seconds_per_token, catch_up=0.0):
        self.seconds_per_token, self.catch_up, self.calls = seconds_per_token, catch_up, 0

    def catch_up_seconds(self, context):
        return self.catch_up

    def propose(self, context, k, sampler=None):
        self.calls += 1
        return [1] * k, None


def test_a_model_drafter_is_priced_by_its_step_time_and_its_catch_up():
    """A drafter whose step costs more than the model's own is never chosen once both are timed; one
    whose cost is known while the model's step is not sits the round out (the plain round times the
    step), instead of being taken as free; a large catch-up (tokens its cache lacks) prices it out too."""
    from pipower.speculative import DrafterRecord, VerifyCost, draft_plan, propose_round
    ctx = np.arange(10, dtype=np.int64)
    sampler = Sampler(SamplingParams())
    cost = VerifyCost(prior=0.1)
    cheap, dear = _TimedDrafter(0.02), _TimedDrafter(0.15)
    assert propose_round(dear, ctx, 16, sampler, {}, cost) == ([], None, None)     # step not yet timed
    cost.add(1, 0.1)                                                                # the model: 0.1 s a step
    for drafter, want_drafts in ((cheap, True), (dear, False)):
        records = {(id(drafter), None): DrafterRecord()}
        for _ in range(20):
            records[(id(drafter), None)].add(8, 7)                                  # ~0.9 acceptance
        drafts, _, key = propose_round(drafter, ctx, 16, sampler, records, cost)
        assert bool(drafts) == want_drafts and drafter.calls == int(want_drafts)
    slow_start = _TimedDrafter(0.02, catch_up=5.0)                                  # 50 steps to catch up
    records = {(id(slow_start), None): DrafterRecord()}
    assert propose_round(slow_start, ctx, 16, sampler, records, cost)[0] == [] and slow_start.calls == 0
    # a fixed cost per round lowers the rate and favours longer drafts to spread it
    k0, r0 = draft_plan(0.9, 16, 0.1, 0.2)
    k1, r1 = draft_plan(0.9, 16, 0.1, 0.2, fixed=1.0)
    assert r1 < r0 and k1 >= k0 >= 1
    assert draft_plan(0.9, 16, 0.1, 0.2, fixed=20.0) == (0, 1.0)


def test_speculative_decoding_needs_a_batch_invariant_verifier(caplog):
    from pipower.hybrid import HybridOps, StandInDeviceOps, gpu_plan
    from pipower.ops import NumpyOps
    from pipower.speculative import check_verifier
    with pytest.raises(InvalidArgumentError, match="batch-invariant"):
        check_verifier(object())
    with pytest.raises(InvalidArgumentError, match="hybrid engine is not"):      # a device over NumPy
        check_verifier(HybridOps(StandInDeviceOps(), NumpyOps(), gpu_plan(2)))
    with caplog.at_level("WARNING", logger="pipower"):
        check_verifier(NumpyOps())
    assert "NumPy reference" in caplog.text


@needs_ext
@pytest.mark.slow
def test_greedy_output_on_the_gpu_engine_is_its_plain_greedy_output(cupy_ops, monkeypatch):
    """The GPU engine (CupyOps, kernels emulated on the CPU; all layers on the device, or split with the
    cold rows on the CPU) verifies drafts with its batch-invariant kernels: speculative greedy text is
    its own plain greedy text, with rejected drafts (lookup on these prompts) and all-accepted rounds
    (the model drafting for itself). Emulated kernels cost ~T times more for T tokens, so the draft
    policy would not draft: verification is priced by the prior here. Slow (~4 min): the emulator runs
    every CUDA thread as a fiber; tests/test_hybrid.py checks the batched forward bitwise by default."""
    from pipower import speculative
    from pipower.hybrid import gpu_plan, make_hybrid
    from pipower.hybrid.plan import ExecutionPlan
    from pipower.speculative import VerifyCost, check_verifier
    monkeypatch.setattr(speculative, "verify_cost_for", lambda transformer: VerifyCost())
    monkeypatch.setattr(VerifyCost, "add", lambda self, tokens, seconds: None)
    rng = np.random.default_rng(3)
    hot = [np.sort(rng.choice(CFG["intermediate_size"], 60, replace=False)).astype(np.int32)
           for _ in range(CFG["num_hidden_layers"])]
    plans = (gpu_plan(CFG["num_hidden_layers"]), ExecutionPlan("hybrid", ["split"] * len(hot), "device", hot))
    for plan in plans:
        t = make_hybrid(transformer(), plan, cupy_ops())
        check_verifier(t.ops)
        counts = {"lookup": [0, 0], "self": [0, 0]}
        for ids in prompts(3, seed=4):
            want, _ = plain(t, ids, 16)
            for name, drafter in (("lookup", LookupDrafter()), ("self", ModelDrafter(t, None, "self"))):
                got, s = spec(t, ids, 16, drafter)
                assert got == want, (plan.kind, name)
                counts[name][0] += s.drafted
                counts[name][1] += s.accepted
        assert counts["lookup"][0] > counts["lookup"][1]                    # rejections rolled back
        assert counts["self"][0] == counts["self"][1] > 0                   # multi-token acceptance


@needs_ext
def test_the_verify_cost_curve_is_calibrated_once_per_model_and_changes_no_output():
    from pipower.speculative import CALIBRATION_TOKENS, calibrate_verify_cost, verify_cost_for
    t = transformer()
    ids = prompts(1)[0]
    before = t.forward(ids, t.new_cache(64), last_only=False)
    cost = calibrate_verify_cost(t, repeats=1)
    assert cost.step > 0 and set(cost.seconds) == set(CALIBRATION_TOKENS)
    assert all(cost.forward_steps(T - 1) >= 1.0 for T in CALIBRATION_TOKENS)
    np.testing.assert_array_equal(t.forward(ids, t.new_cache(64), last_only=False), before)   # scratch cache
    shared = verify_cost_for(t)
    assert verify_cost_for(t) is shared and verify_cost_for(transformer()) is not shared


def test_a_model_drafters_shared_prefix_is_the_longest_common_prefix():
    """ModelDrafter._shared_prefix (bisection over slice comparisons) against a token-by-token scan, on
    random caches and contexts: extensions, rejected drafts at the end, early mismatches, empty caches."""
    import random
    from types import SimpleNamespace

    def scan(tokens, ctx):
        keep = 0
        for a, b in zip(tokens, ctx):
            if a != b:
                break
            keep += 1
        return min(keep, len(ctx) - 1)

    r = random.Random(0)
    for _ in range(3000):
        n = r.randint(0, 40)
        base = [r.randint(0, 3) for _ in range(n)]
        tokens = base[:r.randint(0, n)] + [r.randint(0, 3) for _ in range(r.randint(0, 6))]
        ctx = (base[:r.randint(1, n)] if n else [1]) + [r.randint(0, 3) for _ in range(r.randint(0, 3))]
        got = ModelDrafter._shared_prefix(SimpleNamespace(tokens=tokens), ctx)
        assert got == scan(tokens, ctx), (tokens, ctx)
