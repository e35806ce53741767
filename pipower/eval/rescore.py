"""Re-extract and re-check a finished run from its stored raw generations, with no model.

Generation is the expensive part of an evaluation (minutes per run); extraction and checking take
seconds. When only those change (a `HARNESS_VERSION` bump in run.py), `rescore` brings an output
directory up to date in place: every record's `completion`, `passed` and `result` are recomputed from
its `raw` text, settings.json gets the current harness version, and summary.json is rewritten. The
timings and sparsity measured at generation are kept as they were.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from .humaneval import check, extract_completion
from .run import (
    HARNESS_VERSION,
    SAMPLES,
    SETTINGS,
    SUMMARY,
    EvalSettingsError,
    _append,
    _DirLock,
    read_samples,
    summarize_run,
    write_summary,
)

log = logging.getLogger(__name__)


def rescore(out_dir, problems: list[dict], *, progress: Callable[[int, int], None] | None = None) -> dict:
    """Recompute completions and checks of every record in `out_dir` -> the new summary.

    problems: the HumanEval problems (load_problems()); each record's task must be among them.
    Raises EvalSettingsError if the directory lacks settings or samples, or a record lacks its raw text.
    """
    out = Path(out_dir)
    with _DirLock(out):
        try:
            settings = json.loads((out / SETTINGS).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EvalSettingsError(f"{out}: no readable {SETTINGS} ({e})") from e
        records = list(read_samples(out / SAMPLES).values())
        if not records:
            raise EvalSettingsError(f"{out}: no samples to rescore")
        by_id = {p["task_id"]: p for p in problems}
        unknown = sorted({r["task_id"] for r in records} - set(by_id))
        if unknown:
            raise EvalSettingsError(f"{out}: records for tasks not in the problem set: {unknown[:5]}")
        if any("raw" not in r for r in records):
            raise EvalSettingsError(f"{out}: records without raw text cannot be rescored")
        old_summary = {}
        if (out / SUMMARY).is_file():
            old_summary = json.loads((out / SUMMARY).read_text())
        changed = 0
        for i, r in enumerate(records):
            p = by_id[r["task_id"]]
            completion = extract_completion(p, r["raw"], settings["mode"])
            res = check(p, completion, timeout=settings["check_timeout_s"])
            changed += res["passed"] != r["passed"]
            r.update(completion=completion, passed=res["passed"], result=res["result"],
                     check_seconds=res["duration_s"])
            if progress:
                progress(i + 1, len(records))
        tmp = out / (SAMPLES + ".part")
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in records:
                _append(fh, r)
        tmp.replace(out / SAMPLES)
        previous_version = settings.get("harness_version")
        settings["harness_version"] = HARNESS_VERSION
        tmp = out / (SETTINGS + ".part")
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        tmp.replace(out / SETTINGS)
        samples = max(r["sample"] for r in records) + 1
        summary = summarize_run(records, samples, settings)
        # the model block comes from generation (source, threads); a rescore has no model to ask
        summary["model"] = old_summary.get("model", {})
        summary["rescored_from_harness_version"] = previous_version
        summary["rescore_changed_outcomes"] = changed
        write_summary(out, summary)
    log.info("%s: rescored %d samples (harness %s -> %s), %d outcomes changed",
             out, len(records), previous_version, HARNESS_VERSION, changed)
    return summary
