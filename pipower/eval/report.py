"""report.md, report.csv and pass_vs_sparsity.png from one or more sweep directories (one per model).

A directory is either a sweep (sub-directories with summary.json, optional sweep.json) or a single
`pipower eval` output (summary.json in it). Rows are read from the summaries only, so a report can be
regenerated at any time, also while a sweep is still filling in points.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ..errors import InvalidArgumentError
from ..fetcher import KNOWN_MODELS
from ..sparse.plots import pyplot
from .knobs import ENGINE_NOTE, KNOBS
from .run import SUMMARY

COLUMNS = ["model", "knob", "value", "measured_sparsity", "pass@1", "ci_lo", "ci_hi", "passed", "n",
           "samples", "gained_vs_dense", "lost_vs_dense", "mcnemar_p", "decode_tok_s", "prefill_tok_s",
           "s_per_sample", "mode", "max_tokens", "weights", "backend", "threads", "hot_freq_share",
           "plan_bytes", "identical_to_dense", "point"]
_KNOB_ORDER = {k: i for i, k in enumerate(KNOBS)}


def _label(sweep_meta: dict, summary: dict) -> str:
    """Short model name: the known name when the file is a known model's, else the file name sans .gguf."""
    spec = sweep_meta.get("model_spec")
    if spec in KNOWN_MODELS:
        return spec
    source = spec or summary.get("model", {}).get("source") or "?"
    name = Path(source).name
    known = [k for k, m in KNOWN_MODELS.items() if m.filename == name]
    return known[0] if known else name.removesuffix(".gguf")


def _row(summary: dict, label: str, point_dir: Path) -> dict:
    sp = summary["settings"].get("sparsity", {"knob": "dense"})
    knob = sp.get("knob", "dense")
    value = {"dense": None, "act_threshold": sp.get("act_threshold"), "target_sparsity": sp.get("target_sparsity"),
             "pred_threshold": sp.get("pred_threshold"), "budget": sp.get("budget_bytes")}.get(knob)
    plan = sp.get("plan", {})
    vs = summary.get("vs_dense")
    m = summary.get("model", {})
    return {"model": label, "knob": knob, "value": value, "measured_sparsity": summary["ffn_sparsity"],
            "pass@1": summary["pass@1"], "ci_lo": summary["ci95"][0], "ci_hi": summary["ci95"][1],
            "passed": summary["passed"], "n": summary["n_problems"], "samples": summary["samples"],
            "decode_tok_s": summary["decode_tok_s"], "prefill_tok_s": summary["prefill_tok_s"],
            "s_per_sample": summary.get("seconds_per_sample", 0.0),
            "mode": summary["settings"]["mode"], "max_tokens": summary["settings"]["max_tokens"],
            "weights": m.get("weights"), "backend": m.get("backend"), "threads": m.get("threads"),
            "hot_freq_share": plan.get("hot_freq_share"), "plan_bytes": plan.get("bytes_used"),
            "identical_to_dense": f"{vs['identical']}/{vs['compared']}" if vs else None,
            "point": str(point_dir), "_tasks": tuple(summary.get("task_ids", ())),
            "_ci_method": summary.get("ci_method")}


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value for paired pass/fail outcomes: under "the knob changes nothing",
    each discordant problem is a fair coin between gained and lost."""
    n = gained + lost
    if n == 0:
        return 1.0
    k = min(gained, lost)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(base_dir: Path, point_dir: Path) -> dict:
    """Problems point_dir's run solves that base_dir's does not (gained), the reverse (lost), the exact
    McNemar p-value, and how many (task, sample) pairs both have and how many completions are identical."""
    from .run import SAMPLES, read_samples
    base, mine = read_samples(Path(base_dir) / SAMPLES), read_samples(Path(point_dir) / SAMPLES)
    keys = [k for k in mine if k in base]
    gained = sum(bool(mine[k]["passed"]) and not base[k]["passed"] for k in keys)
    lost = sum(bool(base[k]["passed"]) and not mine[k]["passed"] for k in keys)
    same = sum(mine[k].get("completion") == base[k].get("completion") for k in keys)
    return {"gained": gained, "lost": lost, "p": mcnemar_p(gained, lost), "pairs": len(keys),
            "identical_completions": same}


def paired_vs_dense(point_dir: Path) -> dict | None:
    """paired() against the sweep's dense point; None without a sibling dense point."""
    from .run import SAMPLES
    dense_dir = point_dir.parent / "dense"
    if point_dir.name == "dense" or not (dense_dir / SAMPLES).is_file() or not (point_dir / SAMPLES).is_file():
        return None
    return paired(dense_dir, point_dir)


def collect(dirs) -> tuple[list[dict], list[dict]]:
    """-> (rows sorted by model, knob, value; the sweep.json of each directory ({} for none))."""
    rows, metas = [], []
    for d in map(Path, dirs):
        meta = json.loads((d / "sweep.json").read_text()) if (d / "sweep.json").is_file() else {}
        meta["_dir"] = str(d)
        point_dirs = [d] if (d / SUMMARY).is_file() else sorted(p.parent for p in d.glob(f"*/{SUMMARY}"))
        if not point_dirs:
            raise InvalidArgumentError(f"{d}: no {SUMMARY} in it or in its sub-directories")
        for pd in point_dirs:
            s = json.loads((pd / SUMMARY).read_text())
            row = _row(s, _label(meta, s), pd)
            paired = paired_vs_dense(pd)
            row.update(gained_vs_dense=paired and paired["gained"], lost_vs_dense=paired and paired["lost"],
                       mcnemar_p=paired and paired["p"])
            rows.append(row)
        if pd == d and "source" not in meta:   # a single `pipower eval` directory: describe it from its summary
            st = s["settings"]
            meta.update({**s["model"], **{k: st[k] for k in ("mode", "max_tokens", "temperature", "seed")},
                         "samples": s["samples"], "sparsity": json.dumps(st.get("sparsity")),
                         "problems": s["task_ids"]})
        metas.append(meta)
    if len({r["mode"] for r in rows}) > 1:       # same model in two modes: keep its lines apart
        for r in rows:
            r["model"] = f"{r['model']} ({r['mode']})"
    rows.sort(key=lambda r: (r["model"], _KNOB_ORDER.get(r["knob"], 99), r["value"] or 0))
    return rows, metas


def _fmt(v, spec=".3f") -> str:
    return "" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def _value_text(r: dict) -> str:
    if r["knob"] == "budget":
        return f"{r['value'] / 2**20:.0f} MiB"
    return "-" if r["value"] is None else f"{r['value']:g}"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})


def write_markdown(rows: list[dict], metas: list[dict], path: Path, plot_name: str | None) -> None:
    methods = sorted({r["_ci_method"] for r in rows if r["_ci_method"]})
    lines = ["# HumanEval Pass@1 vs FFN activation sparsity", "",
             "Measured sparsity = fraction of FFN neurons skipped, token-weighted over prompt and generated "
             "tokens. CI = 95% " + (" / ".join(methods) or "wilson") + " interval "
             "(wilson: one greedy sample per problem; normal: per-problem pass rates). "
             "tok/s = total tokens / total seconds over the point's generations.", ""]
    lines += [("| model | knob | value | measured sparsity | Pass@1 (95% CI) | passed/n | vs dense: +gained "
               "-lost (McNemar p) | decode tok/s | prefill tok/s | s/sample | mode | plan hot share | same as dense |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paired = ("" if r["gained_vs_dense"] is None
                  else f"+{r['gained_vs_dense']} -{r['lost_vs_dense']} (p={r['mcnemar_p']:.2g})")
        lines.append(f"| {r['model']} | {r['knob']} | {_value_text(r)} | {r['measured_sparsity']:.1%} | "
                     f"{r['pass@1']:.3f} ({r['ci_lo']:.3f}-{r['ci_hi']:.3f}) | {r['passed']}/{r['n']} | {paired} | "
                     f"{r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.1f} | {r['s_per_sample']:.1f} | {r['mode']} | "
                     f"{_fmt(r['hot_freq_share'])} | {_fmt(r['identical_to_dense'])} |")
    for model in sorted({r["model"] for r in rows}):
        if len({r["_tasks"] for r in rows if r["model"] == model}) > 1:
            lines += ["", (f"**Warning:** the points of {model} were not all evaluated on the same problems; "
                           "compare their Pass@1 with care.")]
    if any(r["knob"] == "budget" for r in rows):
        lines += ["", (f"Budget points: {ENGINE_NOTE}. The plan's hot share (expected share of activations "
                       "on the GPU) and bytes are recorded in report.csv.")]
    lines += ["", "'same as dense' = samples whose generated text is identical to the dense point's. "
              "'vs dense' pairs each problem with the dense point's result: gained = solved only here, lost = "
              "solved only by dense; the exact McNemar p-value asks whether the difference is more than chance "
              "(a paired test: sharper than comparing the two confidence intervals)."]
    if plot_name:
        lines += ["", f"![Pass@1 vs measured sparsity]({plot_name})"]
    lines += ["", "## Runs"]
    for m in metas:
        lines += ["", f"### {m['_dir']}", ""]
        if m.get("equivalent_command"):
            lines += ["```", m["equivalent_command"], "```", ""]
        keys = ("model_spec", "source", "fingerprint", "weights", "backend", "threads", "mode", "max_tokens",
                "samples", "temperature", "seed", "sparsity", "predictors", "stats", "command")
        lines += [f"- {k}: `{m[k]}`" for k in keys if m.get(k) is not None]
        if m.get("problems"):
            lines.append(f"- problems ({len(m['problems'])}): {', '.join(m['problems'][:12])}"
                         + (" ..." if len(m["problems"]) > 12 else ""))
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    """x = measured sparsity, y = Pass@1 with CI error bars; one line per (model, knob), each starting at
    the model's dense point; budget points as markers only (they all sit at dense's sparsity)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    models = sorted({r["model"] for r in rows})
    colors = plt.get_cmap("tab10")
    markers = {"act_threshold": "o-", "target_sparsity": "s--", "pred_threshold": "^-.", "budget": "D",
               "dense": "*"}
    for i, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        dense = [r for r in mine if r["knob"] == "dense"]
        knobs = sorted({r["knob"] for r in mine} - {"dense"}, key=lambda k: _KNOB_ORDER.get(k, 99)) or ["dense"]
        for knob in knobs:
            pts = [r for r in mine if r["knob"] == knob]
            if knob != "budget" and knob != "dense":
                pts = dense + pts
            pts.sort(key=lambda r: r["measured_sparsity"])
            y = [r["pass@1"] for r in pts]
            err = [[r["pass@1"] - r["ci_lo"] for r in pts], [r["ci_hi"] - r["pass@1"] for r in pts]]
            ax.errorbar([r["measured_sparsity"] for r in pts], y, yerr=err, fmt=markers.get(knob, "o-"),
                        color=colors(i % 10), capsize=3, label=f"{model}: {knob.replace('_', ' ')}")
    ax.set_xlabel("measured FFN sparsity (fraction of neurons skipped)")
    ax.set_ylabel("HumanEval Pass@1 (95% CI)")
    ax.set_xlim(-0.02, max(0.5, max(r["measured_sparsity"] for r in rows) + 0.05))
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("HumanEval Pass@1 vs activation sparsity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(dirs, out_dir, *, png: bool = True) -> dict:
    """Regenerate report.md / report.csv (and pass_vs_sparsity.png) in out_dir from `dirs`; -> paths."""
    rows, metas = collect(dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "report.csv", "md": out / "report.md"}
    if png:
        paths["png"] = out / "pass_vs_sparsity.png"
        plot(rows, paths["png"])
    write_csv(rows, paths["csv"])
    write_markdown(rows, metas, paths["md"], paths["png"].name if png else None)
    return paths
