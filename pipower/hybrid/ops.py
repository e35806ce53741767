"""HybridOps: the ops interface over a device backend and a host backend, following an ExecutionPlan.

The graph (pipower/model.py) is unchanged: it calls ops as always, and HybridOps decides per call
where it runs. The rule is "compute where the data lives":
  - ops with a weight (linear, rms_norm, ffn) run where the weight was placed at build time;
  - rope and activation run where their input is; attention where the layer's KV cache is;
  - enter_layer / enter_output move the residual stream to the layer's (output's) home.
Inputs are moved explicitly (device.to_device / to_host); the device ops refuse host arrays, so a
transfer the plan did not intend is an error, not a silent copy.

Split FFN (PowerInfer, per layer and forward call), with h [T, D] the normed FFN input on the GPU:
  1. the selector's active neurons (predictor on the GPU) come to the host (int32 [k] or bool [T, F]),
     as does h: the only two device -> host copies of the layer;
  2. the hot part is launched on the device (asynchronous on a real GPU: the call returns at once);
  3. meanwhile the host computes the cold part with the Cython kernel (GIL released);
  4. the cold partial [T, D] is copied up (pinned staging memory, asynchronous on the device's stream) and
     added in place to the hot partial; the host only waits when it needs a result (to_host).
With a Threshold (oracle mode, one token; fused_threshold when both sides have it) step 1 copies only h:
each side selects its own neurons while computing their gates (ops.ffn's fused threshold FFN), so the
selection never crosses the bus; the two sides' counts add up to the layer's.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidArgumentError
from ..ops import Threshold
from .plan import ExecutionPlan

if TYPE_CHECKING:
    from .device import DeviceOps


@dataclass
class FFNSplit:
    """One layer's neuron split. hot/cold: sorted int32 global indices; local[i]: position of neuron i
    in its part's weight rows; is_hot[i]: which part."""
    hot: np.ndarray
    cold: np.ndarray
    is_hot: np.ndarray                  # bool [F]
    local: np.ndarray                   # int32 [F]

    @classmethod
    def from_hot(cls, hot: np.ndarray, n_ff: int) -> FFNSplit:
        hot = np.asarray(hot, dtype=np.int32)
        if hot.size and (hot[0] < 0 or hot[-1] >= n_ff or np.any(np.diff(hot) <= 0)):
            raise InvalidArgumentError(f"hot neurons must be sorted, unique and in [0, {n_ff})")
        is_hot = np.zeros(n_ff, bool)
        is_hot[hot] = True
        cold = np.flatnonzero(~is_hot).astype(np.int32)
        local = np.empty(n_ff, np.int32)
        local[hot] = np.arange(hot.size, dtype=np.int32)
        local[cold] = np.arange(cold.size, dtype=np.int32)
        return cls(hot, cold, is_hot, local)


@dataclass
class SplitMatrix:
    """An FFN matrix [F, D] whose rows (neurons) are split: `hot` rows placed on the device, `cold` rows
    kept on the host (either may be None when its part is empty)."""
    hot: object
    cold: object
    split: FFNSplit
    shape: tuple

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(p, "nbytes", 0)) for p in (self.hot, self.cold) if p is not None)


@dataclass
class HybridStats:
    """Counters since the last reset (pipower bench / hybrid benchmark read them)."""
    hot_neurons: int = 0              # (token, neuron) pairs computed on the device
    cold_neurons: int = 0             # ... on the host
    host_ffn_seconds: float = 0.0     # wall time of the host's cold-neuron FFN calls
    split_calls: int = 0
    per_layer_cold: dict = field(default_factory=dict)

    def reset(self) -> None:
        self.__init__()


class HybridOps:
    name = "hybrid"

    def __init__(self, device: DeviceOps, host, plan: ExecutionPlan):
        self.device, self.host, self.plan = device, host, plan
        self.native_formats = tuple(f for f in host.native_formats if f in device.native_formats)
        self.n_threads = host.n_threads
        self.stats = HybridStats()
        self._uploaded: dict[int, tuple] = {}      # id(host array) -> (host array, device copy), per forward
        self._layer: int | None = None             # the layer being run (enter_layer), for checks
        # KV positions the plan reserved on the device; Transformer.new_cache caps caches at it
        self.max_context: int | None = None
        # False: wait for the device's hot part before the host starts the cold part (no overlap);
        # the hybrid benchmark times both to measure what the overlap saves
        self.overlap = True

    @property
    def fused_threshold(self) -> bool:
        """ffn takes a Threshold (one token) when the device and the host ops both do."""
        return bool(getattr(self.device, "fused_threshold", False) and getattr(self.host, "fused_threshold", False))

    @property
    def batch_invariant(self) -> bool:
        """Each side's ops are, and what joins them is per row (the FFN's hot and cold partials are added
        element by element, activations move whole rows)."""
        return bool(getattr(self.device, "batch_invariant", False) and getattr(self.host, "batch_invariant", False))

    # -- placement of data ---------------------------------------------------------------------------
    def _home(self, layer: int | None) -> str:
        home = self.plan.output_home if layer is None else self.plan.layer_home[layer]
        return "host" if home == "host" else "device"

    def _to(self, side: str, a, reuse: bool = False):
        """`a` on `side`. reuse: a host constant of this forward (cos/sin, read by every layer) is
        uploaded once and the copy kept until the forward ends; everything else is not kept."""
        if a is None:
            return None
        on_device = self.device.owns(a)
        if side == "device" and not on_device:
            if not reuse:
                return self.device.to_device(a)
            hit = self._uploaded.get(id(a))
            if hit is None or hit[0] is not a:
                hit = (a, self.device.to_device(a))
                self._uploaded[id(a)] = hit
            return hit[1]
        if side == "host" and on_device:
            return self.device.to_host(a)
        return a

    def _side_of(self, a) -> str:
        return "device" if self.device.owns(a) else "host"

    def _ops(self, side: str):
        return self.device if side == "device" else self.host

    @contextlib.contextmanager
    def forward_scope(self, n_tokens: int):
        """Host thread policy, and the device's budgeted allocator for everything the forward allocates
        there (selector and scheduler temporaries included)."""
        try:
            with self.host.forward_scope(n_tokens), self.device.scope():
                yield
        finally:
            self._uploaded.clear()
            self._layer = None

    def enter_layer(self, layer: int, x):
        self._layer = layer
        return self._move_residual(self._home(layer), x)

    def enter_output(self, x):
        return self._move_residual(self._home(None), x)

    def _move_residual(self, side: str, x):
        if side == "device" and not self.device.owns(x):
            return self.device.to_device(x)
        if side == "host" and self.device.owns(x):
            return self.device.to_host(x)
        return x

    def to_host(self, a):
        return self.device.to_host(a) if self.device.owns(a) else a

    def place(self, w):
        """Weights placed after build (the predictors) go to the device when the plan uses one."""
        return self.device.place(w) if self.plan.uses_device else w

    def kv_buffer(self, layer: int, shape: tuple):
        if self._home(layer) == "device":
            return self.device.zeros(shape)
        return self.host.kv_buffer(layer, shape)

    # -- ops -----------------------------------------------------------------------------------------
    def rms_norm(self, x, weight, eps):
        side = self._side_of(weight)
        return self._ops(side).rms_norm(self._to(side, x), weight, eps)

    def activation(self, name, x):
        return self._ops(self._side_of(x)).activation(name, x)

    def linear(self, x, weight, bias=None):
        if isinstance(weight, SplitMatrix):        # oracle mode reads gate . h of every neuron
            return self._split_linear(x, weight)
        side = self._side_of(weight)
        return self._ops(side).linear(self._to(side, x), weight, bias)

    def linear_many(self, x, weights, biases) -> list:
        return [self.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]

    def embed(self, table, ids):
        return self._ops(self._side_of(table)).embed(table, ids)

    def rope(self, x, cos, sin):
        side = self._side_of(x)
        return self._ops(side).rope(x, self._to(side, cos, reuse=True), self._to(side, sin, reuse=True))

    def attention(self, q, k, v, start_pos, window=None):
        side = self._side_of(k)
        if self._layer is not None and side != self._home(self._layer):
            raise InvalidArgumentError(
                f"layer {self._layer} runs on the {self._home(self._layer)} but its KV cache is on the {side}: "
                f"the cache was made before the model moved; make a new one (transformer.new_cache())")
        return self._ops(side).attention(self._to(side, q), k, v, start_pos, window)

    def ffn(self, x, gate, up, down_t, act, idx=None):
        if isinstance(down_t, SplitMatrix):
            return self._split_ffn(x, gate, up, down_t, act, idx)
        side = self._side_of(down_t)
        if not isinstance(idx, Threshold):
            idx = self._to(side, idx)
        return self._ops(side).ffn(self._to(side, x), gate, up, down_t, act, idx)

    def _split_linear(self, x, w: SplitMatrix):
        """x [T, D] @ w.T for a split FFN matrix -> host float32 [T, F] (hot columns from the device)."""
        sp = w.split
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
        if w.hot is not None:
            out[:, sp.hot] = self.device.to_host(self.device.linear(self._to("device", x), w.hot))
        if w.cold is not None:
            out[:, sp.cold] = self.host.linear(self._to("host", x), w.cold)
        return out

    def _split_ffn(self, x, gate: SplitMatrix | None, up: SplitMatrix, down_t: SplitMatrix, act, idx):
        sp, dev = down_t.split, self.device
        T = x.shape[0]
        x = self._to("device", x)
        if isinstance(idx, Threshold):
            return self._split_ffn_threshold(x, gate, up, down_t, act, idx)
        if idx is None:
            hot_sel = cold_sel = None
            n_hot, n_cold = T * sp.hot.size, T * sp.cold.size
        else:
            idx = self.to_host(idx)
            if idx.dtype == np.bool_:                        # per-token mask [T, F] (prefill)
                hot_sel, cold_sel = idx[:, sp.hot], idx[:, sp.cold]
                n_hot, n_cold = int(hot_sel.sum()), int(cold_sel.sum())
            else:                                            # sorted int32 [k], same for all T rows
                on_gpu = sp.is_hot[idx]
                hot_sel, cold_sel = sp.local[idx[on_gpu]], sp.local[idx[~on_gpu]]
                n_hot, n_cold = T * hot_sel.size, T * cold_sel.size
        # 1. everything the host needs comes down before the device work is queued
        x_host = dev.to_host(x) if n_cold else None
        # 2. hot neurons: queued on the device
        out = None
        if n_hot:
            out = dev.ffn(x, _part(gate, "hot"), up.hot, down_t.hot, act,
                          None if hot_sel is None else dev.to_device(hot_sel))
        if not self.overlap:
            dev.synchronize()
        # 3. cold neurons on the host, overlapping the device work
        if n_cold:
            t0 = time.perf_counter()
            cold = self.host.ffn(x_host, _part(gate, "cold"), up.cold, down_t.cold, act, cold_sel)
            self.stats.host_ffn_seconds += time.perf_counter() - t0
            # 4. the cold partial goes up (pinned, async) and is added in place on the device's stream
            out = dev.to_device(cold) if out is None else dev.add_from_host(out, cold)
        if out is None:                                      # nothing active: the FFN adds zero
            out = dev.to_device(np.zeros((T, down_t.shape[1]), np.float32))
        self.stats.hot_neurons += n_hot
        self.stats.cold_neurons += n_cold
        self.stats.split_calls += 1
        return out

    def _split_ffn_threshold(self, x, gate: SplitMatrix | None, up: SplitMatrix, down_t: SplitMatrix, act,
                             threshold: Threshold):
        """One token's split FFN in fused threshold mode: each side runs its own part with the same tau;
        the hot part is queued first, the cold part overlaps it. x: device [1, D] -> device [1, D]."""
        sp, dev = down_t.split, self.device
        kept = {"hot": 0, "cold": 0}

        def counter(side: str):
            def count(computed: int, total: int) -> None:
                kept[side] = computed
                threshold.count(computed, total)
            return Threshold(threshold.tau, count)

        x_host = dev.to_host(x) if sp.cold.size else None
        out = None
        if sp.hot.size:
            out = dev.ffn(x, _part(gate, "hot"), up.hot, down_t.hot, act, counter("hot"))
        if not self.overlap:
            dev.synchronize()
        if sp.cold.size:
            t0 = time.perf_counter()
            cold = self.host.ffn(x_host, _part(gate, "cold"), up.cold, down_t.cold, act, counter("cold"))
            self.stats.host_ffn_seconds += time.perf_counter() - t0
            out = dev.to_device(cold) if out is None else dev.add_from_host(out, cold)
        if out is None:
            out = dev.to_device(np.zeros((1, down_t.shape[1]), np.float32))
        self.stats.hot_neurons += kept["hot"]
        self.stats.cold_neurons += kept["cold"]
        self.stats.split_calls += 1
        return out


def _part(m: SplitMatrix | None, which: str):
    return None if m is None else getattr(m, which)
