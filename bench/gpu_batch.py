"""What a forward over T new tokens costs on the GPU, in decode steps, and whether it is batch invariant.

    python bench/gpu_batch.py --device gpu --shape qwen2.5-1.5b --weights q8,f16 \
        --tokens 1,2,4,8,16,32,64 --repeats 5 --out bench/results/gpu_batch.json

The model is bench/hybrid.py's synthetic one (random weights of a real model's shape, made in the compact
format; the real weights cannot reach a device machine), all on the device (CupyOps). After a fixed
--prompt-tokens prompt, each round times one forward over T new tokens for every T, rolling the cache
back, rounds interleaving the T values; medians, and each T as a ratio to the same round's one-token
step (bench/batch.py's method). Then the check the speculative and batched paths rely on: one forward
over the T <= 64 tokens gives bit for bit the logits of one decode step per token.

`--device emulated --shape tiny` runs the same code with the NumPy-contract stand-in device over the CPU
engine (what tests/test_bench_scripts.py does), so the script is known to work before a GPU run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def _script(name: str):
    """A sibling benchmark script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bitwise_single_steps(t, prompt, new) -> bool:
    """One forward over `new` after `prompt` == one decode step per token, bit for bit."""
    a, b = t.new_cache(len(prompt) + len(new) + 1), t.new_cache(len(prompt) + len(new) + 1)
    t.forward(prompt, a)
    t.forward(prompt, b)
    batched = np.asarray(t.forward(new, a, last_only=False))
    steps = np.concatenate([np.asarray(t.forward(new[i:i + 1], b, last_only=False)) for i in range(len(new))])
    return bool(np.array_equal(batched, steps))


def run(args) -> dict:
    from pipower.backend import make_ops
    from pipower.hybrid import gpu_plan, make_hybrid
    hybrid, batch = _script("hybrid"), _script("batch")
    host = make_ops("cython", args.threads)
    tokens = [int(x) for x in args.tokens.split(",")]
    rows, checks = [], {}
    for fmt in args.weights.split(","):
        t = hybrid.synthetic_transformer(args.shape, fmt, host, args.seed)
        dev = hybrid.make_device(args.device, None, host)
        make_hybrid(t, gpu_plan(t.config.num_hidden_layers), dev)
        rng = np.random.default_rng(args.seed)
        V = t.config.vocab_size
        prompt, new = rng.integers(0, V, args.prompt_tokens), rng.integers(0, V, max(tokens))
        times = batch.time_forwards(t, prompt, new, tokens, args.repeats)
        for T in tokens:
            ratios = [a / b for a, b in zip(times[T], times[1])] if 1 in times else []
            med = statistics.median(times[T])
            rows.append(dict(shape=args.shape, weights=fmt, T=T, ms=1e3 * med, tok_per_s=T / med,
                             vs_step=statistics.median(ratios) if ratios else None))
        checked = min(max(tokens), 64)
        checks[fmt] = dict(tokens=checked, bitwise=bitwise_single_steps(t, prompt, new[:checked]),
                           invariant_engine=bool(t.ops.batch_invariant))
    return dict(device=args.device, device_name=getattr(dev, "name", "?"), shape=args.shape,
                prompt_tokens=args.prompt_tokens, repeats=args.repeats, rows=rows, checks=checks)


def markdown(res) -> str:
    out = [f"device: {res['device']} ({res['device_name']}), shape {res['shape']}, prompt {res['prompt_tokens']} "
           f"tokens, medians of {res['repeats']} rounds", "",
           "| weights | T | forward ms | tokens/s | x one decode step |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        ratio = "" if r["vs_step"] is None else f"{r['vs_step']:.2f}"
        out.append(f"| {r['weights']} | {r['T']} | {r['ms']:.2f} | {r['tok_per_s']:.1f} | {ratio} |")
    out.append("")
    for fmt, c in res["checks"].items():
        out.append(f"- {fmt}: a {c['tokens']}-token forward == {c['tokens']} decode steps bit for bit: "
                   f"{c['bitwise']} (engine declares batch_invariant: {c['invariant_engine']})")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    hybrid_shapes = _script("hybrid").SHAPES
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("gpu", "emulated"), default="gpu",
                   help="gpu: CupyOps on the CUDA device; emulated: the stand-in device over the CPU engine")
    p.add_argument("--shape", choices=sorted(hybrid_shapes), default="qwen2.5-1.5b",
                   help="model shape (bench/hybrid.py SHAPES); random weights")
    p.add_argument("--weights", default="q8,f16", help="comma-separated device weight formats (q8, f16)")
    p.add_argument("--tokens", default="1,2,4,8,16,32,64", help="comma-separated T values; include 1")
    p.add_argument("--prompt-tokens", type=int, default=128, help="tokens in the cache before each forward")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians over them)")
    p.add_argument("--threads", type=int, default=2, help="CPU engine threads (host side)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write JSON here (and the table as .md next to it)")
    args = p.parse_args(argv)
    res = run(args)
    table = markdown(res)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(table)
    return 0 if all(c["bitwise"] for c in res["checks"].values()) else 1        # 1: not batch invariant


if __name__ == "__main__":
    sys.exit(main())
