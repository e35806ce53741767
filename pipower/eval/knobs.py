"""Set one sparsity knob on a loaded model and describe it as settings (docs/SPARSITY.md: three knobs).

A `Point` is one knob at one value; `configure` applies it and returns the "sparsity" settings an
evaluation is filed under. The description carries what the result depends on and a path cannot
guarantee: the SHA-256 of predictor and stats files, the solved plan of a placement.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgumentError

# knob name -> (directory prefix, what its value means)
KNOBS = {
    "dense": ("dense", "every neuron computed"),
    "act_threshold": ("act", "oracle tau_act: skip neurons with |act(gate.x)| <= tau_act"),
    "target_sparsity": ("target", "oracle, per-layer tau_act calibrated to skip this fraction"),
    "pred_threshold": ("pred", "predictor tau_pred: compute neurons with logit >= tau_pred"),
    "budget": ("budget", "hot/cold placement at this VRAM budget (bytes); placement only"),
}
ENGINE_NOTE = ("budget points run the hybrid scheduler (pipower.hybrid): attention, output and the hot neurons "
               "of the placement on the device, cold neurons on the CPU, partial sums added. Without a GPU "
               "the device is emulated by the CPU engine (same scheduler, same transfers, same split "
               "arithmetic). Placement changes only where neurons are computed, not which")
PLAN_CONTEXT = 2048     # KV positions (f32) reserved in the budget: HumanEval prompt + 384 new tokens fit


@dataclass(frozen=True)
class Point:
    knob: str
    value: float | None = None          # None for dense; bytes for budget

    def __post_init__(self):
        if self.knob not in KNOBS:
            raise InvalidArgumentError(f"unknown knob {self.knob!r}; choose one of {', '.join(KNOBS)}")
        if (self.value is None) != (self.knob == "dense"):
            raise InvalidArgumentError(f"knob {self.knob!r} {'takes no' if self.knob == 'dense' else 'needs a'} value")

    @property
    def name(self) -> str:
        """Directory name of the point: dense, act-0.1, target-0.5, pred--1, budget-1073741824."""
        prefix = KNOBS[self.knob][0]
        if self.knob == "dense":
            return prefix
        return f"{prefix}-{int(self.value)}" if self.knob == "budget" else f"{prefix}-{self.value:g}"


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def configure(model, point: Point, *, predictors=None, stats=None) -> dict:
    """Apply `point` to `model` (via Model.set_sparsity) -> the "sparsity" settings describing it.

    predictors: predictor file, needed for pred_threshold. stats: activation-stats file from
    `pipower profile`, needed for budget (the plan is solved from its frequencies for this model and
    weight format and the model is moved onto it in place: see ENGINE_NOTE).
    """
    k, v = point.knob, point.value
    if k == "dense" or k == "budget":
        model.set_sparsity()
    if k == "dense":
        return {"knob": "dense"}
    if k == "act_threshold":
        model.set_sparsity(act_threshold=float(v))
        return {"knob": k, "act_threshold": float(v)}
    if k == "target_sparsity":
        from ..sparse.modes import CALIBRATION_TOKENS
        model.set_sparsity(target_sparsity=float(v))
        return {"knob": k, "target_sparsity": float(v), "calibration_tokens": CALIBRATION_TOKENS,
                "calibration_corpus": "stdlib"}
    if k == "pred_threshold":
        if predictors is None:
            raise InvalidArgumentError("pred_threshold points need a predictor file (--predictors)")
        model.set_sparsity(predictors=str(predictors), pred_threshold=float(v))
        return {"knob": k, "pred_threshold": float(v), "predictors": Path(predictors).name,
                "predictors_sha256": file_sha256(predictors),
                "predictor_weights": getattr(model.transformer.ffn_neurons, "weights", "f32")}
    if stats is None:
        raise InvalidArgumentError("budget points need an activation-stats file to plan from (--stats)")
    plan = solve_plan(model, stats, int(v))
    engine = run_on_placement(model, plan, int(v))
    return {"knob": k, "budget_bytes": int(v), "stats": Path(stats).name, "stats_sha256": file_sha256(stats),
            "engine": engine, "plan": plan_info(plan)}


def run_on_placement(model, placement, budget_bytes: int) -> str:
    """Make `model` (a CPU model, modified in place) run hybrid on `placement` under the budget; ->
    "hybrid-cuda", or "hybrid-emulated" when there is no GPU (the device side runs on the CPU engine
    behind the device contract, with the budget still a hard memory limit)."""
    from .. import _gpu
    from ..hybrid import StandInDeviceOps, to_device
    if getattr(model, "plan", None) is not None:
        raise InvalidArgumentError("the model already runs on a placement: load a fresh one per budget")
    gpu = _gpu.available()
    device = None if gpu else StandInDeviceOps(limit_bytes=budget_bytes, inner=model.transformer.ops)
    to_device(model, "hybrid", vram_budget=budget_bytes, placement=placement, context_length=PLAN_CONTEXT,
              device_ops=device)
    return "hybrid-cuda" if gpu else "hybrid-emulated"


def solve_plan(model, stats_path, budget_bytes: int):
    """The placement the hybrid engine (and `pipower plan`) would use for this model, weight format and
    budget, with PLAN_CONTEXT positions of KV cache and the engine's scratch reserve counted."""
    from ..hybrid.engine import solve_for
    return solve_for(model, stats_path, budget_bytes, PLAN_CONTEXT)


def plan_info(plan) -> dict:
    n = sum(plan.n_ff)
    return {"hot_freq_share": round(plan.hot_freq_share, 6), "hot_neurons": plan.n_hot, "neurons": n,
            "hot_fraction": round(plan.n_hot / n, 6), "ffn_bytes": plan.ffn_bytes,
            "fixed_bytes": plan.fixed_bytes, "bytes_used": plan.bytes_used, "solver": plan.solver,
            "status": plan.status}
