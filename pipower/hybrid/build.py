"""Turn a loaded CPU Transformer into a hybrid one: place weights per the plan, swap in HybridOps."""
from __future__ import annotations

import logging

import numpy as np

from ..quant import QMatrix
from .ops import FFNSplit, HybridOps, SplitMatrix
from .plan import ExecutionPlan

log = logging.getLogger(__name__)

_ATTENTION = ("attn_norm", "q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias", "ffn_norm")
_FFN = ("gate", "up", "down_t")


def take_rows(w, rows: np.ndarray):
    """Rows `rows` of a float32 array or QMatrix [N, K] -> the same format [len(rows), K], contiguous."""
    if isinstance(w, QMatrix):
        scales = None if w.scales is None else np.ascontiguousarray(w.scales[rows])
        return QMatrix(w.fmt, (len(rows), w.shape[1]), np.ascontiguousarray(w.data[rows]), scales)
    return np.ascontiguousarray(w[rows])


def split_matrix(w, split: FFNSplit, device) -> SplitMatrix | None:
    if w is None:
        return None
    hot = device.place(take_rows(w, split.hot)) if split.hot.size else None
    cold = take_rows(w, split.cold) if split.cold.size else None
    return SplitMatrix(hot, cold, split, tuple(w.shape))


def make_hybrid(transformer, plan: ExecutionPlan, device, host=None):
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
            split = FFNSplit.from_hot(plan.hot[i], layer.down_t.shape[0])
            for name in _FFN:
                setattr(layer, name, split_matrix(getattr(layer, name), split, device))
    if plan.output_home == "device":
        transformer.final_norm = place(transformer.final_norm)
        transformer.lm_head = place(transformer.lm_head)     # its own copy even when tied to embeddings
    transformer.ops = HybridOps(device, host, plan)
    log.info("hybrid build: %s, %d bytes on the device", plan.summary(), device.allocated_bytes())
    return transformer
