"""Run a model over HumanEval problems: generate, extract, check, record; resumable; summarize.

Layout of an output directory:
  settings.json   everything the results depend on (model fingerprint, weight format, backend, mode,
                  sparsity, sampling, max_tokens, harness version). Written before the first sample;
                  a later run into the same directory must have identical settings, or it is refused.
  samples.jsonl   one JSON line per (task_id, sample), appended, flushed and fsynced one at a time, so
                  a killed run loses at most the line being written (an unterminated tail is cut off on
                  resume and that sample redone).
  summary.json    pass@k, CI, measured sparsity, throughput, outcome counts, model and settings.

Which problems and how many samples are *not* settings: a run with a larger selection (or more
samples) into the same directory reuses what is done, and the summary covers exactly the problems and
samples of the call. Per-sample seeds derive from (seed, task number, sample index) for the same reason.
"""
from __future__ import annotations

import json
import logging
import math
import os
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, PipowerError
from .humaneval import (
    _FENCE,
    CHAT_INSTRUCTION,
    MODES,
    STOP_SEQUENCES,
    _defines,
    chat_messages,
    check,
    completion_prompt,
    extract_completion,
    pass_at_k,
    summarize,
    task_number,
    wilson_interval,
)

log = logging.getLogger(__name__)

# Bump when prompts, extraction, stop handling or checking change: old results no longer compare.
HARNESS_VERSION = 2          # 2: chat replies reduced to their definitions (keep_definitions)
CHECK_TIMEOUT_S = 3.0          # openai/human-eval's per-program timeout (execution.py)
SETTINGS, SAMPLES, SUMMARY = "settings.json", "samples.jsonl", "summary.json"


class EvalSettingsError(PipowerError):
    """An output directory holds results made with other settings (or is otherwise unusable)."""


# --- settings --------------------------------------------------------------------------------------

def model_settings(model) -> dict:
    """What about the model a result depends on: the weights' fingerprint, their format, the backend, and
    the integer dot products when on (absent for the float path, as in results made before they existed)."""
    s = {"model_fingerprint": model.fingerprint, "weights": model.weights, "backend": model.backend}
    if getattr(model, "dot", "float") != "float":
        s["dot"] = model.dot
    return s


def _threads(model) -> int | None:
    return getattr(getattr(getattr(model, "transformer", None), "ops", None), "n_threads", None)


def _selector(model):
    return getattr(getattr(model, "transformer", None), "ffn_neurons", None)


def _canonical(obj):
    """JSON round trip: tuples become lists, so a fresh dict compares equal to one read from disk."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)[:60]} -> {json.dumps(b)[:60]}")
    return out


def _check_settings(out: Path, settings: dict) -> None:
    path = out / SETTINGS
    if not path.is_file():
        if (out / SAMPLES).exists():
            raise EvalSettingsError(f"{out} has {SAMPLES} but no {SETTINGS}: cannot tell how those results "
                                    f"were made; choose another --out")
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)                 # never a half-written settings file under its real name
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalSettingsError(f"{path}: unreadable ({e}); choose another --out") from e
    if old != settings:
        changes = "; ".join(_diff(old, settings)[:6])
        raise EvalSettingsError(f"{out} holds results made with other settings ({changes}); "
                                f"choose another --out (or delete {out} to start over)")


# --- the samples file ------------------------------------------------------------------------------

def read_samples(path: Path, repair: bool = False) -> dict[tuple[str, int], dict]:
    """(task_id, sample) -> record from a samples.jsonl. An unterminated last line is a write that was
    cut short: it is ignored, and with `repair` cut off the file so later appends start on a fresh line.
    A malformed *terminated* line cannot come from a kill; it raises EvalSettingsError."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: ignoring a partly written last line (%d bytes)", path, len(data) - end)
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
    records = {}
    for i, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            records[(r["task_id"], int(r["sample"]))] = r
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise EvalSettingsError(f"{path}:{i}: malformed record ({e}); fix or delete the file") from e
    return records


def _append(fh, record: dict) -> None:
    fh.write(json.dumps(record) + "\n")
    fh.flush()
    os.fsync(fh.fileno())                # a power cut or kill -9 loses at most this line


class _DirLock:
    """One writer per output directory: two runs appending to one file would interleave records."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self):
        import fcntl
        self.fh = open(self.path, "w")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise EvalSettingsError(f"{self.path.parent} is in use by another run") from None
        return self

    def __exit__(self, *exc):
        self.fh.close()                    # closing releases the lock


# --- one sample ------------------------------------------------------------------------------------

def sample_seed(seed: int, problem: dict, sample: int) -> int:
    """Independent, reproducible seed per (task, sample), whatever else the run contains."""
    return int(np.random.SeedSequence([seed, task_number(problem), sample]).generate_state(1)[0])


def _fence_closed(text: str, entry_point: str) -> bool:
    """The reply holds a *closed* ```python block defining the entry point: extraction takes the first
    such block whatever follows, so generating more (usually an explanation) cannot change the result."""
    for m in _FENCE.finditer(text):
        lang, code = m.group(1), m.group(2)
        if (m.group(0).endswith("```") and lang.lower() in ("", "python", "py", "python3")
                and _defines(textwrap.dedent(code), entry_point)):
            return True
    return False


def generate_one(model, problem: dict, mode: str, *, max_tokens: int, temperature: float, top_k: int,
                 top_p: float, seed: int, draft=None) -> tuple[str, dict]:
    """-> (raw generated text, stats dict). Measures FFN sparsity from the selector's own counters,
    which stay right even when a chat reply is cut short at its closed code block. draft: speculative
    decoding (pipower.speculative; the text is the same, the stats gain drafted / accepted)."""
    kw = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if draft is not None:
        kw["draft"] = draft
    sel = _selector(model)
    counts0 = (sel.skipped, sel.total) if hasattr(sel, "skipped") else None
    t0 = time.perf_counter()
    if mode == "completion":
        stream = model.stream(completion_prompt(problem), stop=STOP_SEQUENCES, **kw)
    else:
        stream = model.stream_chat(chat_messages(problem), **kw)
    pieces, early = [], False
    for piece in stream:
        pieces.append(piece)
        if mode == "chat" and "`" in piece and _fence_closed("".join(pieces), problem["entry_point"]):
            stream.close()
            early = True
            break
    seconds = time.perf_counter() - t0
    st = stream.stats
    sparsity = st.ffn_sparsity
    if counts0 is not None:
        total = sel.total - counts0[1]
        sparsity = (sel.skipped - counts0[0]) / total if total else 0.0
    rec = {"new_tokens": st.new_tokens, "prompt_tokens": st.prompt_tokens, "seconds": round(seconds, 4),
           "prefill_seconds": round(st.prefill_seconds, 4), "decode_seconds": round(st.decode_seconds, 4),
           "ffn_sparsity": float(sparsity), "stop_reason": "code_block" if early else st.stop_reason}
    if draft is not None:
        rec.update(drafted=st.drafted, accepted=st.accepted)
    return "".join(pieces), rec


# --- the run ---------------------------------------------------------------------------------------

def evaluate(model, problems: list[dict], out_dir, *, mode: str = "completion", max_tokens: int = 384,
             samples: int = 1, temperature: float = 0.0, seed: int = 0, top_k: int = 0, top_p: float = 1.0,
             settings: dict | None = None, check_timeout: float = CHECK_TIMEOUT_S,
             progress: Callable[[int, int, dict | None], None] | None = None, draft: str | None = None) -> dict:
    """Evaluate `model` (already configured for sparsity) on `problems`; -> the summary dict.

    settings: what the caller configured that the model cannot report itself, normally
        {"sparsity": {...}} from `pipower.eval.knobs.configure`; None means dense and is refused when
        the model has a neuron selector installed (its results would be filed as dense).
    progress(done, total, record): called once before the first new sample (done = samples reused
        from an earlier run, record None), then after each sample.
    draft: speculative decoding with this drafter (a name, see pipower.speculative); recorded in the
        settings (greedy text must equal the plain run's) with drafted/accepted per sample.
    Raises EvalSettingsError if out_dir holds results made with other settings.
    """
    if mode not in MODES:
        raise InvalidArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    if samples < 1 or max_tokens < 1:
        raise InvalidArgumentError(f"samples and max_tokens must be >= 1 (got {samples}, {max_tokens})")
    if temperature == 0 and samples > 1:
        log.warning("greedy decoding with %d samples: every sample will be identical", samples)
    if not problems:
        raise InvalidArgumentError("no problems to evaluate")
    if settings is None:
        if _selector(model) is not None:
            raise InvalidArgumentError("the model has sparsity set: describe it in settings "
                                       "(pipower.eval.knobs.configure returns the description)")
        settings = {"sparsity": {"knob": "dense"}}
    core = {
        "harness_version": HARNESS_VERSION, **model_settings(model), "mode": mode, "max_tokens": max_tokens,
        "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed,
        "prompt": list(STOP_SEQUENCES) if mode == "completion" else CHAT_INSTRUCTION,
        "check_timeout_s": check_timeout}
    if draft is not None:
        core["draft"] = str(draft)
    clash = set(core) & set(settings)
    if clash:
        raise InvalidArgumentError(f"settings may not override {sorted(clash)}: pass them as arguments")
    full = _canonical({**core, **settings})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    with _DirLock(out):
        _check_settings(out, full)
        records = read_samples(out / SAMPLES, repair=True)
        todo = [(p, s) for p in problems for s in range(samples) if (p["task_id"], s) not in records]
        total = len(problems) * samples
        if progress:
            progress(total - len(todo), total, None)
        with open(out / SAMPLES, "a", encoding="utf-8") as fh:
            for i, (p, s) in enumerate(todo):
                seed_i = sample_seed(seed, p, s)
                raw, stats = generate_one(model, p, mode, max_tokens=max_tokens, temperature=temperature,
                                          top_k=top_k, top_p=top_p, seed=seed_i, draft=draft)
                completion = extract_completion(p, raw, mode)
                res = check(p, completion, timeout=check_timeout)
                rec = {"task_id": p["task_id"], "sample": s, "seed": seed_i, "passed": res["passed"],
                       "result": res["result"], **stats, "check_seconds": res["duration_s"],
                       "completion": completion, "raw": raw}
                _append(fh, rec)
                records[(p["task_id"], s)] = rec
                if progress:
                    progress(total - len(todo) + i + 1, total, rec)
        chosen = [records[(p["task_id"], s)] for p in problems for s in range(samples)]
        summary = summarize_run(chosen, samples, full, model=model, started=started,
                                resumed=total - len(todo))
        if not todo:   # nothing generated: keep the timestamps of the run that made these samples
            prev = _previous_summary(out)
            if prev.get("settings") == summary["settings"] and prev.get("task_ids") == summary["task_ids"]:
                for key in ("started_at", "finished_at", "resumed_samples"):
                    summary[key] = prev.get(key, summary[key])
        write_summary(out, summary)
    return summary


def _draft_totals(records: list[dict]) -> dict:
    """Speculative decoding's counts over the samples that have them ({} for plain runs)."""
    if not any("drafted" in r for r in records):
        return {}
    drafted = sum(r.get("drafted", 0) for r in records)
    accepted = sum(r.get("accepted", 0) for r in records)
    return {"drafted": drafted, "accepted": accepted, "draft_acceptance": accepted / drafted if drafted else 0.0}


def _previous_summary(out: Path) -> dict:
    try:
        return json.loads((out / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}


def write_summary(out_dir, summary: dict) -> None:
    """summary.json, replaced atomically: a report never reads half of one."""
    tmp = Path(out_dir) / (SUMMARY + ".part")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(Path(out_dir) / SUMMARY)


# --- summary ---------------------------------------------------------------------------------------

def pass_at_ks(per_problem: list[tuple[int, int]], samples: int) -> dict[str, float]:
    """{"pass@1": .., "pass@10": .., ...} for k in 1, 10, 100... <= samples, each the unbiased
    estimator averaged over problems. per_problem: (n, c) pairs."""
    ks = [k for k in (10 ** j for j in range(int(math.log10(samples)) + 1)) if k <= samples]
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in per_problem])) for k in ks}


def pass1_interval(per_problem: list[tuple[int, int]], z: float = 1.959963984540054) -> tuple[float, float, str]:
    """95% CI of pass@1. One sample per problem: Wilson score interval over problems. More: normal
    approximation over per-problem pass rates c/n (mean +- z * sd / sqrt(N), clipped to [0, 1]), which
    treats problems as the sampled unit and ignores the (smaller) within-problem sampling noise."""
    if all(n == 1 for n, _ in per_problem):
        lo, hi = wilson_interval(sum(c for _, c in per_problem), len(per_problem), z)
        return lo, hi, "wilson"
    rates = np.array([c / n for n, c in per_problem])
    mean = float(rates.mean())
    half = z * float(rates.std(ddof=1)) / math.sqrt(len(rates)) if len(rates) > 1 else 1.0
    return max(0.0, mean - half), min(1.0, mean + half), "normal"


def summarize_run(records: list[dict], samples: int, settings: dict, *, model=None, started=None,
                  resumed: int = 0) -> dict:
    """The summary of one run's records (every (problem, sample) of the call, once)."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task_id"], []).append(r)
    per_problem = [(len(rs), sum(bool(r["passed"]) for r in rs)) for rs in by_task.values()]
    lo, hi, method = pass1_interval(per_problem)
    weights = np.array([r["prompt_tokens"] + r["new_tokens"] for r in records], float)
    sparsity = np.array([r["ffn_sparsity"] for r in records], float)
    decode_steps = sum(max(r["new_tokens"] - 1, 0) for r in records)   # token 1 comes from prefill
    decode_s = sum(r["decode_seconds"] for r in records)
    prompt_toks = sum(r["prompt_tokens"] for r in records)
    prefill_s = sum(r["prefill_seconds"] for r in records)
    info = {}
    if model is not None:
        info = {"source": str(model.source), "fingerprint": model.fingerprint, "weights": model.weights,
                "backend": model.backend, "threads": _threads(model)}
    from .. import __version__
    return {
        **pass_at_ks(per_problem, samples), "ci95": [lo, hi], "ci_method": method,
        "n_problems": len(per_problem), "samples": samples, "n_samples": len(records),
        "passed": sum(c for _, c in per_problem),
        "outcomes": summarize(records)["outcomes"],
        "stop_reasons": dict(Counter(r["stop_reason"] for r in records).most_common()),
        "ffn_sparsity": float((weights * sparsity).sum() / weights.sum()) if weights.sum() else 0.0,
        "ffn_sparsity_weighting": "tokens (prompt + generated) per sample",
        "decode_tok_s": decode_steps / decode_s if decode_s else 0.0,
        "prefill_tok_s": prompt_toks / prefill_s if prefill_s else 0.0,
        "new_tokens": sum(r["new_tokens"] for r in records), "prompt_tokens": prompt_toks,
        "generation_seconds": sum(r["seconds"] for r in records),
        **_draft_totals(records),
        "seconds_per_sample": sum(r["seconds"] + r["check_seconds"] for r in records) / len(records),
        "check_seconds": sum(r["check_seconds"] for r in records),
        "task_ids": list(by_task), "resumed_samples": resumed,
        "model": info, "settings": settings, "pipower_version": __version__,
        "started_at": started.isoformat(timespec="seconds") if started else None,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
