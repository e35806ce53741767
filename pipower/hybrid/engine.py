"""`device=` of pipower.load: cpu, gpu, hybrid (PowerInfer) or offload (llama.cpp's -ngl baseline).

  cpu      the CPU engine, nothing on a device (the default)
  gpu      the whole model on the GPU; the budget (if given) must hold it
  hybrid   attention, norms, output head and the hot neurons on the GPU, cold neurons on the CPU.
           The hot sets come from a placement file (`pipower plan`) or are solved here from an
           activation-stats file (`pipower profile`) at `vram_budget`
  offload  the first k whole layers on the GPU, the rest on the CPU, k the most that fit the budget

The budget is enforced by the device ops as a hard memory limit (DeviceMemoryError past it).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError
from .plan import (
    ExecutionPlan,
    cpu_plan,
    gpu_plan,
    hybrid_plan,
    layer_offload_plan,
    offload_layers_for_budget,
)

if TYPE_CHECKING:
    from .device import DeviceOps

log = logging.getLogger(__name__)

DEVICES = ("cpu", "gpu", "hybrid", "offload")
DEFAULT_CONTEXT = 4096          # KV positions reserved on the device when planning (f32)
# Device scratch the plan keeps free: CupyOps' dequantization chunks (64 MiB), activations, attention scores
DEFAULT_RESERVE = 96 << 20


def device_ops_for(vram_budget: int | None) -> DeviceOps:
    """The CUDA device ops, with the budget as their memory limit. Raises DeviceUnavailableError."""
    from .. import _gpu
    from ..errors import DeviceUnavailableError
    ok, why = _gpu.status()
    if not ok:
        raise DeviceUnavailableError(f"no usable GPU: {why}. Install the gpu extra (pip install "
                                     f"'pipower[gpu]') on a machine with a CUDA device, or use --device cpu")
    from .._gpu.ops import CupyOps
    # indices reaching the device come from FFNSplit or the selector's sorted lists: valid by construction,
    # so skip the per-call check (a reduction and a sync per layer)
    return CupyOps(limit_bytes=vram_budget, check_indices=False)


def predictor_ranks(predictors) -> list[int] | None:
    """Per-layer predictor hidden sizes of a predictor file or Predictors object (None -> None)."""
    if predictors is None:
        return None
    from ..sparse.predictor import Predictors
    if not isinstance(predictors, Predictors):
        predictors = Predictors.load(predictors)
    return [int(p.fc1.shape[0]) for p in predictors.layers]


def plan_for(model, device: str, *, vram_budget: int | None = None, placement=None, stats=None,
             context_length: int = DEFAULT_CONTEXT, predictors=None,
             reserve_bytes: int = DEFAULT_RESERVE) -> ExecutionPlan:
    """The ExecutionPlan for `device` on a loaded Model (see module doc). predictors: the predictor file
    (or Predictors) that will run, so the plan counts their device bytes; reserve_bytes: scratch kept free."""
    if device not in DEVICES:
        raise InvalidArgumentError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    L = model.config.num_hidden_layers
    if device == "cpu":
        return cpu_plan(L)
    if device == "gpu":
        plan = gpu_plan(L)
        plan.budget_bytes = vram_budget
        return plan
    if vram_budget is None:
        raise InvalidArgumentError(f"device={device!r} needs a VRAM budget (--vram-budget, e.g. 4GiB)")
    if device == "offload":
        t = model.transformer
        out = int(t.lm_head.nbytes + t.final_norm.nbytes) if t.lm_head is not None else 0
        k, output = offload_layers_for_budget(model.config, model.weights, max(0, vram_budget - reserve_bytes),
                                              context_length, out)
        log.info("layer offload: %d of %d layers on the GPU%s", k, L, " and the output head" if output else "")
        return layer_offload_plan(L, k, vram_budget, output)
    # hybrid
    from ..sparse.placement import Placement
    if placement is not None and stats is not None:
        raise InvalidArgumentError("give a placement file or a stats file, not both")
    if placement is None and stats is None:
        raise InvalidArgumentError("device='hybrid' needs a placement file (`pipower plan`) or an "
                                   "activation-stats file (`pipower profile`) to decide the hot neurons")
    if placement is None:
        placement = solve_for(model, stats, vram_budget, context_length, predictor_ranks(predictors),
                              reserve_bytes)
    elif not isinstance(placement, Placement):
        placement = Placement.load(placement, expect_fingerprint=model.fingerprint)
    if len(placement.hot) != L:
        raise InvalidArgumentError(f"placement has {len(placement.hot)} layers, the model {L}")
    plan = hybrid_plan(placement)
    plan.budget_bytes = vram_budget
    return plan


def device_fixed_bytes(model, context_length: int = DEFAULT_CONTEXT, ranks: list[int] | None = None,
                       reserve_bytes: int = DEFAULT_RESERVE) -> dict[str, int]:
    """What the hybrid engine puts on the device before any FFN neuron (PowerInfer's fill order):
    attention, norms, output head, the predictors (in the format they are placed in, plus their float32
    fc2 biases), the float32 KV cache for `context_length` positions, and a scratch reserve. `pipower
    plan` and `device="hybrid"` both solve against it, so a plan file fits the engine that loads it."""
    from ..sparse.modes import predictor_format
    from ..sparse.placement import gpu_bytes_breakdown
    c = model.config
    bias = 4 * c.intermediate_size * c.num_hidden_layers if ranks else 0
    context_length = min(context_length, c.max_position_embeddings)      # caches never grow past it
    return gpu_bytes_breakdown(c, model.weights, predictor_hidden=ranks, predictor_weights=predictor_format(model),
                               context_length=context_length, kv_weights="f32", reserve_bytes=reserve_bytes + bias)


def solve_for(model, stats, vram_budget: int, context_length: int, ranks: list[int] | None = None,
              reserve_bytes: int = DEFAULT_RESERVE, **solver_kwargs):
    """Solve the hot sets from activation stats against device_fixed_bytes."""
    from ..sparse.placement import ffn_neuron_bytes, solve_placement
    from ..sparse.stats import ActivationStats
    if not isinstance(stats, ActivationStats):
        stats = ActivationStats.load(stats)
    c = model.config
    if (stats.n_layers, stats.n_ff) != (c.num_hidden_layers, c.intermediate_size):
        raise InvalidArgumentError(f"stats for {stats.n_layers} layers x {stats.n_ff} neurons, the model has "
                                   f"{c.num_hidden_layers} x {c.intermediate_size}")
    fixed = device_fixed_bytes(model, context_length, ranks, reserve_bytes)
    return solve_placement(list(stats.freqs), ffn_neuron_bytes(c, model.weights), vram_budget,
                           fixed, fingerprint=model.fingerprint, **solver_kwargs)


def to_device(model, device: str, *, vram_budget: int | None = None, placement=None, stats=None,
              context_length: int = DEFAULT_CONTEXT, predictors=None, reserve_bytes: int = DEFAULT_RESERVE,
              device_ops=None):
    """Move a loaded CPU Model to `device` in place (see module doc) and return it.

    device_ops: the device backend (default: CUDA via CuPy, limited to vram_budget); tests pass
    pipower.hybrid.device.StandInDeviceOps to run the scheduler without a GPU. KV caches made
    afterwards hold at most `context_length` positions (what the plan reserved).
    """
    from .build import make_hybrid
    if device != "cpu" and getattr(model, "dot", "float") == "int8":
        raise InvalidArgumentError(f"device {device!r} multiplies in float, and this model was loaded with "
                                   f"dot='int8' (weight panels for the CPU's integer dots): load it with "
                                   f"dot='float' (--dot float) to move it to a device")
    plan = plan_for(model, device, vram_budget=vram_budget, placement=placement, stats=stats,
                    context_length=context_length, predictors=predictors, reserve_bytes=reserve_bytes)
    if device == "cpu":
        return model
    if device_ops is None:
        device_ops = device_ops_for(vram_budget)
    make_hybrid(model.transformer, plan, device_ops)
    model.transformer.ops.max_context = min(context_length, model.config.max_position_embeddings)
    model.plan = plan
    return model
