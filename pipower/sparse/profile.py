"""Activation profiling: run real text through the model and record, per layer and neuron, how often
|act(gate . h)| exceeds tau_act, plus sampled (input, label) pairs for predictor training.

The recorder hooks the graph's FFN neuron selector (model.Transformer.ffn_neurons): it sees each layer's
pre-norm residual x and normed input h [T, D], recomputes the gate pre-activations [T, F] with the same
ops, and never changes what the model computes.
"""
from __future__ import annotations

import logging

import numpy as np

from ..errors import InvalidArgumentError
from .stats import ActivationStats

log = logging.getLogger(__name__)


def gate_activations(transformer, layer: int, h: np.ndarray) -> np.ndarray:
    """|act(gate . h)| float32 [T, F] of one layer (for a plain MLP: |act(up . h)|)."""
    lw = transformer.layers[layer]
    w = lw.gate if lw.gate is not None else lw.up
    pre = transformer.ops.linear(h, w)
    return np.abs(transformer.ops.activation(transformer.config.hidden_act, pre))


def calibrate_thresholds(samples: list[np.ndarray], target_sparsity: float) -> np.ndarray:
    """Per-layer tau (CATS-style): the quantile of |act| below which `target_sparsity` of the
    (token, neuron) pairs fall. samples: per layer float32 |act| values (any shape) -> float32 [L]."""
    if not 0.0 <= target_sparsity < 1.0:
        raise InvalidArgumentError(f"target sparsity must be in [0, 1), got {target_sparsity}")
    return np.array([np.quantile(s.reshape(-1), target_sparsity) for s in samples], dtype=np.float32)


class ActivationRecorder:
    """The selector hook: counts active neurons per layer; keeps up to `max_samples` rows per layer."""

    def __init__(self, transformer, tau_act: np.ndarray, max_samples: int, sample_rate: float, seed: int = 0):
        L, F = transformer.config.num_hidden_layers, transformer.config.intermediate_size
        self.transformer, self.tau = transformer, np.asarray(tau_act, np.float32)
        self.counts = np.zeros((L, F), np.int64)
        self.n_tokens = 0
        self.max_samples, self.sample_rate = max_samples, sample_rate
        self.rng = np.random.default_rng(seed)
        self.inputs = [[] for _ in range(L)]
        self.labels = [[] for _ in range(L)]
        self.n_kept = np.zeros(L, np.int64)
        self._keep = None        # rows sampled for this forward call, shared by all layers

    def __call__(self, layer: int, x: np.ndarray, h: np.ndarray):
        if layer == 0:
            self.n_tokens += x.shape[0]
            self._keep = np.flatnonzero(self.rng.random(x.shape[0]) < self.sample_rate)
        active = gate_activations(self.transformer, layer, h) > self.tau[layer]     # bool [T, F]
        self.counts[layer] += active.sum(axis=0)
        room = self.max_samples - self.n_kept[layer]
        keep = self._keep[:max(room, 0)]
        if keep.size:
            self.inputs[layer].append(x[keep].astype(np.float16))
            self.labels[layer].append(np.packbits(active[keep], axis=1))
            self.n_kept[layer] += keep.size
        return None      # profile the dense model: every neuron is computed

    def stats(self, meta: dict) -> ActivationStats:
        D = self.transformer.config.hidden_size
        F = self.transformer.config.intermediate_size
        cat = [np.concatenate(v) if v else np.zeros((0, D), np.float16) for v in self.inputs]
        lab = [np.concatenate(v) if v else np.zeros((0, (F + 7) // 8), np.uint8) for v in self.labels]
        return ActivationStats(self.counts.copy(), self.n_tokens, self.tau.copy(), cat, lab, meta)


def profile(model, sequences, *, tau_act: float | None = None, target_sparsity: float | None = None,
            calibration_sequences: int = 2, max_samples: int = 16384, sample_rate: float = 0.5,
            progress=None, meta: dict | None = None, seed: int = 0) -> ActivationStats:
    """Profile `model` (a pipower.Model) over `sequences` (iterable of token-id lists).

    Give tau_act (one number for every layer) or target_sparsity (per-layer tau calibrated on the first
    `calibration_sequences` sequences, which are then profiled too). progress: callable(n_tokens) or None.
    """
    if (tau_act is None) == (target_sparsity is None):
        raise InvalidArgumentError("give exactly one of tau_act and target_sparsity")
    t = model.transformer
    L = t.config.num_hidden_layers
    seqs = iter(sequences)
    calib = []
    if target_sparsity is not None:
        calib = [s for _, s in zip(range(calibration_sequences), seqs)]
        if not calib:
            raise InvalidArgumentError("no sequences to profile (an empty corpus, or one shorter than a sequence)")
        samples = [[] for _ in range(L)]

        def collect(layer, x, h):
            a = gate_activations(t, layer, h)
            samples[layer].append(a.reshape(-1)[::7].copy())   # a thinned sample bounds memory
            return None
        _run(t, calib, collect)
        tau = calibrate_thresholds([np.concatenate(s) for s in samples], target_sparsity)
    else:
        tau = np.full(L, tau_act, np.float32)
    recorder = ActivationRecorder(t, tau, max_samples, sample_rate, seed)
    import itertools
    _run(t, itertools.chain(calib, seqs), recorder, progress)
    if recorder.n_tokens == 0:
        raise InvalidArgumentError("no sequences to profile (an empty corpus, or one shorter than a sequence)")
    info = {"model_fingerprint": model.fingerprint, "model_source": model.source,
            "tau_act": None if tau_act is None else float(tau_act), "target_sparsity": target_sparsity,
            "weights": t.weights, **(meta or {})}
    return recorder.stats(info)


def _run(transformer, sequences, hook, progress=None) -> None:
    """Prefill each sequence from a fresh cache with `hook` as the neuron selector."""
    previous = transformer.ffn_neurons
    transformer.ffn_neurons = hook
    try:
        for seq in sequences:
            transformer.forward(np.asarray(seq), transformer.new_cache(max_len=len(seq)), last_only=True)
            if progress is not None:
                progress(len(seq))
    finally:
        transformer.ffn_neurons = previous
