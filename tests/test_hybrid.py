"""The hybrid engine's scheduler on the CPU: the NumPy stand-in plays the GPU (pipower.hybrid.device).

What a GPU run would change is only where arithmetic happens; these tests pin what the scheduler
decides: hybrid == dense with every neuron computed, hot/cold splits add up, the residual and KV cache
live where the plan says, transfers are the intended ones, and the budget is a hard limit.
"""
import numpy as np
import pytest

from pipower.config import ModelConfig
from pipower.errors import InvalidArgumentError
from pipower.hybrid import (
    DeviceMemoryError,
    FFNSplit,
    HybridOps,
    StandInDeviceOps,
    gpu_plan,
    hybrid_plan,
    layer_offload_plan,
    make_hybrid,
)
from pipower.hybrid.device import StandInArray
from pipower.hybrid.plan import ExecutionPlan, offload_layers_for_budget
from pipower.model import Transformer
from pipower.ops import NumpyOps
from pipower.sparse.oracle import CountingSelector
from pipower.sparse.placement import Placement

from helpers_models import CFG, random_tensors

def transformer(weights="f32", seed=0, cfg=None):
    cfg = cfg or CFG
    return Transformer(ModelConfig.from_dict(cfg), random_tensors(cfg, seed), NumpyOps(), weights=weights)


# other graph features the split must carry: untied head without biases (llama), a plain ReLU MLP,
# Mistral's sliding window (shorter than the test sequence)
VARIANTS = {
    "llama": {**CFG, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False},
    "plain-relu": {**CFG, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "relu",
                   "mlp_gated": False, "tie_word_embeddings": False},
    "mistral-window": {**CFG, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                       "sliding_window": 5, "tie_word_embeddings": False},
}


def run(t, ids, steps=4):
    """Prefill ids, then `steps` greedy decode steps -> (all logits stacked, the tokens)."""
    cache = t.new_cache()
    out = [t.forward(ids, cache)]
    tokens = []
    for _ in range(steps):
        tok = int(np.argmax(out[-1][-1]))
        tokens.append(tok)
        out.append(t.forward(np.array([tok]), cache))
    return np.concatenate(out), tokens


def random_hot(n_layers, F, frac, seed=0):
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(F, int(frac * F), replace=False)).astype(np.int32) for _ in range(n_layers)]


def split_plan(hot):
    return ExecutionPlan("hybrid", ["split"] * len(hot), "device", hot)


IDS = np.array([5, 17, 33, 2, 71, 40, 9])


@pytest.mark.parametrize("weights", ["f32", "q8"])
@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_split_equals_dense(weights, frac):
    """Every neuron computed, split between the devices in any proportion: same logits as dense (up to
    float32 summation order: the hot and cold partial sums are added separately)."""
    dense, _ = run(transformer(weights), IDS)
    t = make_hybrid(transformer(weights), split_plan(random_hot(3, 160, frac)), StandInDeviceOps())
    got, _ = run(t, IDS)
    assert np.abs(got - dense).max() <= 1e-5 * np.abs(dense).max()
    s = t.ops.stats
    assert s.hot_neurons + s.cold_neurons == (len(IDS) + 4) * 3 * 160
    assert s.hot_neurons == (len(IDS) + 4) * sum(len(h) for h in random_hot(3, 160, frac))


class FixedSelector(CountingSelector):
    """Per layer a fixed random active set (decode) or mask (prefill): a predictor's output."""

    def __init__(self, frac, F=160, seed=1):
        super().__init__()
        self.rng, self.frac, self.F = np.random.default_rng(seed), frac, F

    def __call__(self, layer, x, h):
        return self.select(self.rng.random((x.shape[0], self.F)) < self.frac)


def test_split_with_sparse_selection_equals_cpu_engine():
    """With a selector, hybrid computes exactly the selected neurons: same result as the CPU engine
    with the same selections, whatever the split."""
    ref = transformer("q8")
    ref.ffn_neurons = FixedSelector(0.4)
    want, _ = run(ref, IDS)
    t = make_hybrid(transformer("q8"), split_plan(random_hot(3, 160, 0.5, seed=3)), StandInDeviceOps())
    t.ffn_neurons = FixedSelector(0.4)
    got, _ = run(t, IDS)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert t.ffn_neurons.sparsity == pytest.approx(ref.ffn_neurons.sparsity)
    s = t.ops.stats
    assert 0 < s.hot_neurons and 0 < s.cold_neurons
    assert s.hot_neurons + s.cold_neurons == t.ffn_neurons.total - t.ffn_neurons.skipped


def test_predictor_minus_infinity_hybrid_equals_dense():
    """The issue's check: predictor mode with tau_pred = -inf on the hybrid engine equals dense, and
    the predictors themselves are placed on the device."""
    from pipower.sparse.predictor import LayerPredictor, Predictors, PredictorSelector
    rng = np.random.default_rng(4)
    preds = Predictors([LayerPredictor(rng.standard_normal((32, 64)).astype(np.float32),
                                       rng.standard_normal((160, 32)).astype(np.float32),
                                       rng.standard_normal(160).astype(np.float32)) for _ in range(3)])
    dense, _ = run(transformer("q8"), IDS)
    dev = StandInDeviceOps()
    t = make_hybrid(transformer("q8"), split_plan(random_hot(3, 160, 0.25)), dev)
    t.ffn_neurons = PredictorSelector(preds, -np.inf, ops=t.ops, weights="q8")
    assert all(dev.owns(fc1) and dev.owns(fc2) for fc1, fc2, _ in t.ffn_neurons._stored)
    got, _ = run(t, IDS)
    assert np.abs(got - dense).max() <= 1e-5 * np.abs(dense).max()
    assert t.ffn_neurons.sparsity == 0.0


@pytest.mark.parametrize("k", [0, 1, 3])
def test_layer_offload_equals_dense(k):
    dense, tokens = run(transformer("q8"), IDS)
    dev = StandInDeviceOps()
    t = make_hybrid(transformer("q8"), layer_offload_plan(3, k, output_on_device=k == 3), dev)
    got, got_tokens = run(t, IDS)
    assert np.abs(got - dense).max() <= 1e-6 * np.abs(dense).max() and got_tokens == tokens
    # KV caches live where their layer runs
    cache = t.new_cache()
    assert [isinstance(b, StandInArray) for b in cache._k] == [i < k for i in range(3)]


def test_gpu_plan_everything_on_device_and_transfers_are_minimal():
    dev = StandInDeviceOps()
    t = make_hybrid(transformer("f16"), gpu_plan(3), dev)
    cache = t.new_cache()
    dev.transfers.update(to_device=0, to_host=0)
    t.forward(np.array([3]), cache)
    # decode step all on the GPU: the embedding row and cos/sin go up (once per forward), logits come down
    assert dev.transfers["to_host"] == 1
    assert dev.transfers["to_device"] == 3


def test_split_decode_transfers_per_layer():
    """Per split layer and decode step: h and the active set come down, the hot selection and the cold
    partial go up; cos/sin go up once per forward, not per layer."""
    dev = StandInDeviceOps()
    t = make_hybrid(transformer("q8"), split_plan(random_hot(3, 160, 0.5)), dev)
    t.ffn_neurons = FixedSelector(0.5)
    cache = t.new_cache()
    t.forward(np.array([1, 2]), cache)
    dev.transfers.update(to_device=0, to_host=0)
    t.forward(np.array([3]), cache)
    L = 3
    assert dev.transfers["to_host"] == 1 + L * 1            # logits + per layer h (active set is host here)
    assert dev.transfers["to_device"] == 1 + 2 + L * 2      # x, cos, sin + per layer (hot idx, cold partial)


def test_residual_never_mixes_host_and_device():
    """The stand-in refuses host arrays in device ops (as CuPy does): a scheduler that forgot a move
    would fail here rather than silently compute on the host."""
    dev = StandInDeviceOps()
    with pytest.raises(InvalidArgumentError, match="host"):
        dev.linear(np.ones((1, 4), np.float32), dev.place(np.ones((3, 4), np.float32)))
    with pytest.raises(InvalidArgumentError):
        dev.to_host(np.ones(3))


def test_budget_is_a_hard_limit():
    t = transformer("q8")
    need = sum(layer.nbytes for layer in t.layers) + t.lm_head.nbytes + t.final_norm.nbytes
    with pytest.raises(DeviceMemoryError):
        make_hybrid(transformer("q8"), gpu_plan(3), StandInDeviceOps(limit_bytes=need // 2))
    dev = StandInDeviceOps(limit_bytes=need + 10 ** 6)
    t = make_hybrid(transformer("q8"), gpu_plan(3), dev)
    run(t, IDS)
    assert dev.peak_bytes() <= dev.limit_bytes
    # a hybrid split of 25% hot neurons holds less than everything
    dev2 = StandInDeviceOps()
    make_hybrid(transformer("q8"), split_plan(random_hot(3, 160, 0.25)), dev2)
    assert dev2.allocated_bytes() < dev.allocated_bytes()


def test_offload_layer_count_from_budget():
    cfg = ModelConfig.from_dict(CFG)
    from pipower.hybrid.plan import layer_bytes
    per = layer_bytes(cfg, "q8", 128)
    assert offload_layers_for_budget(cfg, "q8", per * 2 + 5, 128) == (2, False)
    assert offload_layers_for_budget(cfg, "q8", per * 3 + 100, 128, output_bytes=100) == (3, True)
    assert offload_layers_for_budget(cfg, "q8", per - 1, 128) == (0, False)


def test_ffn_split_maps():
    sp = FFNSplit.from_hot(np.array([1, 4, 5], np.int32), 7)
    assert sp.cold.tolist() == [0, 2, 3, 6]
    assert sp.local.tolist() == [0, 0, 1, 2, 1, 2, 3]
    with pytest.raises(InvalidArgumentError):
        FFNSplit.from_hot(np.array([4, 1], np.int32), 7)
    with pytest.raises(InvalidArgumentError):
        FFNSplit.from_hot(np.array([7], np.int32), 7)


def test_plan_validation_and_hybrid_plan_from_placement():
    with pytest.raises(InvalidArgumentError):
        ExecutionPlan("hybrid", ["split", "gpu"], "device", [np.arange(3), None])
    with pytest.raises(InvalidArgumentError):
        ExecutionPlan("hybrid", ["split"], "device", [None])
    hot = random_hot(3, 160, 0.3)
    p = Placement(hot=hot, n_ff=[160] * 3, layer_freq=[1.0] * 3, layer_hot_freq=[0.5] * 3,
                  budget_bytes=10 ** 6, fixed_bytes=0, neuron_bytes=100)
    plan = hybrid_plan(p)
    assert plan.layer_home == ["split"] * 3 and plan.summary()["hot_neurons"] == sum(map(len, hot))


def test_oracle_mode_runs_on_split_layers():
    """Oracle mode reads gate . h of all neurons: a split gate is computed on both sides and merged."""
    from pipower.sparse.oracle import OracleSelector
    ref = transformer("f32")
    ref.ffn_neurons = OracleSelector(ref, 0.02)
    want, _ = run(ref, IDS)
    t = make_hybrid(transformer("f32"), split_plan(random_hot(3, 160, 0.4)), StandInDeviceOps())
    t.ffn_neurons = OracleSelector(t, 0.02)
    got, _ = run(t, IDS)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert t.ffn_neurons.sparsity == pytest.approx(ref.ffn_neurons.sparsity, abs=0.01)


def test_hybrid_ops_is_the_ops_interface():
    t = make_hybrid(transformer("q8"), split_plan(random_hot(3, 160, 0.5)), StandInDeviceOps())
    assert isinstance(t.ops, HybridOps) and t.ops.native_formats == NumpyOps.native_formats


def test_dropped_kv_cache_frees_device_memory():
    """A generation's KV cache goes with the generation: many sequences fit one budget."""
    import gc
    dev = StandInDeviceOps()
    t = make_hybrid(transformer("q8"), gpu_plan(3), dev)
    weights_only = dev.allocated_bytes()
    for _ in range(3):
        run(t, IDS, steps=1)
        gc.collect()
        assert dev.allocated_bytes() == weights_only


# --- the real GPU backend's code (CupyOps) behind the scheduler: its kernels emulated on the CPU, or on a
# real GPU under `-m gpu` (the cupy_ops fixture of conftest.py) ---------------------------------------------

def test_device_backends_meet_the_device_contract(cupy_ops):
    """StandInDeviceOps and CupyOps have every method and attribute of the DeviceOps protocol."""
    from pipower.hybrid.device import DeviceOps
    methods = [n for n, v in vars(DeviceOps).items() if callable(v) and not n.startswith("_")]
    attributes = list(DeviceOps.__annotations__)
    assert {"place", "to_device", "to_host", "add_from_host", "ffn", "attention"} <= set(methods)
    assert attributes == ["name", "native_formats", "limit_bytes", "transfers", "fused_threshold",
                          "batch_invariant"]
    for dev in (StandInDeviceOps(), cupy_ops(limit_bytes=1 << 20)):
        missing = [n for n in methods + attributes if not hasattr(dev, n)]
        assert not missing, (type(dev).__name__, missing)
    import sys
    assert isinstance(dev, NumpyOps) and dev.xp is sys.modules["cupy"]     # the reference ops over CuPy


def test_gpu_backend_does_not_import_the_hybrid_engine():
    """pipower._gpu sits below pipower.hybrid: no import circle (DeviceMemoryError lives in errors.py)."""
    import subprocess
    import sys
    code = ("import sys, pipower._gpu.ops, pipower._gpu.memory; "
            "bad = [m for m in sys.modules if m.startswith('pipower.hybrid')]; assert not bad, bad; "
            "from pipower.errors import DeviceMemoryError as a; from pipower.hybrid import DeviceMemoryError as b; "
            "from pipower.hybrid.device import DeviceMemoryError as c; assert a is b is c")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("weights", ["f16", "q8"])
def test_cupy_ops_behind_the_scheduler_equal_dense(cupy_ops, weights):
    """The hybrid split and layer offload with CupyOps as the device (kernels emulated) == dense, for a
    dense run and for a sparse selection; the KV cache of device layers is CuPy memory."""
    dense, tokens = run(transformer(weights), IDS)
    for plan in (split_plan(random_hot(3, 160, 0.4)), layer_offload_plan(3, 2), gpu_plan(3)):
        dev = cupy_ops()
        t = make_hybrid(transformer(weights), plan, dev)
        got, got_tokens = run(t, IDS)
        assert np.abs(got - dense).max() <= 1e-4 * np.abs(dense).max(), plan.kind
        assert got_tokens == tokens
        assert dev.owns(t.new_cache()._k[0])
    ref = transformer(weights)
    ref.ffn_neurons = FixedSelector(0.3)
    want, _ = run(ref, IDS)
    t = make_hybrid(transformer(weights), split_plan(random_hot(3, 160, 0.6)), cupy_ops())
    t.ffn_neurons = FixedSelector(0.3)
    got, _ = run(t, IDS)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


# --- the engine entry point (pipower.hybrid.to_device) on a Model-like object ---------------------------

def model_like(weights="q8"):
    from types import SimpleNamespace
    t = transformer(weights)
    return SimpleNamespace(config=t.config, transformer=t, weights=weights, fingerprint="", plan=None)


def test_to_device_caps_the_kv_cache_and_counts_predictors():
    from pipower.errors import ContextLengthError
    from pipower.hybrid import to_device
    from pipower.hybrid.engine import plan_for
    from pipower.sparse.predictor import LayerPredictor, Predictors
    from pipower.sparse.stats import ActivationStats
    rng = np.random.default_rng(0)
    stats = ActivationStats(counts=rng.integers(0, 100, (3, 160)), n_tokens=100, tau_act=np.zeros(3, np.float32))
    preds = Predictors([LayerPredictor(np.zeros((64, 64), np.float32), np.zeros((160, 64), np.float32),
                                       np.zeros(160, np.float32)) for _ in range(3)])
    budget = 330_000
    kw = dict(vram_budget=budget, stats=stats, context_length=32, reserve_bytes=0)
    without = plan_for(model_like(), "hybrid", **kw)
    with_preds = plan_for(model_like(), "hybrid", predictors=preds, **kw)
    n_hot = [sum(map(len, p.hot)) for p in (without, with_preds)]
    assert 0 < n_hot[1] < n_hot[0]                      # the predictors' bytes come out of the FFN share
    m = to_device(model_like(), "hybrid", device_ops=StandInDeviceOps(limit_bytes=budget), predictors=preds, **kw)
    cache = m.transformer.new_cache(max_len=1000)
    assert cache.max_len == 32                          # what the plan reserved, not the model's 128
    m.transformer.ffn_neurons = __import__("pipower.sparse.predictor", fromlist=["x"]).PredictorSelector(
        preds, -np.inf, ops=m.transformer.ops, weights="q8")
    run_cache = m.transformer.new_cache()
    m.transformer.forward(np.arange(30), run_cache)     # predictors placed, budget holds
    with pytest.raises(ContextLengthError):
        m.transformer.forward(np.arange(3), run_cache)


def test_a_cache_made_before_the_move_is_refused():
    t = transformer("q8")
    old = t.new_cache()
    make_hybrid(t, gpu_plan(3), StandInDeviceOps())
    with pytest.raises(InvalidArgumentError, match="new_cache"):
        t.forward(np.array([1, 2]), old)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_split_and_offload_equal_dense_on_other_graph_features(variant):
    cfg = VARIANTS[variant]
    dense, tokens = run(transformer("q8", cfg=cfg), IDS)
    for plan in (split_plan(random_hot(3, 160, 0.4)), layer_offload_plan(3, 1, output_on_device=False)):
        t = make_hybrid(transformer("q8", cfg=cfg), plan, StandInDeviceOps())
        got, got_tokens = run(t, IDS)
        assert np.abs(got - dense).max() <= 1e-5 * np.abs(dense).max(), (variant, plan.kind)
        assert got_tokens == tokens


@pytest.mark.parametrize("variant", ["plain-relu", "mistral-window"])
def test_cupy_ops_on_other_graph_features(cupy_ops, variant):
    cfg = VARIANTS[variant]
    dense, tokens = run(transformer("q8", cfg=cfg), IDS)
    t = make_hybrid(transformer("q8", cfg=cfg), split_plan(random_hot(3, 160, 0.4)), cupy_ops())
    got, got_tokens = run(t, IDS)
    assert np.abs(got - dense).max() <= 1e-4 * np.abs(dense).max() and got_tokens == tokens


def test_split_on_the_cython_host_bundles_the_cold_rows():
    """A CythonOps host lays the cold rows of split layers out as neuron bundles (its fast sparse-FFN
    path); the split model still equals the dense one, and the layers left whole stay bundled."""
    from pipower import _cpu
    if not _cpu.AVAILABLE:
        pytest.skip("compiled kernels not built")
    from pipower._cpu import linear_ops
    from pipower.backend import make_ops

    def cython_model():
        return Transformer(ModelConfig.from_dict(CFG), random_tensors(CFG), make_ops("cython", 2), weights="q8")
    dense, _ = run(cython_model(), IDS)
    hot = random_hot(3, 160, 0.3)
    plan = ExecutionPlan("hybrid", ["split", "split", "host"], "device", hot[:2] + [None])
    t = make_hybrid(cython_model(), plan, StandInDeviceOps())
    for layer in t.layers[:2]:
        assert linear_ops.ffn_layout(layer.gate.cold, layer.up.cold, layer.down_t.cold) == "bundled"
        assert layer.up.cold.shape == (160 - len(hot[0]), CFG["hidden_size"])
    assert linear_ops.ffn_layout(t.layers[2].gate, t.layers[2].up, t.layers[2].down_t) == "bundled"
    got, _ = run(t, IDS)
    assert np.abs(got - dense).max() <= 1e-5 * np.abs(dense).max()


@pytest.mark.parametrize("weights", ["f16", "q8"])
@pytest.mark.parametrize("device", ["stand-in", "cupy-emu"])
def test_fused_threshold_on_the_scheduler_is_the_unfused_path_bitwise(cupy_ops, weights, device, monkeypatch):
    """Oracle mode's decode steps hand HybridOps a Threshold: split layers select on each side while
    computing their gates, whole layers on their own side. Logits, the measured sparsity and the
    hot / cold counts are bitwise those of the unfused path (gate linear over both sides, then indices)."""
    from pipower.sparse.oracle import OracleSelector
    plans = (split_plan(random_hot(3, 160, 0.4)), layer_offload_plan(3, 2), gpu_plan(3))

    def run_all():
        out = []
        for plan in plans:
            dev = StandInDeviceOps() if device == "stand-in" else cupy_ops()
            t = make_hybrid(transformer(weights), plan, dev)
            t.ffn_neurons = OracleSelector(t, 0.03)
            logits, _ = run(t, IDS)
            s = t.ops.stats
            out.append((logits, t.ffn_neurons.skipped, t.ffn_neurons.total, s.hot_neurons, s.cold_neurons,
                        t.ops.fused_threshold))
        return out

    fused = run_all()
    monkeypatch.setattr(HybridOps, "fused_threshold", False)
    unfused = run_all()
    for plan, f, u in zip(plans, fused, unfused):
        assert f[5] and not u[5]
        np.testing.assert_array_equal(f[0], u[0], err_msg=plan.kind)
        assert f[1:5] == u[1:5], plan.kind
        assert 0 < f[1] < f[2]                       # the threshold skipped some neurons, not all


# --- batch invariance on the device engines: what speculative verification relies on ---------------------

def cython_transformer(weights="q8", cfg=None):
    from pipower import _cpu
    if not _cpu.AVAILABLE:
        pytest.skip("compiled kernels not built")
    from pipower.backend import make_ops
    cfg = cfg or CFG
    return Transformer(ModelConfig.from_dict(cfg), random_tensors(cfg), make_ops("cython", 2), weights=weights)


@pytest.mark.parametrize("variant", ["qwen", "mistral-window"])
def test_device_engines_forward_is_bitwise_single_steps(cupy_ops, variant):
    """On CupyOps (all layers, or split with the cold rows on a CythonOps host), a forward over several new
    tokens gives bitwise the logits of one decode step per token; the stand-in over the NumPy reference
    does not promise it (BLAS)."""
    cfg = CFG if variant == "qwen" else VARIANTS[variant]
    new = np.array([8, 90, 14, 14, 61, 3, 27, 50, 11, 64])          # 10 tokens: two token tiles
    for plan in (gpu_plan(3), split_plan(random_hot(3, 160, 0.4))):
        t = make_hybrid(cython_transformer(cfg=cfg), plan, cupy_ops())
        assert t.ops.batch_invariant, plan.kind
        c1, c2 = t.new_cache(), t.new_cache()
        t.forward(IDS, c1)
        t.forward(IDS, c2)
        batched = t.forward(new, c1)
        steps = np.concatenate([t.forward(new[i:i + 1], c2) for i in range(len(new))])
        np.testing.assert_array_equal(batched, steps, err_msg=plan.kind)
    assert not make_hybrid(transformer("q8"), gpu_plan(3), StandInDeviceOps()).ops.batch_invariant
