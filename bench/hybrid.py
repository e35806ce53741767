"""Hybrid GPU-CPU decode vs layer offload vs CPU-only at VRAM budgets, on a synthetic power-law model.

    OUT=results python bench/hybrid.py --device gpu --shape llama2-7b --weights q8 \
        --budgets 0.25,0.5 --tokens 16 --repeats 3 --out bench/results/hybrid.json

(`--device emulated --shape tiny` runs the same code with the device emulated on
the CPU engine, which is what the test suite does, so the script is known to work before a GPU run.)

The model: LLaMA-2-7B's shape (32 layers, D 4096, F 11008, 32 heads, vocab 32000) with ReLU FFNs and
random q8/f16 weights, generated directly in the compact format. Which neurons fire per token comes
from a power-law frequency profile, not from the (random) weights: neuron of rank r in a layer fires
with probability min(1, c / (r + 1) ** alpha), c set so the mean active fraction is `--active`
(ProSparse-7B: ~11%); each token draws its active set, so hot neurons (low rank) fire for most tokens.
A predictor of `--predictor-rank` is evaluated on the device per layer (its cost counts; its output is
not used: the draw stands in for its decision).

Issue #5's row (a), Qwen2.5-Coder-1.5B all on the GPU: its weights cannot reach the device machine (no
network there, 64 MiB carried), so `--shape qwen2.5-1.5b` builds a random model of that shape (28 layers,
D 1536, F 8960, 12/2 heads, vocab 151936; ReLU, no qkv biases: the same bytes per token within 0.1%)
and the "gpu (all on device)" row times it dense on the device. Speed does not depend on the values.

Engines at each budget (budget = fixed device bytes + a fraction of the FFN bytes):
  hybrid   PowerInfer: attention, output, predictors on the GPU, hot neurons (the placement solver's
           choice from the frequency profile) on the GPU, cold ones on the CPU concurrently;
  offload  llama.cpp -ngl: as many whole layers as fit on the GPU, the rest on the CPU, all dense;
  cpu      the CPU engine alone: dense, and sparse (same draws, predictor on the CPU);
  gpu      (unless --no-all-gpu) the whole model on the device, dense, no budget.
Reported: decode tokens/s (median over repeats), hybrid / offload ratio (target >= 3 at 25%), the
split's hot share of computed neurons, host FFN seconds per token (the CPU side of the overlap), what
the overlap saves (the same hybrid run again with the host waiting for the device's hot part first:
"hybrid serial"), and, with a real GPU, the device's copy bandwidth.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipower.config import ModelConfig
from pipower.hybrid import (
    StandInDeviceOps,
    hybrid_plan,
    layer_offload_plan,
    make_hybrid,
)
from pipower.hybrid.plan import ExecutionPlan, offload_layers_for_budget
from pipower.model import LayerWeights, Transformer
from pipower.quant import QMatrix
from pipower.sparse.oracle import CountingSelector
from pipower.sparse.placement import (
    ffn_neuron_bytes,
    gpu_bytes_breakdown,
    solve_placement,
)

SHAPES = {  # D, F, L, H, Hkv, V
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936),
    "small": (1024, 2816, 8, 8, 8, 8000),
    "tiny": (256, 704, 3, 4, 4, 512),
}


def random_matrix(rng, n: int, k: int, fmt: str, scale: float = 0.02):
    """A random [n, k] weight directly in `fmt` (no float32 copy of the whole matrix)."""
    if fmt == "q8":
        data = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
        scales = np.full((n, k // 32), scale / 64, np.float16)
        return QMatrix("q8", (n, k), data, scales)
    if fmt == "f16":
        return QMatrix("f16", (n, k), (rng.standard_normal((n, k), dtype=np.float32) * scale).astype(np.float16))
    raise ValueError(f"synthetic weights in q8 or f16, not {fmt}")


def synthetic_transformer(shape: str, fmt: str, host_ops, seed: int = 0) -> Transformer:
    D, F, L, H, Hkv, V = SHAPES[shape]
    cfg = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=V,
                                     hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                                     num_attention_heads=H, num_key_value_heads=Hkv, hidden_act="relu",
                                     max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0))
    rng = np.random.default_rng(seed)
    hd = D // H
    t = Transformer.__new__(Transformer)          # weights made here, in their format, not from a file
    t.config, t.ops, t.weights = cfg, host_ops, fmt
    t.embed_tokens = (rng.standard_normal((V, D), dtype=np.float32) * 0.5)
    t.layers = [LayerWeights(
        attn_norm=np.ones(D, np.float32), q=random_matrix(rng, H * hd, D, fmt), k=random_matrix(rng, Hkv * hd, D, fmt),
        v=random_matrix(rng, Hkv * hd, D, fmt), o=random_matrix(rng, D, H * hd, fmt), q_bias=None, k_bias=None,
        v_bias=None, o_bias=None, ffn_norm=np.ones(D, np.float32), gate=random_matrix(rng, F, D, fmt),
        up=random_matrix(rng, F, D, fmt), down_t=random_matrix(rng, F, D, fmt)) for _ in range(L)]
    t.final_norm = np.ones(D, np.float32)
    t.lm_head = random_matrix(rng, V, D, fmt)
    from pipower.rope import inv_frequencies
    t.inv_freq = inv_frequencies(cfg)
    t.ffn_neurons = None
    return t


def power_law_profile(n_layers: int, n_ff: int, active: float, alpha: float, seed: int = 1) -> list[np.ndarray]:
    """Per layer: activation probability of each neuron (a random permutation of a power-law curve)."""
    rank = np.arange(1, n_ff + 1, dtype=np.float64)
    lo, hi = 1e-9, 1e9
    for _ in range(200):                           # c such that mean(min(1, c / rank^alpha)) = active
        c = np.sqrt(lo * hi)
        lo, hi = (c, hi) if np.minimum(1, c / rank ** alpha).mean() < active else (lo, c)
    curve = np.minimum(1, c / rank ** alpha)
    rng = np.random.default_rng(seed)
    return [curve[rng.permutation(n_ff)] for _ in range(n_layers)]


class PowerLawSelector(CountingSelector):
    """Draws each token's active neurons from the profile; evaluates a predictor of the given rank on the
    model's ops (device when hybrid) so its cost is paid, without using its output."""

    def __init__(self, probs, ops, rank: int, D: int, seed: int = 2):
        super().__init__()
        self.probs, self.rng, self.ops = probs, np.random.default_rng(seed), ops
        F = len(probs[0])
        r = np.random.default_rng(seed + 1)
        self.pred = [(ops.place(random_matrix(r, rank, D, "q8")), ops.place(random_matrix(r, F, rank, "q8")))
                     for _ in probs] if rank else None

    def restart(self, seed: int) -> None:
        """The same draws again (a second timing of one placement), predictor weights kept."""
        self.rng = np.random.default_rng(seed)
        self.reset_counts()

    def __call__(self, layer, x, h):
        if self.pred is not None:
            fc1, fc2 = self.pred[layer]
            self.ops.linear(np.maximum(self.ops.linear(x, fc1), 0), fc2)        # cost only
        return self.select(self.rng.random((x.shape[0], len(self.probs[layer]))) < self.probs[layer])


def decode_seconds(t, tokens: int, repeats: int) -> list[float]:
    """Median seconds per decode step after a 16-token prefill, one value per repeat (after a warm-up)."""
    out = []
    for r in range(repeats + 1):
        cache = t.new_cache(max_len=16 + tokens + 1)
        logits = t.forward(np.arange(1, 17), cache, last_only=True)
        steps = []
        for _ in range(tokens):
            tok = int(np.argmax(logits[-1]))
            t0 = time.perf_counter()
            logits = t.forward(np.array([tok]), cache, last_only=True)
            steps.append(time.perf_counter() - t0)
        del cache, logits                       # free the KV cache before the next one is allocated
        if r:
            out.append(statistics.median(steps))
    return out


def fresh(template: Transformer) -> Transformer:
    """A copy whose layers can be re-placed (make_hybrid replaces layer fields in place)."""
    t = copy.copy(template)
    t.layers = [dataclasses.replace(layer) for layer in template.layers]
    return t


def make_device(kind: str, limit: int | None, host_ops):
    if kind == "gpu":
        from pipower.hybrid.engine import device_ops_for
        return device_ops_for(limit)
    return StandInDeviceOps(limit_bytes=limit, inner=host_ops)


def device_copy_gb_s(dev) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes / s), CuPy only."""
    cp = getattr(dev, "_cp", None)
    if cp is None:
        return None
    a = cp.empty(1 << 28, dtype=cp.uint8)
    b = cp.empty_like(a)
    dev.synchronize()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        b[...] = a
        dev.synchronize()
        ts.append(time.perf_counter() - t0)
    return 2 * a.nbytes / statistics.median(ts) / 1e9


def run(args) -> dict:
    from pipower.backend import make_ops
    host = make_ops("cython" if args.backend == "cython" else args.backend, args.threads)
    template = synthetic_transformer(args.shape, args.weights, host, args.seed)
    c = template.config
    L, F, D = c.num_hidden_layers, c.intermediate_size, c.hidden_size
    probs = power_law_profile(L, F, args.active, args.alpha, args.seed + 1)
    nb = ffn_neuron_bytes(c, args.weights)
    ffn_total = nb * F * L
    ctx = 16 + args.tokens + 1
    fixed = gpu_bytes_breakdown(c, args.weights, predictor_hidden=args.predictor_rank or None,
                                predictor_weights="q8", context_length=ctx, kv_weights="f32",
                                reserve_bytes=args.reserve_mib << 20)
    fixed_total = sum(fixed.values())
    rows = []

    def measure(engine, t, budget_frac, extra, sparse=True):
        if isinstance(t.ffn_neurons, PowerLawSelector):          # timing one placement again
            t.ffn_neurons.restart(args.seed + 2)
        else:
            t.ffn_neurons = PowerLawSelector(probs, t.ops, args.predictor_rank, D, args.seed + 2) if sparse else None
        stats = getattr(t.ops, "stats", None)
        if stats is not None:
            stats.reset()
        secs = decode_seconds(t, args.tokens, args.repeats)
        row = {"engine": engine, "budget_fraction": budget_frac, "decode_tok_s": 1 / statistics.median(secs),
               "samples_s": secs, "ffn_sparsity": t.ffn_neurons.sparsity if sparse else 0.0, **extra}
        if stats is not None and stats.split_calls:
            steps = (args.repeats + 1) * (args.tokens + 1)
            row["hot_share"] = stats.hot_neurons / max(1, stats.hot_neurons + stats.cold_neurons)
            row["host_ffn_s_per_forward"] = stats.host_ffn_seconds / steps
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "samples_s"}), flush=True)

    measure("cpu dense", fresh(template), None, {}, sparse=False)
    measure("cpu sparse", fresh(template), None, {})
    if args.all_gpu:
        dev = make_device(args.device, None, host)
        t = make_hybrid(fresh(template), ExecutionPlan("gpu", ["device"] * L, "device"), dev, host)
        measure("gpu (all on device)", t, None, {"device_bytes": dev.allocated_bytes()}, sparse=False)
        del t, dev
    for frac in args.budgets:
        budget = int(fixed_total + frac * ffn_total)
        plan = solve_placement(probs, nb, budget, fixed, granularity=args.granularity)
        dev = make_device(args.device, budget, host)
        t = make_hybrid(fresh(template), dataclasses.replace(hybrid_plan(plan), budget_bytes=budget), dev, host)
        measure("hybrid", t, frac, {"budget_bytes": budget, "hot_neurons": plan.n_hot,
                                    "plan_hot_freq_share": plan.hot_freq_share,
                                    "device_bytes": dev.allocated_bytes()})
        hybrid_row = rows[-1]
        if args.device == "gpu":
            hybrid_row["device_copy_gb_s"] = device_copy_gb_s(dev)
        t.ops.overlap = False                 # same placement, the host waits for the device: no overlap
        measure("hybrid serial", t, frac, {"budget_bytes": budget})
        hybrid_row["overlap_saved_ms_per_token"] = 1e3 * (1 / rows[-1]["decode_tok_s"] - 1 / hybrid_row["decode_tok_s"])
        del t, dev
        layer_kv = 2 * ctx * c.num_key_value_heads * c.head_dim * 4
        out_bytes = int(template.lm_head.nbytes + template.final_norm.nbytes)
        k, output = offload_layers_for_budget(c, args.weights, budget, ctx, out_bytes)
        dev = make_device(args.device, budget, host)
        t = make_hybrid(fresh(template), layer_offload_plan(L, k, budget, output), dev, host)
        measure("offload", t, frac, {"budget_bytes": budget, "gpu_layers": k, "output_on_gpu": output,
                                     "device_bytes": dev.allocated_bytes(), "kv_bytes_per_layer": layer_kv},
                sparse=False)                                 # llama.cpp -ngl: dense, no predictors
        del t, dev
    for frac in args.budgets:
        h = next(r for r in rows if r["engine"] == "hybrid" and r["budget_fraction"] == frac)
        o = next(r for r in rows if r["engine"] == "offload" and r["budget_fraction"] == frac)
        h["vs_offload"] = h["decode_tok_s"] / o["decode_tok_s"]
    return {"shape": args.shape, "weights": args.weights, "device": args.device, "threads": args.threads,
            "active": args.active, "alpha": args.alpha, "predictor_rank": args.predictor_rank,
            "fixed_device_bytes": fixed, "ffn_bytes": ffn_total, "rows": rows, "argv": sys.argv}


def markdown(res) -> str:
    out = [f"shape {res['shape']}, {res['weights']} weights, device {res['device']}, {res['threads']} CPU threads, "
           f"mean active {res['active']:.0%} (power law alpha {res['alpha']})", "",
           "| engine | budget (FFN share) | decode tok/s | vs offload | hot share of computed | GPU layers |",
           "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        frac = "-" if r["budget_fraction"] is None else f"{r['budget_fraction']:.0%}"
        out.append(f"| {r['engine']} | {frac} | {r['decode_tok_s']:.2f} | {r.get('vs_offload', float('nan')):.2f} | "
                   f"{r.get('hot_share', float('nan')):.2f} | {r.get('gpu_layers', '-')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("gpu", "emulated"), default="gpu",
                    help="gpu: CuPy on CUDA; emulated: the device side runs on the CPU engine (a dry run)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b", help="model shape (default llama2-7b)")
    ap.add_argument("--weights", choices=("q8", "f16"), default="q8", help="weight format (default q8)")
    ap.add_argument("--budgets", default="0.25,0.5",
                    help="FFN shares the budget holds beyond the fixed bytes ('' = no budget rows)")
    ap.add_argument("--no-all-gpu", dest="all_gpu", action="store_false",
                    help="skip the row with the whole model on the device (dense)")
    ap.add_argument("--active", type=float, default=0.11, help="mean active fraction per token (default 0.11)")
    ap.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of the frequency curve")
    ap.add_argument("--predictor-rank", type=int, default=1024, help="predictor hidden size (0 = none)")
    ap.add_argument("--granularity", type=int, default=256, help="placement solver batch (neurons)")
    ap.add_argument("--reserve-mib", type=int, default=0, help="device MiB reserved beyond the accounted tensors")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("--backend", choices=("cython", "numpy"), default="cython", help="CPU ops backend")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write JSON here and the table as .md beside it")
    a = ap.parse_args(argv)
    a.budgets = [float(b) for b in a.budgets.split(",") if b.strip()]
    if a.threads is None:
        from pipower.backend import default_threads
        a.threads = default_threads()
    res = run(a)
    table = markdown(res)
    print(table)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2, default=float) + "\n")
        Path(a.out).with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
