"""Oracle mode: compute each layer's gate fully, then skip up/down of neurons with |act(gate)| <= tau_act.

It measures the accuracy cost of tau_act alone, without predictor error. Decode (T = 1) hands the ops a
Threshold where they fuse the selection into the FFN (the gate computed once: pipower._cpu's
ffn_threshold), else sorted indices; prefill hands a per-token mask so each token skips exactly its own
inactive neurons.
"""
from __future__ import annotations

import numpy as np

from ..ops import Threshold
from .profile import gate_activations


class CountingSelector:
    """Base of the neuron selectors: turns a per-token activity decision into what ops.ffn takes and
    counts the (token, neuron) pairs skipped, for the measured sparsity that generate/bench report."""

    def __init__(self):
        self.skipped = 0          # (token, neuron) pairs not computed, summed over layers
        self.total = 0

    def select(self, active: np.ndarray):
        """active: bool [T, F] -> sorted int32 indices when T == 1 (decode kernels), else the mask."""
        self.total += active.size
        self.skipped += active.size - int(active.sum())
        if active.shape[0] == 1:
            return np.flatnonzero(active[0]).astype(np.int32)
        return active

    def count(self, computed: int, total: int) -> None:
        """Record one token's decision made elsewhere (the fused threshold FFN): computed of total."""
        self.total += total
        self.skipped += total - computed

    def select_indices(self, idx: np.ndarray, n_ff: int) -> np.ndarray:
        """One token's decision already as sorted int32 indices out of n_ff neurons: count and pass on."""
        self.total += n_ff
        self.skipped += n_ff - len(idx)
        return idx

    @property
    def sparsity(self) -> float:
        """Fraction of FFN neurons skipped so far (0 = dense)."""
        return self.skipped / self.total if self.total else 0.0

    def reset_counts(self) -> None:
        self.skipped = self.total = 0


class OracleSelector(CountingSelector):
    """Neuron selector for Transformer.ffn_neurons: active iff |act(gate . h)| > tau_act of the layer."""

    def __init__(self, transformer, tau_act):
        super().__init__()
        L = transformer.config.num_hidden_layers
        self.transformer = transformer
        self.tau = np.broadcast_to(np.asarray(tau_act, np.float32), (L,)).copy()   # [L]

    def __call__(self, layer: int, x: np.ndarray, h: np.ndarray):
        ops = self.transformer.ops
        if getattr(ops, "fused_threshold", False) and (h.shape[0] == 1 or getattr(ops, "fused_threshold_batch", False)):
            return Threshold(float(self.tau[layer]), self.count)          # one pass in ops.ffn
        return self.select(gate_activations(self.transformer, layer, h) > self.tau[layer])   # bool [T, F]
