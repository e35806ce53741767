"""Profiler, stats files and oracle mode on tiny random models."""
import numpy as np
import pytest

import pipower
from helpers_models import random_llama_config, write_hf_model
from pipower.errors import InvalidArgumentError, ModelFileError
from pipower.sparse.oracle import OracleSelector
from pipower.sparse.profile import calibrate_thresholds, gate_activations, profile
from pipower.sparse.stats import ActivationStats

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["silu", "relu"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    write_hf_model(d, random_llama_config(hidden_act=request.param, num_hidden_layers=12), seed=2)
    return pipower.load(d, backend="numpy")


def sequences(n, length, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, 256, length)) for _ in range(n)]


def test_counts_equal_a_direct_recount(tiny):
    seqs = sequences(3, 20)
    stats = profile(tiny, seqs, tau_act=0.05, max_samples=1000, sample_rate=1.0)
    assert stats.n_tokens == 60 and stats.counts.shape == (12, 128)
    # recount layer 5 by hand: capture its normed input with a pass-through hook
    t, seen = tiny.transformer, []
    t.ffn_neurons = lambda i, x, h: seen.append(h.copy()) if i == 5 else None
    for s in seqs:
        t.forward(np.asarray(s), t.new_cache())
    t.ffn_neurons = None
    expected = sum((gate_activations(t, 5, h) > 0.05).sum(axis=0) for h in seen)
    np.testing.assert_array_equal(stats.counts[5], expected)
    # every token was sampled (rate 1): labels of layer 5 are the same decisions
    labels = stats.layer_labels(5)
    assert labels.shape == (60, 128)
    np.testing.assert_array_equal(labels.sum(axis=0), expected)


def test_target_sparsity_calibrates_per_layer(tiny):
    # 0.7: above ReLU's natural ~50% zeros, which no threshold >= 0 can go below
    stats = profile(tiny, sequences(4, 32), target_sparsity=0.7, calibration_sequences=2)
    assert stats.tau_act.shape == (12,) and np.all(stats.tau_act > 0)
    inactive = 1 - stats.freqs.mean(axis=1)            # per-layer measured sparsity
    np.testing.assert_allclose(inactive, 0.7, atol=0.08)


def test_stats_round_trip_in_numeric_layer_order(tiny, tmp_path):
    stats = profile(tiny, sequences(2, 16), tau_act=0.0, max_samples=10, sample_rate=1.0, meta={"corpus": "x"})
    path = tmp_path / "s.safetensors"
    stats.save(path)
    back = ActivationStats.load(path)
    np.testing.assert_array_equal(back.counts, stats.counts)
    np.testing.assert_array_equal(back.tau_act, stats.tau_act)
    assert back.n_tokens == stats.n_tokens and back.meta["corpus"] == "x"
    assert len(back.inputs) == 12
    for i in range(12):                                  # layer 10 must not come back as layer 2
        np.testing.assert_array_equal(back.inputs[i], stats.inputs[i])
        np.testing.assert_array_equal(back.labels[i], stats.labels[i])
    assert back.inputs[0].shape == (10, 64)


def test_stats_bad_files(tmp_path):
    with pytest.raises(ModelFileError):
        ActivationStats.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelFileError):
        ActivationStats.load(bad)


def test_profile_argument_errors(tiny):
    with pytest.raises(InvalidArgumentError):
        profile(tiny, [], tau_act=0.1, target_sparsity=0.5)
    with pytest.raises(InvalidArgumentError):
        calibrate_thresholds([np.ones(4)], 1.0)


def test_oracle_tau_zero_changes_nothing(tiny):
    t = tiny.transformer
    ids = np.asarray(sequences(1, 24)[0])
    dense = t.forward(ids, t.new_cache())
    oracle = OracleSelector(t, 0.0)
    t.ffn_neurons = oracle
    try:
        cache = t.new_cache()
        prefill = t.forward(ids[:20], cache)
        steps = [t.forward(ids[i:i + 1], cache) for i in range(20, 24)]
    finally:
        t.ffn_neurons = None
    np.testing.assert_allclose(np.concatenate([prefill] + steps), dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())
    if tiny.config.hidden_act == "silu":
        assert oracle.sparsity < 0.01
    else:
        assert 0.3 < oracle.sparsity < 0.7     # ReLU: about half the pre-activations are negative


def test_oracle_skipping_equals_masking_by_hand(tiny):
    t = tiny.transformer
    ids = np.asarray(sequences(1, 10, seed=3)[0])
    tau = 0.2
    oracle = OracleSelector(t, tau)
    t.ffn_neurons = oracle
    try:
        got = t.forward(ids, t.new_cache())
    finally:
        t.ffn_neurons = None
    assert oracle.sparsity > 0.2
    # reference: a hook that zeroes inactive neurons via an explicit mask computed independently
    from pipower.ops import silu, relu
    act = {"silu": silu, "relu": relu}[tiny.config.hidden_act]

    def masker(i, x, h):
        g = h @ t.layers[i].gate.T
        return np.abs(act(g)) > tau
    t.ffn_neurons = masker
    try:
        ref = t.forward(ids, t.new_cache())
    finally:
        t.ffn_neurons = None
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_humaneval_prompts_corpus_has_prompts_but_no_solutions(tmp_path, monkeypatch):
    from pipower.eval import humaneval as he
    from pipower.sparse.corpus import corpus_files
    try:
        problems = he.load_problems()
    except he.PipowerError as e:
        pytest.skip(f"HumanEval data not available: {e}")
    data_home = tmp_path / "home"
    monkeypatch.setenv("PIPOWER_HOME", str(data_home))
    monkeypatch.setattr(he, "load_problems", lambda path=None: problems)
    files = corpus_files(["humaneval-prompts"])
    assert len(files) == 1 and files[0].is_relative_to(data_home)
    text = files[0].read_text()
    assert all(p["prompt"].rstrip() in text for p in problems)
    # canonical bodies and tests never enter the corpus (checked on the distinctive multi-line ones)
    long_bodies = [p["canonical_solution"].strip() for p in problems if p["canonical_solution"].count("\n") >= 4]
    assert long_bodies and not any(b in text for b in long_bodies)
    assert "def check(candidate)" not in text
    both = corpus_files(["stdlib", "humaneval-prompts"])
    assert both[-1] == files[0] and len(both) > 100
