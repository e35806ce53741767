"""Turn a loaded CPU Transformer into a hybrid one: place weights per the plan, swap in HybridOps."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..quant import take_rows
from .ops import FFNSplit, HybridOps, SplitMatrix
from .plan import ExecutionPlan

if TYPE_CHECKING:
    from .device import DeviceOps

log = logging.getLogger(__name__)

_ATTENTION = ("attn_norm", "q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias", "ffn_norm")
_FFN = ("gate", "up", "down_t")


def split_matrix(w, split: FFNSplit, device, cold=None) -> SplitMatrix | None:
    """w's hot rows placed on the device, its cold rows kept on the host (`cold`: already laid out,
    e.g. bundled by the host's arena; default: a contiguous copy)."""
    if w is None:
        return None
    hot = device.place(take_rows(w, split.hot)) if split.hot.size else None
    if cold is None and split.cold.size:
        cold = take_rows(w, split.cold)
    return SplitMatrix(hot, cold, split, tuple(w.shape))


def _cold_arena(transformer, splits: dict, host):
    """A huge-page arena for every split layer's cold FFN rows when the host lays FFNs out as neuron
    bundles (CythonOps): the CPU half of the split FFN then gets the bundled kernel path too.
    splits: {layer index: FFNSplit} of the split layers."""
    if getattr(host, "ffn_layout", "separate") != "bundled":
        return None
    from ..arena import Arena, ffn_nbytes
    layers = transformer.layers
    need = sum(ffn_nbytes(layers[i].gate, layers[i].up, layers[i].down_t, sp.cold.size) for i, sp in splits.items())
    return Arena(need) if need else None


def make_hybrid(transformer, plan: ExecutionPlan, device: DeviceOps, host=None):
    """Place `transformer`'s weights as `plan` says and make its ops a HybridOps(device, host).

    Modifies `transformer` in place (the host copies of placed weights are dropped, so host memory
    is freed as the device fills) and returns it. host: the CPU ops (default: the transformer's
    current ops). The device's memory limit is the hard budget: placing past it raises
    DeviceMemoryError, leaving the transformer unusable (reload it).
    """
    if len(plan.layer_home) != len(transformer.layers):
        raise ValueError(f"plan has {len(plan.layer_home)} layers, model {len(transformer.layers)}")
    host = host or transformer.ops
    place = device.place
    splits = {i: FFNSplit.from_hot(plan.hot[i], layer.down_t.shape[0])
              for i, (layer, home) in enumerate(zip(transformer.layers, plan.layer_home)) if home == "split"}
    cold_arena = _cold_arena(transformer, splits, host)
    for i, (layer, home) in enumerate(zip(transformer.layers, plan.layer_home)):
        if home == "host":
            continue
        for name in _ATTENTION:
            w = getattr(layer, name)
            if w is not None:
                setattr(layer, name, place(w))
        if home == "device":
            for name in _FFN:
                w = getattr(layer, name)
                if w is not None:
                    setattr(layer, name, place(w))
        else:
            split = splits[i]
            mats = [getattr(layer, name) for name in _FFN]
            colds = (cold_arena.bundle_ffn(*mats, rows=split.cold) if cold_arena is not None and split.cold.size
                     else (None,) * len(mats))
            for name, w, cold in zip(_FFN, mats, colds):
                setattr(layer, name, split_matrix(w, split, device, cold))
    if plan.output_home == "device":
        transformer.final_norm = place(transformer.final_norm)
        transformer.lm_head = place(transformer.lm_head)     # its own copy even when tied to embeddings
    transformer.ops = HybridOps(device, host, plan)
    log.info("hybrid build: %s, %d bytes on the device", plan.summary(), device.allocated_bytes())
    return transformer
