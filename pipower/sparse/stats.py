"""ActivationStats: what `pipower profile` measured, saved as one safetensors file + JSON metadata.

Tensors (L layers, F FFN neurons, D hidden, n sampled tokens per layer):
  counts          int64 [L, F]    tokens on which each neuron was active (|act(gate . h)| > tau_act)
  tau_act         float32 [L]     the per-layer threshold used
  layer.{i}.x     float16 [n, D]  sampled pre-FFN-norm residual rows (predictor inputs), layer i
  layer.{i}.y     uint8 [n, ceil(F/8)]  their activity labels, np.packbits along neurons
Layers are written and read by numeric index (never by sorting key strings: "10" < "2").

Size: the sampled rows dominate, 2 D + ceil(F/8) bytes per row and layer (Qwen2.5-0.5B: 2400 bytes x 24
layers, so 16384 rows per layer make a 945 MB file, 1736 rows 100 MB). `estimate_bytes` says the size
before profiling; `samples_within` picks the row count for a size (what `pipower profile` does by default).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .files import open_tensors, save_tensors

FORMAT = "pipower-activation-stats"
FORMAT_VERSION = 1
_HEADER_BYTES = 4096          # safetensors header (JSON names, shapes, offsets; our metadata), generous


def sample_row_bytes(hidden_size: int, n_ff: int) -> int:
    """Bytes one sampled token costs in one layer: its float16 input row and its packed labels."""
    return 2 * hidden_size + (n_ff + 7) // 8


def estimate_bytes(n_layers: int, hidden_size: int, n_ff: int, samples: int) -> int:
    """Size of a stats file with `samples` rows per layer (an upper bound when fewer rows are kept)."""
    fixed = n_layers * n_ff * 8 + n_layers * 4 + _HEADER_BYTES + n_layers * 200
    return fixed + n_layers * samples * sample_row_bytes(hidden_size, n_ff)


def samples_within(n_layers: int, hidden_size: int, n_ff: int, max_bytes: int) -> int:
    """The most rows per layer whose stats file stays within `max_bytes` (0 if even the counts do not)."""
    room = max_bytes - estimate_bytes(n_layers, hidden_size, n_ff, 0)
    return max(room // (n_layers * sample_row_bytes(hidden_size, n_ff)), 0)


@dataclass
class ActivationStats:
    counts: np.ndarray                      # int64 [L, F]
    n_tokens: int
    tau_act: np.ndarray                     # float32 [L]
    inputs: list = field(default_factory=list)   # per layer float16 [n, D]
    labels: list = field(default_factory=list)   # per layer uint8 [n, ceil(F/8)]
    meta: dict = field(default_factory=dict)     # model fingerprint, corpus, thresholds, ...

    @property
    def n_layers(self) -> int:
        return self.counts.shape[0]

    @property
    def n_ff(self) -> int:
        return self.counts.shape[1]

    @property
    def freqs(self) -> np.ndarray:
        """float64 [L, F]: fraction of profiled tokens on which each neuron was active."""
        return self.counts / max(self.n_tokens, 1)

    def layer_labels(self, i: int) -> np.ndarray:
        """bool [n, F] activity labels of layer i's samples."""
        return np.unpackbits(self.labels[i], axis=1, count=self.n_ff).astype(bool)

    def save(self, path) -> None:
        tensors = {"counts": self.counts.astype(np.int64), "tau_act": self.tau_act.astype(np.float32)}
        for i, (x, y) in enumerate(zip(self.inputs, self.labels)):
            tensors[f"layer.{i}.x"] = np.ascontiguousarray(x, dtype=np.float16)
            tensors[f"layer.{i}.y"] = np.ascontiguousarray(y, dtype=np.uint8)
        save_tensors(path, tensors, {**self.meta, "format": FORMAT, "version": FORMAT_VERSION,
                                     "n_tokens": self.n_tokens})

    @classmethod
    def load(cls, path) -> "ActivationStats":
        with open_tensors(path, FORMAT, "activation-stats") as (meta, f):
            counts, tau = f.get_tensor("counts"), f.get_tensor("tau_act")
            keys = set(f.keys())
            inputs, labels = [], []
            for i in range(counts.shape[0]):          # numeric layer order
                if f"layer.{i}.x" in keys:
                    inputs.append(f.get_tensor(f"layer.{i}.x"))
                    labels.append(f.get_tensor(f"layer.{i}.y"))
        return cls(counts, int(meta.get("n_tokens", 0)), tau, inputs, labels, meta)
