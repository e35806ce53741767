"""pipower.serve.engine.BatchEngine (continuous batching) and pipower.serve.text.StopTextStream, in process:
no HTTP, no extra packages. Each request's tokens must be exactly what Model.generate_ids gives the same
prompt and sampling settings alone (the batched forward is batch-invariant on the compiled engine)."""
import queue
import threading

import numpy as np
import pytest

import pipower
from helpers_models import write_tiny_gguf
from pipower import _cpu
from pipower.errors import ContextLengthError, InvalidArgumentError
from pipower.generate import GenerationStats, stream_text
from pipower.sampling import SamplingParams
from pipower.serve import BatchEngine, EngineClosedError, QueueFullError, StopTextStream
from pipower.serve.engine import GenerationError

needs_ext = pytest.mark.skipif(not _cpu.AVAILABLE, reason="batch invariance needs the compiled kernels")
TIMEOUT = 60


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("eng") / "tiny.gguf")


@pytest.fixture(scope="module", params=["q8", "q4"])
def model(request, tiny_path):
    return pipower.load(tiny_path, threads=1, weights=request.param, progress=False)


def prompts(model, n, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, model.config.vocab_size, size=int(rng.integers(1, 40)))]
            for _ in range(n)]


@needs_ext
def test_batched_greedy_equals_solo(model):
    ps = prompts(model, 7)
    max_tokens = [5, 30, 1, 17, 60, 9, 44]
    stops = model._stop_ids()
    engine = BatchEngine(model.transformer, max_batch=4, max_queue=8)
    reqs = [engine.submit(p, n, SamplingParams(), stops) for p, n in zip(ps, max_tokens)]
    with engine:                                  # started after submitting: the first step batches 4
        got = [r.result(TIMEOUT) for r in reqs]
    for p, n, r, ids in zip(ps, max_tokens, reqs, got):
        solo = model.generate_ids(p, max_tokens=n, temperature=0)
        assert ids == solo
        assert r.finish_reason == {"eos": "eos", "length": "length"}[model.last_stats.stop_reason]
        assert r.completion_tokens == len(ids) and r.prompt_tokens == len(p)
    st = engine.stats()
    assert st.max_rows == 4 and st.completed == 7 and st.active == st.queued == 0
    assert st.generated_tokens == sum(len(g) for g in got)


@needs_ext
def test_joining_prompts_ride_in_the_step_and_equal_solo(model):
    """Short prompts are prefilled inside the decode step's forward (rows within the invariant limit),
    a prompt too long for the room left is prefilled alone; every request still gets its solo tokens."""
    from pipower._cpu.linear_ops import MAX_TOKENS
    rng = np.random.default_rng(5)
    lengths = [3, 8, MAX_TOKENS + 6, 12, 1, MAX_TOKENS - 2, 5]
    ps = [[int(t) for t in rng.integers(3, model.config.vocab_size, size=n)] for n in lengths]
    with BatchEngine(model.transformer, max_batch=4, max_queue=8) as engine:
        reqs = []
        for i, p in enumerate(ps):
            reqs.append(engine.submit(p, 12 + 7 * (i % 3), SamplingParams(), model._stop_ids()))
            if i in (0, 3):
                reqs[-1].get(TIMEOUT)              # a running batch for the next ones to join
        got = [r.result(TIMEOUT) for r in reqs]
    for i, (p, r, ids) in enumerate(zip(ps, reqs, got)):
        solo = model.generate_ids(p, max_tokens=12 + 7 * (i % 3), temperature=0)
        assert (solo[:1] if i in (0, 3) else []) + ids == solo, i
    st = engine.stats()
    assert 0 < st.prefills_in_step < len(ps)       # some rode in a step, the longest could not
    assert st.prefill_tokens == sum(lengths)


@needs_ext
def test_batched_seeded_sampling_equals_solo(model):
    ps = prompts(model, 5, seed=1)
    params = [SamplingParams(0.9, 20, 0.9, seed=i) for i in range(5)]
    engine = BatchEngine(model.transformer, max_batch=5)
    reqs = [engine.submit(p, 25, sp, model._stop_ids()) for p, sp in zip(ps, params)]
    with engine:
        got = [r.result(TIMEOUT) for r in reqs]
    for p, sp, ids in zip(ps, params, got):
        assert ids == model.generate_ids(p, max_tokens=25, temperature=sp.temperature, top_k=sp.top_k,
                                         top_p=sp.top_p, seed=sp.seed)


@needs_ext
def test_requests_join_and_leave_a_running_batch(model):
    """Requests submitted while others decode join at step boundaries and still get their solo tokens."""
    ps = prompts(model, 12, seed=2)
    with BatchEngine(model.transformer, max_batch=3, max_queue=16) as engine:
        reqs = []
        for i, p in enumerate(ps):
            reqs.append(engine.submit(p, 10 + 5 * (i % 4), SamplingParams(), model._stop_ids()))
            if i % 3 == 0:
                reqs[-1].get(TIMEOUT)              # wait for a first token before submitting more
        got = [r.result(TIMEOUT) for r in reqs]
    for i, (p, r, ids) in enumerate(zip(ps, reqs, got)):
        solo = model.generate_ids(p, max_tokens=10 + 5 * (i % 4), temperature=0)
        assert (solo[:1] if i % 3 == 0 else []) + ids == solo


def test_stop_ids_end_a_request(model):
    p = prompts(model, 1, seed=3)[0]
    first = model.generate_ids(p, max_tokens=1, temperature=0)[0]
    with BatchEngine(model.transformer) as engine:
        r = engine.submit(p, 10, SamplingParams(), stop_ids={first})
        assert r.result(TIMEOUT) == [] and r.finish_reason == "eos" and r.completion_tokens == 0


def test_context_limit_and_prompt_checks(model):
    engine = BatchEngine(model.transformer, context=20)
    assert engine.context == 20
    with pytest.raises(ContextLengthError):
        engine.submit(list(range(3, 23)), 5)
    with pytest.raises(InvalidArgumentError):
        engine.submit([], 5)
    with pytest.raises(InvalidArgumentError):
        engine.submit([model.config.vocab_size], 5)
    with pytest.raises(InvalidArgumentError):
        engine.submit("text", 5)
    with pytest.raises(InvalidArgumentError):
        engine.submit([5], -1)
    with engine:
        r = engine.submit(list(range(3, 18)), 100, SamplingParams(), stop_ids=())
        ids = r.result(TIMEOUT)
    assert len(ids) == 20 - 15 + 1 and r.finish_reason == "context"    # the last token needs no position
    solo = model.transformer.new_cache(20)
    from pipower.generate import generate_ids
    from pipower.sampling import Sampler
    st = GenerationStats()
    assert ids == list(generate_ids(model.transformer, list(range(3, 18)), Sampler(SamplingParams()), 100, (),
                                    st, solo)) and st.stop_reason == "context"


def test_max_tokens_zero_finishes_at_once(model):
    engine = BatchEngine(model.transformer)
    r = engine.submit([5, 6], 0)
    assert r.done and r.result(1) == [] and r.finish_reason == "length"


def test_queue_bound(model):
    engine = BatchEngine(model.transformer, max_batch=2, max_queue=3)
    reqs = [engine.submit([5, 6], 4) for _ in range(5)]       # 2 free slots + 3 waiting
    with pytest.raises(QueueFullError):
        engine.submit([5, 6], 4)
    assert engine.stats().rejected == 1
    reqs[0].cancel()                                           # a waiting request leaves the queue at once
    assert reqs[0].finish_reason == "cancelled" and reqs[0].result(1) == []
    reqs.append(engine.submit([5, 6], 4))
    with engine:
        assert all(len(r.result(TIMEOUT)) == 4 for r in reqs[1:])


def test_cancel_a_running_request(model):
    with BatchEngine(model.transformer, context=256) as engine:
        r = engine.submit([5, 6, 7], 250, SamplingParams(), stop_ids=())
        first = r.get(TIMEOUT)
        assert first is not None
        r.cancel()
        assert r.wait(TIMEOUT) and r.finish_reason == "cancelled"
        rest = list(r)
        assert len(rest) + 1 < 250 and r.get() is None
        assert engine.stats().cancelled == 1
        other = engine.submit([5, 6, 7], 3)                    # the engine goes on
        assert len(other.result(TIMEOUT)) <= 3


def test_close_cancels_and_refuses(model):
    engine = BatchEngine(model.transformer, max_batch=1)
    waiting = [engine.submit([5, 6], 200, stop_ids=()) for _ in range(3)]
    engine.start()
    waiting[0].get(TIMEOUT)
    assert engine.close(cancel=True, timeout=TIMEOUT)
    assert all(r.done for r in waiting) and waiting[-1].finish_reason == "cancelled"
    assert not engine.running
    with pytest.raises(EngineClosedError):
        engine.submit([5, 6], 2)


def test_close_without_cancel_drains(model):
    engine = BatchEngine(model.transformer, max_batch=2).start()
    reqs = [engine.submit([5, 6, i + 3], 20, stop_ids=()) for i in range(4)]
    assert engine.close(cancel=False, timeout=TIMEOUT)
    assert [r.finish_reason for r in reqs] == ["length"] * 4 and all(len(r.result(1)) == 20 for r in reqs)


def test_listener_and_get_nowait(model):
    calls = []
    event = threading.Event()

    def listener():
        calls.append(1)
        event.set()
    with BatchEngine(model.transformer) as engine:
        r = engine.submit([5, 6], 5, stop_ids=(), listener=listener)
        assert r.wait(TIMEOUT)
    assert len(calls) == 6                                     # 5 tokens + the end
    got = []
    while (t := r.get_nowait()) is not None:
        got.append(t)
    assert len(got) == 5 and r.get_nowait() is None
    r2 = BatchEngine(model.transformer).submit([5], 3)         # never started: nothing arrives
    with pytest.raises(queue.Empty):
        r2.get_nowait()


def test_a_failing_step_fails_its_requests_not_the_engine(model, monkeypatch):
    t = model.transformer
    real = t.forward_batch
    state = {"fail": True}

    def flaky(*a, **k):
        if state["fail"] and len(a[0]) > 1:
            state["fail"] = False
            raise RuntimeError("boom")
        return real(*a, **k)
    monkeypatch.setattr(t, "forward_batch", flaky)
    engine = BatchEngine(t, max_batch=2)
    a, b = engine.submit([5, 6], 10, stop_ids=()), engine.submit([7, 8], 10, stop_ids=())
    with engine:
        with pytest.raises(GenerationError, match="boom"):
            a.result(TIMEOUT)
        assert b.wait(TIMEOUT) and b.finish_reason == "error" and isinstance(b.error, RuntimeError)
        c = engine.submit([5, 6], 4, stop_ids=())
        assert len(c.result(TIMEOUT)) == 4 and engine.running
    assert engine.stats().failed == 2


def test_max_batch_is_bounded_by_the_invariant_kernels(model):
    with pytest.raises(InvalidArgumentError):
        BatchEngine(model.transformer, max_batch=0)
    if _cpu.AVAILABLE:
        from pipower._cpu.linear_ops import MAX_TOKENS
        BatchEngine(model.transformer, max_batch=MAX_TOKENS)
        with pytest.raises(InvalidArgumentError):
            BatchEngine(model.transformer, max_batch=MAX_TOKENS + 1)


def test_stop_text_stream_equals_stream_text(model):
    tok = model.tokenizer
    rng = np.random.default_rng(5)
    common = [tok.encode(w) for w in ("the", " the", "in", "er", "an", " a", "on", "\n", "é")]
    for trial in range(200):
        ids = [t for _ in range(int(rng.integers(1, 20))) for t in common[int(rng.integers(len(common)))]]
        text = tok.decode(ids)
        stop = ()
        if trial % 4:
            i = int(rng.integers(0, max(len(text), 1)))
            stop = (text[i:i + int(rng.integers(1, 5))], "zz" if trial % 3 else "")
        for strip in (False, True):
            expected = "".join(stream_text(iter(ids), tok.stream_decoder(strip_first_space=strip), stop,
                                           GenerationStats()))
            s = StopTextStream(tok.stream_decoder(strip_first_space=strip), stop)
            out = []
            for t in ids:
                out.append(s.feed(t))
                if s.stopped:
                    break
            out.append(s.finish())
            assert "".join(out) == expected == s.output, (ids, stop)
