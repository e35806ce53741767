"""Hot/cold placement solver: budget, per-layer minimum, optimality vs brute force, files, byte accounting."""
import itertools
import json

import numpy as np
import pytest

from pipower.config import ModelConfig
from pipower.errors import InvalidArgumentError, ModelFileError, PipowerError
from pipower.sparse.placement import (Placement, PlacementError, ffn_neuron_bytes, fixed_gpu_bytes,
                                      gpu_bytes_breakdown, layer_weight_bytes, order_layers,
                                      solve_placement)


def power_law(rng, L, n):
    """Per layer [n] frequencies with a layer-dependent concentration and overall activity."""
    return [rng.random(n) ** rng.uniform(1, 8) * 10 ** rng.uniform(-2, 0) for _ in range(L)]


def allowed_counts(n, g, M):
    """Hot counts a layer may get: 0, or whole batches (the last may be partial) reaching min(M, n)."""
    ks = {min(n, j * g) for j in range(1, -(-n // g) + 1)}
    return sorted({0} | {k for k in ks if k >= min(M, n)})


def top_sum(f, k):
    return float(np.sort(f)[::-1][:k].sum())


def brute_force(freqs, nb, cap, g, M):
    """Best summed hot frequency over every combination of allowed per-layer counts."""
    best = 0.0
    choices = [allowed_counts(f.size, g, M) for f in freqs]
    for ks in itertools.product(*choices):
        if sum(k * b for k, b in zip(ks, nb)) <= cap:
            best = max(best, sum(top_sum(f, k) for f, k in zip(freqs, ks)))
    return best


def check_placement(p, freqs, g, M):
    """Budget, the 0-or->=M rule, and 'hot = the most frequent, ties by index' for every layer."""
    assert p.bytes_used <= p.budget_bytes
    assert p.bytes_used == p.fixed_bytes + sum(h.size * b for h, b in zip(p.hot, p.neuron_bytes))
    for f, h in zip(freqs, p.hot):
        assert h.dtype == np.int32 and np.all(np.diff(h) > 0)
        k = h.size
        assert k in allowed_counts(f.size, g, M)
        expected = np.sort(np.argsort(-f, kind="stable")[:k])
        np.testing.assert_array_equal(h, expected)
    total = sum(f.sum() for f in freqs)
    assert p.hot_freq_share == pytest.approx(sum(f[h].sum() for f, h in zip(freqs, p.hot)) / total)


@pytest.mark.parametrize("seed", range(40))
def test_random_instances_respect_budget_minimum_and_order(seed):
    rng = np.random.default_rng(seed)
    L, n = int(rng.integers(2, 14)), int(rng.integers(5, 300))
    freqs = power_law(rng, L, n)
    if seed % 3 == 0:
        freqs[0][: n // 2] = 0.5                                 # ties: broken by index
    g = int(rng.choice([1, 2, 4, 16, 64]))
    M = int(rng.integers(0, n + 5))
    nb = [int(b) for b in rng.integers(1, 5, L)] if seed % 2 else int(rng.integers(1, 100))
    fixed = int(rng.integers(0, 1000))
    budget = fixed + int(rng.uniform(0, 1.1) * L * n * (np.max(nb)))
    solvers = ["auto", "dp", "greedy"] + (["milp"] if seed % 8 == 0 else [])
    for solver in solvers:
        p = solve_placement(freqs, nb, budget, fixed, min_neurons_per_layer=M, granularity=g, solver=solver)
        check_placement(p, freqs, g, M)


@pytest.mark.parametrize("seed", range(25))
def test_dp_and_milp_match_brute_force_on_tiny_instances(seed):
    rng = np.random.default_rng(100 + seed)
    L = int(rng.integers(2, 5))
    freqs = power_law(rng, L, int(rng.integers(3, 8)))
    freqs = [f[: int(rng.integers(3, f.size + 1))] for f in freqs]       # different n_ff per layer
    g = int(rng.choice([1, 2]))
    M = int(rng.integers(0, 7))
    nb = [int(b) for b in rng.integers(1, 4, L)]
    cap = int(rng.integers(0, sum(f.size * b for f, b in zip(freqs, nb))))
    best = brute_force(freqs, nb, cap, g, M)
    for solver in ("dp", "milp"):
        p = solve_placement(freqs, nb, cap + 7, 7, min_neurons_per_layer=M, granularity=g, solver=solver)
        check_placement(p, freqs, g, M)
        assert sum(p.layer_hot_freq) == pytest.approx(best, rel=1e-9, abs=1e-12), solver
        assert p.status == "optimal"
    greedy = solve_placement(freqs, nb, cap + 7, 7, min_neurons_per_layer=M, granularity=g, solver="greedy")
    assert sum(greedy.layer_hot_freq) <= best + 1e-12


def test_greedy_is_suboptimal_with_a_minimum_and_the_exact_solvers_are_not():
    # Layer 1's first 4 neurons are denser than layer 0's, so the greedy fills 6 slots from layer 1 and
    # then cannot afford layer 0's mandatory 4; the optimum takes 4 + 4 (44 > 36).
    freqs = [np.array([10, 10, 0, 0, 0, 0], float), np.array([6, 6, 6, 6, 6, 6], float)]
    kw = {"min_neurons_per_layer": 4, "granularity": 1}
    greedy = solve_placement(freqs, 1, 8, **kw, solver="greedy")
    assert sum(greedy.layer_hot_freq) == 36 and greedy.status == "heuristic"
    for solver in ("auto", "dp", "milp"):
        p = solve_placement(freqs, 1, 8, **kw, solver=solver)
        assert sum(p.layer_hot_freq) == 44 and [h.size for h in p.hot] == [4, 4]
        assert p.info["greedy_value"] == 36 and p.status == "optimal"
    assert solve_placement(freqs, 1, 8, **kw).solver == "dp"


def test_without_a_minimum_greedy_is_used_and_matches_the_exact_solvers():
    rng = np.random.default_rng(7)
    freqs = power_law(rng, 6, 64)
    p = solve_placement(freqs, 3, 3 * 150, granularity=8)
    assert p.solver == "greedy" and p.status == "optimal" and p.info["uniform_items"]
    for solver in ("dp", "milp"):
        q = solve_placement(freqs, 3, 3 * 150, granularity=8, solver=solver)
        assert sum(q.layer_hot_freq) == pytest.approx(sum(p.layer_hot_freq), rel=1e-9)


def test_dp_and_milp_agree_on_a_medium_instance():
    rng = np.random.default_rng(3)
    freqs = power_law(rng, 10, 512)
    kw = {"min_neurons_per_layer": 200, "granularity": 16}
    dp = solve_placement(freqs, 24, 24 * 2000, **kw, solver="dp")
    milp = solve_placement(freqs, 24, 24 * 2000, **kw, solver="milp")
    assert dp.status == milp.status == "optimal"
    assert sum(dp.layer_hot_freq) == pytest.approx(sum(milp.layer_hot_freq), rel=1e-6)
    assert dp.info["value"] >= dp.info["greedy_value"]


def test_everything_fits_makes_all_neurons_hot_without_a_solver():
    rng = np.random.default_rng(1)
    freqs = power_law(rng, 3, 100)
    p = solve_placement(freqs, 10, 10_000 + 3000, 10_000, min_neurons_per_layer=50)
    assert p.solver == "all-fit" and p.status == "optimal"
    assert [h.size for h in p.hot] == [100] * 3 and p.hot_freq_share == 1.0
    np.testing.assert_array_equal(p.hot[1], np.arange(100, dtype=np.int32))


def test_budget_below_the_fixed_bytes_raises_a_typed_error_saying_how_much(tmp_path):
    cfg = ModelConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      vocab_size=1000)
    parts = gpu_bytes_breakdown(cfg, "f16")
    need = sum(parts.values())
    with pytest.raises(PlacementError, match=r"MiB needed \(attention") as e:
        solve_placement([np.ones(512)] * 4, ffn_neuron_bytes(cfg, "f16"), need - 2 ** 20, parts)
    assert isinstance(e.value, PipowerError) and "at least 1.0 MiB" in str(e.value)
    # exactly the fixed bytes: legal, no FFN neuron on the GPU
    p = solve_placement([np.ones(512)] * 4, ffn_neuron_bytes(cfg, "f16"), need, parts)
    assert p.n_hot == 0 and p.bytes_used == need
    p.save(tmp_path / "empty.safetensors")                       # empty layers survive the file too
    assert [h.size for h in Placement.load(tmp_path / "empty.safetensors").hot] == [0] * 4


def test_layer_order_is_numeric_for_names_and_the_file_round_trip_is_exact(tmp_path):
    # 14 layers, each with its own n_ff and its own hottest neuron, keyed by file-like names and
    # inserted in *string* order (0, 1, 10, 11, ...): any "10" vs "2" mix-up gives a wrong layer.
    L = 14
    freqs = {}
    for i in sorted(range(L), key=str):
        f = np.full(32 + i, 0.01)
        f[i] = 1.0
        freqs[f"activation_{i}.pt"] = f
    ordered = order_layers(freqs)
    assert [f.size for f in ordered] == [32 + i for i in range(L)]
    p = solve_placement(freqs, 8, 8 * L * 3, min_neurons_per_layer=2, granularity=1, fingerprint="abc123")
    for i, h in enumerate(p.hot):
        assert i in h                                            # each layer's own hottest neuron is hot
    path = tmp_path / "placement.safetensors"
    p.save(path)
    q = Placement.load(path, expect_fingerprint="abc123")
    assert q.n_layers == L
    for a, b in zip(p.hot, q.hot):
        np.testing.assert_array_equal(a, b)
        assert b.dtype == np.int32
    for name in ("n_ff", "layer_freq", "layer_hot_freq", "budget_bytes", "fixed_bytes", "neuron_bytes",
                 "granularity", "min_neurons", "solver", "status", "fingerprint"):
        assert getattr(p, name) == getattr(q, name), name
    assert q.bytes_used == p.bytes_used and q.summary() == p.summary()
    with pytest.raises(PlacementError, match="solve again"):
        Placement.load(path, expect_fingerprint="other")


def test_string_keys_and_plain_lists_give_the_same_layers():
    rng = np.random.default_rng(5)
    fl = power_law(rng, 12, 40)
    as_str = {str(i): fl[i] for i in sorted(range(12), key=str)}
    as_int = {i: fl[i] for i in reversed(range(12))}
    for d in (as_str, as_int):
        for a, b in zip(order_layers(d), fl):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(InvalidArgumentError, match="0..2"):
        order_layers({"0": fl[0], "1": fl[1], "3": fl[3]})
    with pytest.raises(InvalidArgumentError):
        order_layers([np.array([1.0, np.nan])])


def test_load_rejects_out_of_range_or_unsorted_indices(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    p = solve_placement([np.arange(8.0)] * 3, 1, 12, granularity=1)
    path = tmp_path / "p.safetensors"
    p.save(path)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["layer.1.hot"] = np.array([3, 2, 99], dtype=np.int32)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ModelFileError, match="layer 1"):
        Placement.load(bad)
    del tensors["layer.1.hot"]
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ModelFileError, match="do not match"):
        Placement.load(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ModelFileError):
        Placement.load(tmp_path / "junk.safetensors")
    assert json.loads(meta["pipower.placement"])["n_layers"] == 3


def test_summary_lists_every_layer_and_totals():
    p = solve_placement([np.arange(8.0), np.ones(8)], 1, 10, granularity=2)
    s = p.summary().splitlines()
    assert len(s) == 1 + 2 + 2 and s[3].split()[0] == "total" and "solver" in s[4]
    assert int(s[3].split()[1]) == p.n_hot == 10


def test_fixed_bytes_terms_add_up_to_the_parameter_count():
    # Qwen2.5-0.5B has 494,032,768 parameters (tied embeddings, q/k/v biases); LLaMA-2-7B 6,738,415,616.
    qwen = ModelConfig(architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896,
                       intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, tie_word_embeddings=True)
    llama = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32)
    for cfg, params, tied in ((qwen, 494_032_768, True), (llama, 6_738_415_616, False)):
        t = gpu_bytes_breakdown(cfg, "f32", include_embeddings=True)
        ffn = ffn_neuron_bytes(cfg, "f32") * cfg.intermediate_size * cfg.num_hidden_layers
        total = sum(t.values()) + ffn - (t["output"] if tied else 0)   # a tied head is one tensor on disk
        assert total == 4 * params
    # KV cache: 2 (k, v) * L * ctx * Hkv * hd * 2 bytes (f16)
    kv = gpu_bytes_breakdown(llama, "q4", context_length=4096)["kv_cache"]
    assert kv == 2 * 32 * 4096 * 32 * 128 * 2 == 2 * 2 ** 30
    # q4 rows: 18 bytes per 32 weights; predictors f16; norms f32
    assert ffn_neuron_bytes(llama, "q4") == 3 * 4096 * 18 // 32
    t = gpu_bytes_breakdown(llama, "q4", predictor_hidden=1024)
    assert t["predictors"] == 32 * (1024 * 4096 + 11008 * 1024) * 2 and t["norms"] == (2 * 32 + 1) * 4096 * 4
    assert fixed_gpu_bytes(llama, "q4", predictor_hidden=1024) == sum(t.values())
    with pytest.raises(InvalidArgumentError):
        gpu_bytes_breakdown(llama, "q3")


@pytest.mark.parametrize("fmt", ["f32", "f16", "q8", "q4"])
@pytest.mark.parametrize("arch", ["qwen2", "llama-plain-mlp"])
def test_layer_weight_bytes_are_a_loaded_layers_bytes(fmt, arch):
    """The one byte formula (placement budgets, layer offload, bench/decode.py) equals the bytes of the
    arrays a loaded model keeps, per part, for each format (q/k/v biases; a plain MLP has no gate)."""
    from helpers_models import CFG, random_tensors
    from pipower.model import Transformer
    from pipower.ops import NumpyOps
    d = dict(CFG) if arch == "qwen2" else dict(CFG, architectures=["LlamaForCausalLM"], model_type="llama",
                                                   mlp_gated=False, hidden_act="relu")
    cfg = ModelConfig.from_dict(d)
    t = Transformer(cfg, random_tensors(d), NumpyOps(), weights=fmt)
    per = layer_weight_bytes(cfg, fmt)
    for layer in t.layers:
        def nbytes(*names):
            return sum(getattr(layer, n).nbytes for n in names if getattr(layer, n) is not None)
        assert per == {"attention": nbytes("q", "k", "v", "o"),
                       "biases": nbytes("q_bias", "k_bias", "v_bias", "o_bias"),
                       "ffn": nbytes("gate", "up", "down_t"), "norms": nbytes("attn_norm", "ffn_norm")}
        assert sum(per.values()) == layer.nbytes


def test_a_70b_shaped_instance_solves_exactly_with_the_dp():
    rng = np.random.default_rng(0)
    L, n = 80, 28672
    freqs = [rng.random(n, dtype=np.float32) ** rng.uniform(1, 12) * 10 ** rng.uniform(-2, 0) for _ in range(L)]
    p = solve_placement(freqs, 1, int(0.3 * L * n), min_neurons_per_layer=n // 2, granularity=256)
    assert p.solver == "dp" and p.status == "optimal" and p.bytes_used <= p.budget_bytes
    assert p.info["value"] >= p.info["greedy_value"]


def test_equal_frequencies_keep_prefixes_under_float_rounding():
    # 0.1 summed in different batches differs by ulps; the greedy must still take prefixes
    freqs = [np.full(1000, 0.1), np.full(1000, 0.1 + 1e-17), np.full(999, 0.3)]
    for g in (1, 3, 7, 64):
        for solver in ("greedy", "dp"):
            p = solve_placement(freqs, [1, 1, 2], 1500, min_neurons_per_layer=5, granularity=g, solver=solver)
            check_placement(p, freqs, g, 5)
