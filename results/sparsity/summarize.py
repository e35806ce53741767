"""Print results/sparsity/SUMMARY.md from the run.sh outputs (bench JSONs, predictor reports)."""
import json
import sys
from pathlib import Path

here = Path(__file__).parent
out = ["# Sparsity runs (results/sparsity/run.sh)", "",
       "q8 weights, 2 threads, `pipower bench --predictors P --pred-thresholds 0,1,2 --tokens 32 --repeats 5`",
       "(dense and each threshold interleaved round by round in one process; the study's HumanEval run was",
       "paused meanwhile). FFN sparsity = fraction of FFN neurons skipped per token.", ""]
for model in sorted(p for p in here.iterdir() if p.is_dir()):
    out += [f"## {model.name}", "", f"![frequencies]({model.name}/frequencies.png)", ""]
    th = model / "bench-thresholds.json"
    if th.is_file():
        r = json.loads(th.read_text())
        out += [f"Decode, dense vs predictors (q8 predictors), {len(next(iter(r['results'].values()))['rounds'])} "
                f"interleaved rounds, {r['threads']} threads (`bench-thresholds.json`):", "",
                "| mode | decode tok/s | vs dense | FFN sparsity |", "|---|---|---|---|"]
        for name, v in r["results"].items():
            out.append(f"| {name} | {v['decode_tok_s']:.1f} | {v['ratio_to_first']:.2f} | {v['ffn_sparsity']:.1%} |")
    log = model / "train.log"
    if log.is_file():
        lines = [line for line in log.read_text().splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 5]
        if lines:
            vals = [list(map(float, line.split()[1:])) for line in lines]
            mean = [sum(v[i] for v in vals) / len(vals) for i in range(4)]
            out += ["", f"Predictors (held out, tau_pred 0), mean over {len(vals)} layers: recall {mean[0]:.3f}, "
                        f"precision {mean[1]:.3f}, predicted sparsity {mean[2]:.3f}, true sparsity {mean[3]:.3f}; "
                        f"per layer in `{model.name}/train.log`."]
    default = model / "train-rank256-default.log"
    if default.is_file():
        text = default.read_text()
        vals = [list(map(float, ln.split()[1:])) for ln in text.splitlines()
                if ln.strip()[:1].isdigit() and len(ln.split()) == 5]
        wall = next((ln.split("):")[-1].strip() for ln in text.splitlines() if "Elapsed (wall clock)" in ln), "?")
        if vals:
            out += ["", f"Default settings (`pipower train-predictors`: rank 256, 12 epochs): wall time {wall} on "
                        f"2 cores shared with a HumanEval run; mean held-out recall "
                        f"{sum(v[0] for v in vals) / len(vals):.3f}, predicted sparsity "
                        f"{sum(v[2] for v in vals) / len(vals):.3f} (`{model.name}/{default.name}`)."]
    out.append("")
(here / "SUMMARY.md").write_text("\n".join(out))
sys.stdout.write("\n".join(out))
