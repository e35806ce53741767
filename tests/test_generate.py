"""Sampling, the decode loop and stop-string handling, on a tiny fake model (no weights needed)."""
import numpy as np
import pytest

from pipower.errors import ContextLengthError, InvalidArgumentError
from pipower.generate import GenerationStats, generate_ids, stream_text
from pipower.sampling import Sampler, SamplingParams


class CountingModel:
    """Always predicts token (last + 1) % V; records how it was called."""
    V = 10

    class Cache:
        def __init__(self, max_len):
            self.length, self.max_len = 0, max_len

    def __init__(self, max_len=100):
        self.max_len, self.calls = max_len, []

    def new_cache(self):
        return self.Cache(self.max_len)

    def forward(self, ids, cache, last_only=False):
        self.calls.append(len(ids))
        cache.length += len(ids)
        logits = np.zeros((len(ids), self.V), np.float32)
        logits[np.arange(len(ids)), (np.asarray(ids) + 1) % self.V] = 5.0
        return logits[-1:] if last_only else logits


class CharDecoder:
    """Token i decodes to the i-th letter."""
    def feed(self, token):
        return "abcdefghij"[token]

    def flush(self):
        return ""


def run(prompt, max_tokens, stop_ids=(), max_len=100):
    stats = GenerationStats()
    out = list(generate_ids(CountingModel(max_len), prompt, Sampler(SamplingParams()), max_tokens, stop_ids, stats))
    return out, stats


def test_greedy_loop_counts_and_stops_on_max_tokens():
    out, stats = run([1, 2], 5)
    assert out == [3, 4, 5, 6, 7]
    assert (stats.prompt_tokens, stats.new_tokens, stats.stop_reason) == (2, 5, "length")


def test_stop_id_ends_generation_without_being_yielded():
    out, stats = run([1], 20, stop_ids=[5])
    assert out == [2, 3, 4] and stats.stop_reason == "eos"


def test_context_full_stops_and_overlong_prompt_raises():
    out, stats = run([0, 1, 2], 50, max_len=6)
    assert len(out) == 4 and stats.stop_reason == "context"   # 3 prompt + 3 decoded positions + 1 sampled
    with pytest.raises(ContextLengthError):
        run(list(range(6)), 1, max_len=6)
    with pytest.raises(InvalidArgumentError):
        run([], 1)


def test_prompt_is_prefilled_in_chunks_then_decoded_one_by_one():
    model = CountingModel(max_len=2000)
    list(generate_ids(model, np.zeros(1100, int), Sampler(SamplingParams()), 3, (), GenerationStats()))
    assert model.calls == [512, 512, 76, 1, 1]


def stream(tokens, stop):
    stats = GenerationStats()
    return "|".join(stream_text(iter(tokens), CharDecoder(), stop, stats)), stats


def test_stop_string_cut_and_held_back_text():
    # "abcde" with stop "cd": "ab" comes out, the rest never does
    text, stats = stream([0, 1, 2, 3, 4], ["cd"])
    assert text.replace("|", "") == "ab" and stats.stop_reason == "stop"
    # "c" alone is held back until "e" shows it is not the start of "cd"
    text, _ = stream([0, 2, 4], ["cd"])
    assert text.replace("|", "") == "ace" and text.split("|")[0] == "a"


def test_no_stop_strings_streams_every_piece():
    text, _ = stream([0, 1, 2], [])
    assert text == "a|b|c"


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_params_raise(bad):
    with pytest.raises(InvalidArgumentError):
        SamplingParams(**bad)


def test_sampling_follows_the_softmax_and_respects_top_k_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    draws = [Sampler(SamplingParams(temperature=1.0, seed=s))(logits) for s in range(4000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top2 = {Sampler(SamplingParams(temperature=1.0, top_k=2, seed=s))(logits) for s in range(300)}
    assert top2 == {0, 1}
    nucleus = {Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=s))(logits) for s in range(300)}
    assert nucleus == {0, 1}     # 0.5 < 0.75 <= 0.8
    assert Sampler(SamplingParams(temperature=0.0))(logits) == 0


def test_same_seed_same_tokens():
    logits = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    a, b = (Sampler(SamplingParams(temperature=0.8, seed=7)) for _ in range(2))
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]
