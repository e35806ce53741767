"""A grid of sparsity settings, each evaluated on the same HumanEval problems (one sub-directory each).

out_dir/
  sweep.json        the model, the run parameters, the points, an equivalent `pipower` command
  dense/            always run first: the reference every other point is compared with
  act-0.1/ ...      one `evaluate` directory per point (resumable: a finished point costs nothing)
  report.md, report.csv, pass_vs_sparsity.png   (pipower.eval.report)
"""
from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path

from ..errors import InvalidArgumentError
from .humaneval import task_number
from .knobs import ENGINE_NOTE, Point, configure
from .run import SAMPLES, evaluate, read_samples, write_summary

# sweep argument -> knob, in the order points run
KNOB_LISTS = {"act_thresholds": "act_threshold", "target_sparsities": "target_sparsity",
              "pred_thresholds": "pred_threshold", "budgets": "budget"}
CLI_FLAGS = {"budgets": "vram-budgets"}     # knob lists whose `pipower sweep` flag is not the key with dashes


def _bytes(v) -> int:
    if isinstance(v, str):
        from ..units import parse_bytes
        try:
            return parse_bytes(v)
        except ValueError:
            raise InvalidArgumentError(f"bad budget {v!r} (use e.g. 512MiB, 2GiB)") from None
    return int(v)


def points_for(knobs: Mapping) -> list[Point]:
    """dense first, then each knob's values in the order given (duplicates dropped)."""
    unknown = set(knobs) - set(KNOB_LISTS)
    if unknown:
        raise InvalidArgumentError(f"unknown knob list(s) {sorted(unknown)}; use {', '.join(KNOB_LISTS)}")
    points = [Point("dense")]
    for arg, knob in KNOB_LISTS.items():
        for v in knobs.get(arg) or ():
            p = Point(knob, _bytes(v) if knob == "budget" else float(v))
            if p not in points:
                points.append(p)
    return points


def _compact(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the --problems syntax)."""
    parts, nums = [], sorted(set(numbers))
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(parts)


def equivalent_command(model_spec: str, points: list[Point], out_dir, problems, params: dict,
                       predictors=None, stats=None) -> str:
    """The `pipower sweep humaneval` command line that reproduces this sweep."""
    cmd = ["pipower", "sweep", "humaneval", "-m", str(model_spec)]
    for opt in ("weights", "dot", "threads", "backend", "draft"):
        if params.get(opt) is not None:
            cmd += [f"--{opt}", str(params[opt])]
    for arg, knob in KNOB_LISTS.items():
        vals = [p.value for p in points if p.knob == knob]
        if vals:
            cmd += [f"--{CLI_FLAGS.get(arg, arg.replace('_', '-'))}",
                    ",".join(str(int(v)) if knob == "budget" else f"{v:g}" for v in vals)]
    if predictors:
        cmd += ["--predictors", str(predictors)]
    if stats:
        cmd += ["--stats", str(stats)]
    cmd += ["--problems", _compact([task_number(p) for p in problems]), "--mode", params["mode"],
            "--n-predict", str(params["max_tokens"]), "--samples", str(params["samples"]),
            "--temp", f"{params['temperature']:g}", "--seed", str(params["seed"]), "--out", str(out_dir)]
    return shlex.join(cmd)


def compare_with_dense(out: Path, point_dir: Path, problems) -> dict:
    """How many samples of a point generated exactly the dense point's text (placement must keep all)."""
    dense, other = read_samples(out / "dense" / SAMPLES), read_samples(point_dir / SAMPLES)
    keys = [k for k in other if k in dense and k[0] in {p["task_id"] for p in problems}]
    same = sum(dense[k]["raw"] == other[k]["raw"] for k in keys)
    return {"compared": len(keys), "identical": same}


def sweep(model_spec, knobs: Mapping, out_dir, problems: list[dict], *, mode: str = "completion",
          max_tokens: int = 384, samples: int = 1, temperature: float = 0.0, seed: int = 0,
          weights: str | None = None, threads: int | None = None, backend: str = "auto", dot: str | None = None,
          draft: str | None = None,
          predictors=None, stats=None, command: str | None = None, write_report: bool = True,
          progress: Callable[[Point, int, int, dict | None], None] | None = None) -> list[dict]:
    """Evaluate dense plus every knob value in `knobs` ({"act_thresholds": [...], "target_sparsities":
    [...], "pred_thresholds": [...], "budgets": [bytes or "1GiB"...]}); -> the points' summaries.

    model_spec: a model name/path (loaded once here) or a loaded pipower Model. Budget points need
    `stats`, predictor points `predictors`. Budget points run the hybrid scheduler on a fresh copy of the
    model (see knobs.ENGINE_NOTE);
    their summary gains "vs_dense": how many completions are identical to dense's (all should be).
    """
    points = points_for(knobs)
    if any(p.knob == "pred_threshold" for p in points) and predictors is None:
        raise InvalidArgumentError("pred_thresholds need a predictor file (--predictors)")
    if any(p.knob == "budget" for p in points) and stats is None:
        raise InvalidArgumentError("budgets need an activation-stats file to plan from (--stats)")
    if any(p.knob == "budget" for p in points):
        # budget points run the hybrid engine, which multiplies in float; the points they are compared
        # with (dense first) must too, or "placement never changes the text" could not be checked
        if dot == "int8":
            raise InvalidArgumentError("budget points run the hybrid engine, which multiplies in float: "
                                       "use --dot float (the default when budgets are swept)")
        dot = "float"
    if isinstance(model_spec, (str, Path)):
        import pipower
        model = pipower.load(model_spec, backend=backend, threads=threads, weights=weights, dot=dot, progress=False)
    elif dot == "float" and getattr(model_spec, "dot", "float") != "float":
        raise InvalidArgumentError("budget points need a model loaded with dot='float' (the hybrid engine "
                                   "multiplies in float)")
    else:
        model, model_spec = model_spec, model_spec.source
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = dict(mode=mode, max_tokens=max_tokens, samples=samples, temperature=temperature, seed=seed)
    if draft is not None:
        params["draft"] = draft
    meta = {"model_spec": str(model_spec), "source": str(model.source), "fingerprint": model.fingerprint,
            "weights": model.weights, "dot": getattr(model, "dot", "float"), "backend": model.backend, **params,
            "threads": getattr(model.transformer.ops, "n_threads", None),
            "problems": [p["task_id"] for p in problems], "points": [p.name for p in points],
            "predictors": str(predictors) if predictors else None, "stats": str(stats) if stats else None,
            "equivalent_command": equivalent_command(model_spec, points, out, problems,
                                                     {**params, "weights": model.weights, "threads": threads,
                                                      "dot": dot,
                                                      "backend": backend if backend != "auto" else None},
                                                     predictors, stats),
            "command": command}
    if any(p.knob == "budget" for p in points):
        meta["engine_note"] = ENGINE_NOTE
    (out / "sweep.json").write_text(json.dumps(meta, indent=2) + "\n")
    summaries = []
    try:
        for point in points:
            run_model = model
            if point.knob == "budget":      # each budget point places the weights of its own fresh copy
                import pipower
                run_model = pipower.load(model.source, backend=backend, threads=threads, weights=model.weights,
                                         dot="float", progress=False)
            sparsity = configure(run_model, point, predictors=predictors, stats=stats)
            cb = (lambda d, t, r, _p=point: progress(_p, d, t, r)) if progress else None
            s = evaluate(run_model, problems, out / point.name, settings={"sparsity": sparsity}, progress=cb,
                         **params)
            if point.knob != "dense":      # how many completions the knob changed (budget: must be none)
                s["vs_dense"] = compare_with_dense(out, out / point.name, problems)
                write_summary(out / point.name, s)
            summaries.append(s)
    finally:
        model.set_sparsity()           # hand a caller's model back dense, not at the last point
    if write_report:
        from .report import write_report as _write
        _write([out], out)
    return summaries
