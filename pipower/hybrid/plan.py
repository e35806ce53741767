"""Execution plans: where each layer runs under a VRAM budget.

A layer's home is one of
  "device"  attention and the whole FFN on the GPU (all-on-GPU, and layer offload's first k layers);
  "host"    everything on the CPU (layer offload's remaining layers; a CPU-only run);
  "split"   PowerInfer: attention, norms and the hot FFN neurons on the GPU, cold neurons on the CPU,
            the two partial FFN sums added on the GPU.
The output (final norm + LM head) runs on the GPU when `output_home` is "device". Embeddings stay on
the host (one row gather per token; llama.cpp does the same) and the residual moves when a layer's
home differs from where it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidArgumentError
from ..sparse.placement import Placement, PlacementError, layer_weight_bytes

HOMES = ("device", "host", "split")
KINDS = ("gpu", "hybrid", "layer-offload", "cpu")


@dataclass
class ExecutionPlan:
    kind: str                                   # one of KINDS: what built it, for reports
    layer_home: list[str]                       # per layer, one of HOMES
    output_home: str = "device"
    hot: list = field(default_factory=list)     # per layer: sorted int32 hot neurons ("split" layers)
    budget_bytes: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"plan kind must be one of {KINDS}, got {self.kind!r}")
        bad = sorted({h for h in self.layer_home if h not in HOMES})
        if bad or self.output_home not in ("device", "host"):
            raise InvalidArgumentError(f"bad homes {bad or self.output_home!r}; layers take {HOMES}")
        if not self.hot:
            self.hot = [None] * len(self.layer_home)
        if len(self.hot) != len(self.layer_home):
            raise InvalidArgumentError(f"{len(self.hot)} hot sets for {len(self.layer_home)} layers")
        for i, (home, h) in enumerate(zip(self.layer_home, self.hot)):
            if (home == "split") != (h is not None):
                raise InvalidArgumentError(f"layer {i}: a hot set is given exactly for split layers")

    @property
    def uses_device(self) -> bool:
        return self.output_home == "device" or any(h != "host" for h in self.layer_home)

    def summary(self) -> dict:
        """For `pipower info` and benchmark output."""
        n_hot = [len(h) for h in self.hot if h is not None]
        return {"kind": self.kind, "budget_bytes": self.budget_bytes, "output": self.output_home,
                "layers": {home: self.layer_home.count(home) for home in HOMES if home in self.layer_home},
                "hot_neurons": int(sum(n_hot)) if n_hot else None}


def gpu_plan(n_layers: int) -> ExecutionPlan:
    """Everything on the GPU (the model fits)."""
    return ExecutionPlan("gpu", ["device"] * n_layers, "device")


def cpu_plan(n_layers: int) -> ExecutionPlan:
    return ExecutionPlan("cpu", ["host"] * n_layers, "host")


def hybrid_plan(placement: Placement) -> ExecutionPlan:
    """PowerInfer: every layer split by the placement's hot sets, attention and output on the GPU."""
    hot = [np.asarray(h, dtype=np.int32) for h in placement.hot]
    return ExecutionPlan("hybrid", ["split"] * len(hot), "device", hot, placement.budget_bytes)


def layer_offload_plan(n_layers: int, n_device_layers: int, budget_bytes: int | None = None,
                       output_on_device: bool = False) -> ExecutionPlan:
    """llama.cpp's -ngl: the first k whole layers on the GPU, the rest on the CPU."""
    if not 0 <= n_device_layers <= n_layers:
        raise InvalidArgumentError(f"n_device_layers must be in 0..{n_layers}, got {n_device_layers}")
    homes = ["device"] * n_device_layers + ["host"] * (n_layers - n_device_layers)
    return ExecutionPlan("layer-offload", homes, "device" if output_on_device else "host",
                         budget_bytes=budget_bytes)


def layer_bytes(config, weights: str, context_length: int) -> int:
    """Device bytes of one whole layer: its weights (`layer_weight_bytes`: matrices in `weights`, f32
    norms and biases) and its float32 KV cache for `context_length` positions (the hybrid engine keeps
    the cache in f32)."""
    c = config
    kv = 2 * 4 * context_length * c.num_key_value_heads * c.head_dim
    return sum(layer_weight_bytes(c, weights).values()) + kv


def offload_layers_for_budget(config, weights: str, budget_bytes: int, context_length: int,
                              output_bytes: int = 0) -> tuple[int, bool]:
    """The most whole layers (and whether the output head too) that fit `budget_bytes`, as -ngl picks."""
    per = layer_bytes(config, weights, context_length)
    L = config.num_hidden_layers
    k = min(L, budget_bytes // per) if per else L
    if k < 0:
        raise PlacementError("negative budget")
    output = k == L and budget_bytes - L * per >= output_bytes
    return int(k), bool(output)
