"""How fast can oracle (threshold) mode be against dense decode, counting bytes? The bound for the
fused threshold FFN targets (>= 1.1x dense at ~25% skipped, >= 1.2x at ~40%).

    python bench/threshold_bound.py -m qwen2.5-coder-0.5b -m qwen2.5-coder-1.5b --context 160

A decode step is memory-bound, so its time is at best bytes read / bandwidth. Dense reads every weight
a step touches once (attention projections, gate, up, down, the output head) plus the KV cache up to the
position. Threshold mode must still read every gate row (to select |act(gate . x)| > tau, the same
selection as dense-then-mask) and every non-FFN byte; it saves the skipped share S of the up and down
rows. So with every byte it reads streaming as fast as dense's panels,

    threshold / dense <= total / (total - S * (up + down))

whatever the kernels. Anything real is below it: kept rows are scattered (here they stream at ~80% of
the panels' rate), and selection costs time. The table gives the bytes a step reads by part and this
bound at each skipped share.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import pipower  # noqa: E402

PARTS = ("attention", "gate", "up", "down", "output head", "kv cache")


def nbytes(w) -> int:
    """Bytes a step reads of one weight (Panels, QMatrix or float array); 0 for None."""
    if w is None:
        return 0
    parts = [getattr(w, a, None) for a in ("data", "scales", "offsets")]
    if parts[0] is None:               # a plain array
        return int(w.nbytes)
    return sum(int(a.nbytes) for a in parts if a is not None)


def step_bytes(transformer, context: int) -> dict:
    """Bytes one decode step at position `context` reads, by part (PARTS). The FFN's down counts once:
    dense reads its panels, threshold mode its kept rows of down_t (the same bytes per neuron)."""
    cfg = transformer.config
    out = dict.fromkeys(PARTS, 0)
    for layer in transformer.layers:
        out["attention"] += sum(nbytes(getattr(layer, n)) for n in ("q", "k", "v", "o"))
        out["gate"] += nbytes(layer.gate)
        out["up"] += nbytes(layer.up)
        out["down"] += nbytes(layer.down if getattr(layer, "down", None) is not None else layer.down_t)
    out["output head"] = nbytes(transformer.lm_head)
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    out["kv cache"] = 2 * cfg.num_hidden_layers * kv_dim * context * 4      # float32 keys and values
    return out


def bound(parts: dict, skipped: float) -> float:
    """Upper bound of threshold / dense decode speed with `skipped` of the FFN neurons skipped."""
    total = sum(parts.values())
    return total / (total - skipped * (parts["up"] + parts["down"]))


def report(name: str, parts: dict, sparsities: list[float]) -> dict:
    total = sum(parts.values())
    return dict(model=name, bytes=parts, total_bytes=total,
                ffn_share=(parts["gate"] + parts["up"] + parts["down"]) / total,
                up_down_share=(parts["up"] + parts["down"]) / total,
                bounds={f"{s:g}": bound(parts, s) for s in sparsities})


def render(rows: list[dict], context: int) -> str:
    lines = [f"Bytes one decode step reads (position {context}) and the byte bound of threshold vs dense decode",
             "(python bench/threshold_bound.py; see its docstring)", "",
             "| model | " + " | ".join(f"{p} MB" for p in PARTS) + " | total MB | FFN share | up+down share | "
             + " | ".join(f"bound at {s} skipped" for s in rows[0]["bounds"]) + " |",
             "|---" * (len(PARTS) + 4 + len(rows[0]["bounds"])) + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r['bytes'][p] / 1e6:.1f}" for p in PARTS)
                     + f" | {r['total_bytes'] / 1e6:.1f} | {r['ffn_share']:.1%} | {r['up_down_share']:.1%} | "
                     + " | ".join(f"{b:.3f}x" for b in r["bounds"].values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", action="append", required=True,
                    help="a model name, GGUF file or HF directory (repeat for several)")
    ap.add_argument("--weights", default="q8", help="weight format the model runs in (default q8, as the "
                                                     "threshold targets)")
    ap.add_argument("--context", type=int, default=160, help="position of the decode step, for the KV cache's "
                                                             "bytes (default 160)")
    ap.add_argument("--sparsities", default="0.25,0.4", help="skipped shares of FFN neurons, comma-separated")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if any(not 0 <= s < 1 for s in sparsities):
        ap.error("--sparsities must lie in [0, 1)")
    rows = []
    for name in args.model:
        model = pipower.load(name, weights=args.weights)
        rows.append(report(name, step_bytes(model.transformer, args.context), sparsities))
    print(render(rows, args.context))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
