"""The perfect-overlap floor of a T-token forward, in decode steps, measured on this machine.

    python bench/batch_floor.py --models qwen2.5-coder-0.5b --weights q4 --tokens 8 --rounds 9

In one process, with the model's own matrices and kernels:
- a one-token step and a T-token forward after a --prompt-tokens prompt, with bench/ops_profile.py's
  per-op timers: the step, the forward, and the forward's time outside the weight GEMMs (attention,
  norms, RoPE, the Python between ops: everything but linear / linear_many / ffn);
- every matrix the forward multiplies by (layer 0's q, k, v, o, gate, up, down stand for every layer's),
  each one's panel GEMM at T tokens called --calls times in a row on the same matrix, so that it stays
  in the caches: its compute alone, no DRAM stream. A matrix larger than --cache-mib (the output head)
  takes the per-block time of the largest cached matrix with its column count.
Floor = (the layers' and the head's cached GEMM times + the T-token forward's non-GEMM time) / the
step: what the forward would cost if each GEMM hid its weights' memory stream completely under its
compute. The forward over the floor is what imperfect overlap (and the FFN's SiLU product and
activation quantization, which the ffn timer holds) costs.

Why: the T = 8 target of the batched-compute issue (<= 1.3 steps) is not met on the Ice Lake VM, and
whether a kernel or the machine is in the way decides what to do next (docs/dev/PERF_NOTES.md 17-18).
q, k and v are timed as three calls where the model makes one, so the floor errs high by three calls'
fixed cost per layer (~2-5 us each).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))       # bench/: the same ids and timers

import pipower  # noqa: E402
from batch import forward_ids  # noqa: E402
from ab_builds import gemm_timer  # noqa: E402
from ops_profile import profile  # noqa: E402
from pipower.benchmark import cpu_model, read_gbs  # noqa: E402

GEMM_OPS = ("linear", "linear_many", "ffn")
LAYER_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")


def cached_gemm_seconds(panels, T: int, threads: int, calls: int) -> float:
    """Median seconds of one T-token panel GEMM over `panels`, the matrix kept hot by back-to-back calls
    (bench/ab_builds.py's timer on the installed kernels, with this one matrix)."""
    from pipower._cpu import _panel
    shape = "x".join(str(n) for n in panels.shape)
    return gemm_timer(_panel, shape, panels.fmt, T, threads, calls, [panels])()


def gemm_floor(transformer, T: int, threads: int, calls: int, cache_mib: float) -> tuple[float, list]:
    """(seconds of all the forward's weight GEMMs at T tokens from cache, [(name, shape, us per call)])."""
    layer = transformer.layers[0]
    n_layers = len(transformer.layers)
    rows_out, total = [], 0.0
    per_block = {}                                  # columns -> (blocks, seconds per 16 x 32 block)
    for name in LAYER_MATRICES:
        p = getattr(layer, name)
        s = cached_gemm_seconds(p, T, threads, calls)
        blocks = -(-p.shape[0] // 16) * (p.shape[1] // 32)
        if blocks > per_block.get(p.shape[1], (0, 0.0))[0]:      # the largest such matrix: least call overhead
            per_block[p.shape[1]] = (blocks, s / blocks)
        rows_out.append((name, p.shape, s * 1e6))
        total += n_layers * s
    head = transformer.lm_head
    if head.nbytes <= cache_mib * 2**20:
        s = cached_gemm_seconds(head, T, threads, calls)
    else:
        if head.shape[1] not in per_block:
            raise SystemExit(f"no cached matrix with the head's {head.shape[1]} columns to take its rate from")
        s = per_block[head.shape[1]][1] * -(-head.shape[0] // 16) * (head.shape[1] // 32)
    rows_out.append(("head", head.shape, s * 1e6))
    return total + s, rows_out


def measure(transformer, vocab_size: int, T: int, prompt_tokens: int, rounds: int, threads: int, calls: int,
            cache_mib: float) -> dict:
    """Seconds of the step, the T-token forward, its non-GEMM part, the cached GEMMs and the floor, and the
    floor and the forward in steps; "matrices": gemm_floor's per-matrix rows."""
    prompt, new = forward_ids(vocab_size, prompt_tokens, [1, T])
    times = profile(transformer, prompt, new, [1, T], rounds)
    med = {n: {k: statistics.median(v) for k, v in per.items()} for n, per in times.items()}
    step, fwd = med[1]["total"], med[T]["total"]
    non_gemm = fwd - sum(med[T].get(op, 0.0) for op in GEMM_OPS)
    gemms, matrices = gemm_floor(transformer, T, threads, calls, cache_mib)
    return dict(step=step, forward=fwd, non_gemm=non_gemm, gemms=gemms, floor=gemms + non_gemm,
                forward_steps=fwd / step, floor_steps=(gemms + non_gemm) / step, matrices=matrices)


def markdown_row(label: str, weights: str, r: dict) -> str:
    return (f"| {label} | {weights} | {r['step'] * 1e3:.2f} | {r['forward'] * 1e3:.2f} | {r['forward_steps']:.2f} "
            f"| {r['non_gemm'] * 1e3:.2f} | {r['gemms'] * 1e3:.2f} | {r['floor_steps']:.2f} "
            f"| {r['forward'] / r['floor']:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-coder-0.5b", help="comma-separated known model names or GGUF paths")
    ap.add_argument("--weights", default="q4", help="weight format (q4 or q8: panel formats)")
    ap.add_argument("--threads", type=int, default=2, help="kernel threads")
    ap.add_argument("--tokens", type=int, default=8, help="T of the batched forward")
    ap.add_argument("--prompt-tokens", type=int, default=120, help="tokens in the cache before each forward")
    ap.add_argument("--rounds", type=int, default=9, help="timed forward rounds (one more warms up)")
    ap.add_argument("--calls", type=int, default=30, help="cached GEMM calls per matrix (their median counts)")
    ap.add_argument("--cache-mib", type=float, default=8.0,
                    help="matrices larger than this are not timed cached but at a smaller one's block rate")
    a = ap.parse_args(argv)
    gbs = read_gbs(a.threads) or 0.0
    lines = [f"| model | weights | step ms | T = {a.tokens} ms | steps | non-GEMM ms at T | cached GEMMs ms "
             f"| floor, steps | forward / floor |", "|---" * 9 + "|"]
    details = []
    for name in a.models.split(","):
        m = pipower.load(name, weights=a.weights, threads=a.threads, progress=False)
        r = measure(m.transformer, m.config.vocab_size, a.tokens, a.prompt_tokens, a.rounds, a.threads, a.calls,
                    a.cache_mib)
        lines.append(markdown_row(Path(name).name, a.weights, r))
        details.append(f"{Path(name).name}: cached GEMM us per call at T = {a.tokens}: " + ", ".join(
            f"{n} {rows}x{cols} {us:.0f}" for n, (rows, cols), us in r["matrices"]))
    print("\n".join(lines))
    print()
    print("\n".join(details))
    print(f"\nmedians of {a.rounds} forward rounds and {a.calls} cached calls per matrix, {a.threads} threads, "
          f"after a {a.prompt_tokens}-token prompt; CPU: {cpu_model()}, memory read {gbs:.1f} / "
          f"{read_gbs(a.threads) or 0.0:.1f} GB/s (start / end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
