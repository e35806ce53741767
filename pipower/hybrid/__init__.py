"""The GPU-CPU hybrid engine (PowerInfer's execution model) over pipower's one graph.

plan.py    where each layer runs (gpu / hybrid split / layer offload / cpu) under a budget
ops.py     HybridOps: the ops interface dispatching each call to the device or the host ops
build.py   places a loaded Transformer's weights per a plan and swaps in HybridOps
engine.py  `device=` of pipower.load: the plan from a budget + placement/stats, the CUDA device ops
device.py  the device-ops contract and a NumPy stand-in (CI runs the scheduler without a GPU)
"""
from .build import make_hybrid
from .device import DeviceMemoryError, DeviceOps, StandInDeviceOps
from .engine import DEVICES, plan_for, to_device
from .ops import FFNSplit, HybridOps, HybridStats, SplitMatrix
from .plan import ExecutionPlan, cpu_plan, gpu_plan, hybrid_plan, layer_offload_plan

__all__ = ["DEVICES", "DeviceMemoryError", "DeviceOps", "ExecutionPlan", "FFNSplit", "HybridOps", "HybridStats",
           "SplitMatrix", "StandInDeviceOps", "cpu_plan", "gpu_plan", "hybrid_plan", "layer_offload_plan",
           "make_hybrid", "plan_for", "to_device"]
