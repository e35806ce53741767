"""Turn a loaded model's FFN sparsity on or off: oracle (tau_act) or predictor (tau_pred) mode.

The three knobs stay separate (docs/SPARSITY.md): tau_act decides which neurons count as active
(oracle mode skips the rest); tau_pred decides which neurons the predictors let through; placement only
decides where neurons are computed and never enters here.
"""
from __future__ import annotations

import json
import logging

import numpy as np

from ..errors import InvalidArgumentError
from ..fetcher import pipower_home
from .corpus import stdlib_files, token_sequences
from .oracle import OracleSelector
from .predictor import Predictors, PredictorSelector
from .profile import _run, calibrate_thresholds, gate_activations

log = logging.getLogger(__name__)
CALIBRATION_TOKENS = 1024        # stdlib tokens used to calibrate per-layer tau for a target sparsity


def calibrate_taus(model, target_sparsity: float, n_tokens: int = CALIBRATION_TOKENS, seq_len: int = 512
                   ) -> np.ndarray:
    """Per-layer tau_act (float32 [L]) giving `target_sparsity` on the first n_tokens of the stdlib
    corpus; cached per model fingerprint, weight format and target under $PIPOWER_HOME/calibration."""
    if not 0.0 <= target_sparsity < 1.0:
        raise InvalidArgumentError(f"target sparsity must be in [0, 1), got {target_sparsity}")
    t = model.transformer
    seq_len = min(seq_len, t.config.max_position_embeddings)     # small models have short contexts
    cache = pipower_home() / "calibration" / f"{model.fingerprint[:16]}-{t.weights}-{n_tokens}-{target_sparsity:g}.json"
    if cache.is_file():
        return np.array(json.loads(cache.read_text())["tau_act"], np.float32)
    samples = [[] for _ in range(t.config.num_hidden_layers)]

    def collect(layer, x, h):
        samples[layer].append(gate_activations(t, layer, h).reshape(-1)[::7].copy())
        return None
    _run(t, token_sequences(model.tokenizer, stdlib_files(), seq_len, n_tokens), collect)
    taus = calibrate_thresholds([np.concatenate(s) for s in samples], target_sparsity)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"tau_act": taus.tolist(), "target_sparsity": target_sparsity,
                                 "tokens": n_tokens, "model": model.source}))
    return taus


def make_selector(model, *, act_threshold: float | None = None, target_sparsity: float | None = None,
                  predictors=None, pred_threshold: float = 0.0):
    """-> the neuron selector for the requested mode, or None for dense. Modes don't combine."""
    given = [act_threshold is not None, target_sparsity is not None, predictors is not None]
    if sum(given) > 1:
        raise InvalidArgumentError("choose one of act_threshold, target_sparsity and predictors")
    t = model.transformer
    if act_threshold is not None:
        if act_threshold < 0:
            raise InvalidArgumentError(f"act_threshold must be >= 0, got {act_threshold}")
        return OracleSelector(t, act_threshold)
    if target_sparsity is not None:
        return OracleSelector(t, calibrate_taus(model, target_sparsity))
    if predictors is not None:
        if not isinstance(predictors, Predictors):
            predictors = Predictors.load(predictors)
        _check_predictors(model, predictors)
        return PredictorSelector(predictors, pred_threshold, ops=t.ops, weights=predictor_format(model))
    return None


def predictor_format(model) -> str:
    """Predictors are read every token like the model's matrices: store them in the model's weight
    format when the ops run it natively (the Cython engine: f16/q8), q8 for 4-bit models, else keep the
    trainer's f32."""
    fmt = getattr(model, "weights", "f32")
    fmt = "q8" if fmt in ("q4", "q4m", "native") else fmt    # 4-bit logits flip too many near-threshold neurons
    return fmt if fmt in getattr(model.transformer.ops, "native_formats", ("f32",)) else "f32"


def _check_predictors(model, predictors: Predictors) -> None:
    c = model.config
    if len(predictors.layers) != c.num_hidden_layers:
        raise InvalidArgumentError(f"predictors have {len(predictors.layers)} layers, model has {c.num_hidden_layers}")
    p = predictors.layers[0]
    if p.fc1.shape[1] != c.hidden_size or p.fc2.shape[0] != c.intermediate_size:
        raise InvalidArgumentError(f"predictor shapes fc1 {p.fc1.shape} / fc2 {p.fc2.shape} do not fit the model "
                                   f"(D={c.hidden_size}, F={c.intermediate_size})")
    fp = predictors.meta.get("model_fingerprint")
    if fp and fp != model.fingerprint:
        log.warning("predictors were trained on another model file (fingerprint %s, this model %s)",
                    fp[:16], model.fingerprint[:16])
