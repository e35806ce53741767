"""Predictor training reaches high recall on a synthetic layer; files round-trip; -inf threshold = dense."""
import numpy as np
import pytest

from pipower.sparse.predictor import (LayerPredictor, PredictorSelector, Predictors, TrainConfig, evaluate,
                                      train_layer)


def synthetic_layer(n=6000, D=48, F=96, seed=0):
    """Activity is a known function of the input: neuron j fires iff a fixed low-rank score is positive,
    with per-neuron offsets so base rates range from rare to frequent (a power-law-ish profile)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32) * rng.uniform(0.5, 3, (n, 1)).astype(np.float32)
    A = rng.standard_normal((16, D)).astype(np.float32)
    B = rng.standard_normal((F, 16)).astype(np.float32)
    xn = x / np.sqrt((x * x).mean(1, keepdims=True))
    score = np.maximum(xn @ A.T, 0) @ B.T
    offsets = np.quantile(score, rng.uniform(0.3, 0.97, F), axis=0).diagonal()
    return x, score > offsets


def test_trainer_reaches_high_recall_on_a_learnable_layer():
    x, y = synthetic_layer()
    pred, report = train_layer(x, y, TrainConfig(rank=32, epochs=30, batch=256, lr=3e-3))
    assert report.recall >= 0.9, report
    assert report.predicted_sparsity >= 0.5 * report.true_sparsity, report
    assert report.precision >= 0.5, report


def test_pos_weight_trades_precision_for_recall():
    x, y = synthetic_layer(n=3000, seed=1)
    lo = train_layer(x, y, TrainConfig(rank=16, epochs=10, batch=256, lr=3e-3, pos_weight=1.0))[1]
    hi = train_layer(x, y, TrainConfig(rank=16, epochs=10, batch=256, lr=3e-3, pos_weight=8.0))[1]
    assert hi.recall > lo.recall and hi.predicted_sparsity < lo.predicted_sparsity


def test_minus_infinity_threshold_selects_everything():
    rng = np.random.default_rng(0)
    p = LayerPredictor(rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal((10, 4)).astype(np.float32),
                       rng.standard_normal(10).astype(np.float32))
    sel = PredictorSelector(Predictors([p]), tau_pred=-np.inf)
    x = rng.standard_normal((1, 8)).astype(np.float32)
    np.testing.assert_array_equal(sel(0, x, x), np.arange(10))
    assert sel.sparsity == 0.0
    mask = PredictorSelector(Predictors([p]), tau_pred=np.inf)(0, np.vstack([x, x]), None)
    assert mask.shape == (2, 10) and not mask.any()


def test_files_round_trip(tmp_path):
    x, y = synthetic_layer(n=400, D=8, F=16)
    layers, reports = zip(*[train_layer(x, y, TrainConfig(rank=4, epochs=1, seed=s)) for s in range(11)])
    Predictors(list(layers), list(reports), {"model_fingerprint": "abc"}).save(tmp_path / "p.safetensors")
    back = Predictors.load(tmp_path / "p.safetensors")
    assert back.meta["model_fingerprint"] == "abc" and len(back.layers) == 11
    for a, b in zip(layers, back.layers):
        np.testing.assert_array_equal(a.fc2, b.fc2)
    assert back.reports[10].recall == pytest.approx(reports[10].recall, abs=1e-5)
    np.testing.assert_allclose(evaluate(back.layers[3], x, y).loss, evaluate(layers[3], x, y).loss, rtol=1e-6)


def _backends():
    """NumPy always; the compiled backend when built (its absence fails test_cpu_build under CI)."""
    from pipower import _cpu
    from pipower.backend import make_ops
    return [("numpy", make_ops("numpy", 1))] + ([("cython", make_ops("cython", 2))] if _cpu.AVAILABLE else [])


@pytest.mark.parametrize("fmt", ["f32", "f16", "q8"])
def test_stored_predictors_match_float32(fmt):
    """Predictors run through ops.linear in a compact format give the float32 logits within the
    format's error, and so the same decisions except for neurons within that error of tau_pred."""
    x, y = synthetic_layer(n=2000, D=64, F=96)
    pred, _ = train_layer(x, y, TrainConfig(rank=32, epochs=4, batch=256, lr=3e-3))
    ref = PredictorSelector(Predictors([pred]))
    for name, ops in _backends():
        sel = PredictorSelector(Predictors([pred]), ops=ops, weights=fmt)
        for t in (1, 7):
            xs = x[:t]
            want, got = ref.logits(0, xs), sel.logits(0, xs)
            scale = np.abs(want).max()
            tol = {"f32": 1e-5, "f16": 2e-3, "q8": 2e-2}[fmt] * scale
            np.testing.assert_allclose(got, want, atol=tol, err_msg=f"{name} {fmt} T={t}")
            near = np.abs(want) <= tol
            assert np.array_equal((got >= 0)[~near], (want >= 0)[~near]), (name, fmt)
        # -inf still selects every neuron, whatever the format
        sel_all = PredictorSelector(Predictors([pred]), tau_pred=-np.inf, ops=ops, weights=fmt)
        np.testing.assert_array_equal(sel_all(0, x[:1], None), np.arange(96))


def test_rank_not_multiple_of_32_stays_float32():
    from pipower.backend import make_ops
    x, y = synthetic_layer(n=400, D=64, F=40)
    pred, _ = train_layer(x, y, TrainConfig(rank=12, epochs=1))
    sel = PredictorSelector(Predictors([pred]), ops=make_ops("numpy", 1), weights="q8")
    fc1, fc2, _ = sel._stored[0]
    assert getattr(fc1, "fmt", None) == "q8" and isinstance(fc2, np.ndarray)
    want = PredictorSelector(Predictors([pred])).logits(0, x[:3])
    np.testing.assert_allclose(sel.logits(0, x[:3]), want, atol=2e-2 * np.abs(want).max())


@pytest.mark.parametrize("fmt", ["f32", "f16", "q8"])
def test_fused_decode_predictor_equals_the_two_gemv_path(fmt):
    """CythonOps.predict_active (one call) decides like the ops.linear path, up to float rounding at the
    threshold, and counts the same sparsity."""
    from pipower import _cpu
    if not _cpu.AVAILABLE:
        pytest.skip("compiled kernels not built")
    from pipower.backend import make_ops
    x, y = synthetic_layer(n=2000, D=64, F=96)
    pred, _ = train_layer(x, y, TrainConfig(rank=32, epochs=4, batch=256, lr=3e-3))
    for threads in (1, 2):
        ops = make_ops("cython", threads)
        fused = PredictorSelector(Predictors([pred]), 0.5, ops=ops, weights=fmt)
        ref = PredictorSelector(Predictors([pred]), 0.5, ops=ops, weights=fmt)
        active = flips = 0
        for t in range(40):
            xs = x[t:t + 1] * (1 + t)                            # varied scales
            got = fused(0, xs, None)
            logits = ref.logits(0, xs)[0]
            want = np.flatnonzero(logits >= 0.5).astype(np.int32)
            near = np.flatnonzero(np.abs(logits - 0.5) < 1e-4 * np.abs(logits).max())
            assert got.dtype == np.int32 and np.all(np.diff(got) > 0)
            assert set(got.tolist()) ^ set(want.tolist()) <= set(near.tolist()), (fmt, threads, t)
            active += len(got)
            flips += len(set(got.tolist()) ^ set(want.tolist()))
        assert fused.total == 40 * 96 and fused.total - fused.skipped == active
        assert 0 < active < 40 * 96 and flips <= 2
    # -inf keeps the generic path (every neuron) and a [T>1] call returns a mask
    sel = PredictorSelector(Predictors([pred]), -np.inf, ops=make_ops("cython", 1), weights=fmt)
    np.testing.assert_array_equal(sel(0, x[:1], None), np.arange(96))
    assert sel(0, x[:3], None).shape == (3, 96)
