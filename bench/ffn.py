"""FFN-only timing: the fused sparse FFN at fixed active fractions vs the dense FFN, and the predictor's cost.

    python bench/ffn.py --models qwen2.5-coder-0.5b,smollm2-135m --threads 1,2 --repeats 7 \
        --out bench/results/ffn.json

Models are real ones (their q8 weights) or `synthetic:DxFxL` random layers, since the sparse kernel's
efficiency depends on the row length: a q8 row of a 0.5B model is 576-896 bytes, a 7B model's 4 KiB.

Decode-shaped work (one token, T = 1) through the model's own ops (`ops.ffn`), layer after layer as a
decode step runs them, so each layer's weights come from memory rather than cache. Per (model, threads,
format) and round: the dense FFN of every layer, then each active fraction (sorted random index sets,
fresh per layer and round), then the predictors when a file is given (`--predictors model=FILE`), all
interleaved round by round so drift hits every row alike. Reported: the median over rounds of the
per-token time summed over layers, the ratio to dense measured in the same rounds, and the dense
FFN's achieved GB/s (FFN weight bytes / time). The issue's target: at 25% active, <= 35% of dense.

Layouts (`--layouts`, timed in the same rounds, each against its own dense FFN): `bundled`, what the
CPU engine uses (pipower.arena's neuron bundles: gate|up|down rows and scales of a neuron in one span),
and `separate`, the three matrices each contiguous in one huge-page arena (the engine before bundles).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pipower


def ffn_token_seconds(tr, layers, idx_per_layer, x) -> float:
    """Wall time of one token's FFN over all layers (idx None = dense)."""
    ops, act = tr.ops, tr.config.hidden_act
    t0 = time.perf_counter()
    for layer, idx in zip(layers, idx_per_layer):
        ops.ffn(x, layer.gate, layer.up, layer.down_t, act, idx)
    return time.perf_counter() - t0


def layouts_of(layers, names) -> dict:
    """{layout name: per-layer FFN matrices (objects with gate/up/down_t)} in fresh huge-page arenas."""
    from types import SimpleNamespace

    from pipower.arena import Arena, bundle_layers
    out = {}
    for name in names:
        if name == "bundled":
            out[name] = [SimpleNamespace(gate=g, up=u, down_t=d) for g, u, d in bundle_layers(layers)]
        elif name == "separate":
            arena = Arena.for_weights(w for lw in layers for w in (lw.gate, lw.up, lw.down_t))
            out[name] = [SimpleNamespace(gate=arena.copy_weight(lw.gate), up=arena.copy_weight(lw.up),
                                         down_t=arena.copy_weight(lw.down_t)) for lw in layers]
        else:
            raise SystemExit(f"unknown layout {name!r}; choose bundled, separate")
    return out


def predictor_token_seconds(selector, n_layers, x) -> float:
    """One token's predictor decisions over all layers, as decode makes them (the index lists)."""
    t0 = time.perf_counter()
    for i in range(n_layers):
        selector(i, x, None)
    return time.perf_counter() - t0


class _Synthetic:
    """Random FFN layers of a given shape (e.g. LLaMA-2-7B's D 4096, F 11008), for the shape dependence."""

    def __init__(self, spec: str, fmt: str, threads: int, seed: int = 0):
        from types import SimpleNamespace

        from pipower.backend import make_ops
        from pipower.quant import quantize
        D, F, L = (int(v) for v in spec.split("x"))
        rng = np.random.default_rng(seed)

        def w():
            return quantize((rng.standard_normal((F, D)) * 0.02).astype(np.float32), fmt)
        self.transformer = SimpleNamespace(
            ops=make_ops("cython", threads), layers=[SimpleNamespace(gate=w(), up=w(), down_t=w()) for _ in range(L)],
            config=SimpleNamespace(hidden_act="silu", num_hidden_layers=L, intermediate_size=F, hidden_size=D))
        self.config = self.transformer.config


def bench(model_name, fmt, threads, fractions, repeats, tokens, predictors, layouts=("bundled",),
          seed=0) -> list[dict]:
    if model_name.startswith("synthetic:"):
        m = _Synthetic(model_name.split(":", 1)[1], fmt, threads, seed)
    else:
        m = pipower.load(model_name, weights=fmt, threads=threads, progress=False)
    tr = m.transformer
    c = m.config
    L, F, D = c.num_hidden_layers, c.intermediate_size, c.hidden_size
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, D)) * 0.5).astype(np.float32)
    sel = None
    if predictors:
        from pipower.sparse.modes import predictor_format
        from pipower.sparse.predictor import Predictors, PredictorSelector
        sel = PredictorSelector(Predictors.load(predictors), 0.0, ops=tr.ops, weights=predictor_format(m))
    lay = layouts_of(tr.layers, layouts)
    keys = ["dense", *(f"{f:g}" for f in fractions)]
    samples = {(ln, k): [] for ln in lay for k in keys}
    if sel:
        samples[(layouts[0], "predictor")] = []
    with tr.ops.forward_scope(1):
        for rnd in range(repeats + 1):                         # round 0 warms up, not recorded
            per = {k: [] for k in samples}
            for _ in range(tokens):
                for ln, layers in lay.items():
                    per[(ln, "dense")].append(ffn_token_seconds(tr, layers, [None] * L, x))
                    for f in fractions:
                        k = max(1, int(round(f * F)))
                        idx = [np.sort(rng.choice(F, k, replace=False)).astype(np.int32) for _ in range(L)]
                        per[(ln, f"{f:g}")].append(ffn_token_seconds(tr, layers, idx, x))
                if sel:
                    per[(layouts[0], "predictor")].append(predictor_token_seconds(sel, L, x))
            if rnd:
                for k, v in per.items():
                    samples[k].append(statistics.median(v))
    ffn_bytes = sum(int(getattr(w, "nbytes", 0)) for layer in next(iter(lay.values()))
                    for w in (layer.gate, layer.up, layer.down_t) if w is not None)
    results = []
    for ln in lay:
        dense_v = samples[(ln, "dense")]
        rows = []
        for (l2, k), v in samples.items():
            if l2 != ln:
                continue
            ratio = statistics.median([a / b for a, b in zip(v, dense_v)])      # same-round ratios
            rows.append({"row": k, "ms_per_token": 1e3 * statistics.median(v), "ratio_to_dense": ratio,
                         "samples_ms": [1e3 * s for s in v]})
        results.append({"model": model_name, "weights": fmt, "threads": threads, "layout": ln, "layers": L,
                        "n_ff": F, "hidden": D, "ffn_bytes_per_token": ffn_bytes,
                        "dense_gb_s": ffn_bytes / statistics.median(dense_v) / 1e9, "rows": rows,
                        "predictors": predictors, "repeats": repeats, "tokens_per_round": tokens})
    return results


def markdown(results) -> str:
    out = ["| model | weights | threads | layout | row | ms/token (all layers) | vs dense | dense FFN GB/s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            name = row["row"] if row["row"] in ("dense", "predictor") else f"sparse {float(row['row']):.0%} active"
            out.append(f"| {r['model']} | {r['weights']} | {r['threads']} | {r.get('layout', 'separate')} | "
                       f"{name} | {row['ms_per_token']:.3f} | "
                       f"{row['ratio_to_dense']:.2f} | {r['dense_gb_s']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-coder-0.5b,smollm2-135m,synthetic:4096x11008x2",
                    help="comma-separated names or paths; synthetic:DxFxL = L random FFN layers of that shape "
                         "(default includes LLaMA-2-7B's 4096x11008, 2 layers)")
    ap.add_argument("--formats", default="q8", help="weight formats, comma-separated (default: q8)")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default: 1,2)")
    ap.add_argument("--fractions", default="0.1,0.25,0.5,1.0", help="active fractions (default: 0.1,0.25,0.5,1.0)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds after one warm-up (default: 7)")
    ap.add_argument("--tokens", type=int, default=8, help="tokens per round; a round's value is their median")
    ap.add_argument("--predictors", action="append", default=[], metavar="MODEL=FILE",
                    help="also time this model's predictors (repeatable)")
    ap.add_argument("--layouts", default="bundled",
                    help="FFN layouts timed side by side: bundled (the engine's), separate (default: bundled)")
    ap.add_argument("--out", default=None, help="write JSON here (and the table as .md beside it)")
    a = ap.parse_args(argv)
    preds = dict(p.split("=", 1) for p in a.predictors)
    results = []
    for model in a.models.split(","):
        for fmt in a.formats.split(","):
            for th in (int(t) for t in a.threads.split(",")):
                rs = bench(model, fmt, th, [float(f) for f in a.fractions.split(",")], a.repeats, a.tokens,
                           preds.get(model), tuple(a.layouts.split(",")))
                results.extend(rs)
                print("\n".join(markdown(rs).splitlines()[2:]), flush=True)      # rows as they come
    table = markdown(results)
    print(table)
    if a.out:
        Path(a.out).write_text(json.dumps({"results": results, "argv": sys.argv}, indent=2) + "\n")
        Path(a.out).with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
