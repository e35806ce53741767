"""Print results/sparsity/SUMMARY.md from the run.sh outputs (bench JSONs, predictor reports)."""
import json
import sys
from pathlib import Path

here = Path(__file__).parent
out = ["# Sparsity runs (results/sparsity/run.sh)", "",
       "q8 weights, 2 threads, `pipower bench --tokens 32 --repeats 5`; the machine was shared with other jobs,",
       "so compare rows of one model only. Predictor sparsity = fraction of FFN neurons skipped per token.", ""]
for model in sorted(p for p in here.iterdir() if p.is_dir()):
    out += [f"## {model.name}", "", f"![frequencies]({model.name}/frequencies.png)", ""]
    rows = [("dense", model / "bench-dense.json")] + [(f"tau_pred {t}", model / f"bench-pred{t}.json") for t in (-1, 0, 1)]
    out += ["| mode | decode tok/s | FFN sparsity |", "|---|---|---|"]
    for name, path in rows:
        if path.is_file():
            r = json.loads(path.read_text())
            out.append(f"| {name} | {r['decode_tok_s']:.1f} | {r['ffn_sparsity']:.1%} |")
    log = model / "train.log"
    if log.is_file():
        lines = [line for line in log.read_text().splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 5]
        if lines:
            vals = [list(map(float, line.split()[1:])) for line in lines]
            mean = [sum(v[i] for v in vals) / len(vals) for i in range(4)]
            out += ["", f"Predictors (held out, tau_pred 0), mean over {len(vals)} layers: recall {mean[0]:.3f}, "
                        f"precision {mean[1]:.3f}, predicted sparsity {mean[2]:.3f}, true sparsity {mean[3]:.3f}; "
                        f"per layer in `{model.name}/train.log`."]
    out.append("")
(here / "SUMMARY.md").write_text("\n".join(out))
sys.stdout.write("\n".join(out))
