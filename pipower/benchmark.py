"""Timing a loaded model: prefill and decode tokens/s, measured FFN sparsity, achieved weight GB/s.

Decode is timed on `Transformer.forward` directly (greedy, one token per step) so tokenizer and
streaming costs stay out; medians over repeats, since a shared machine's memory bandwidth can change from minute to minute.
"""
from __future__ import annotations

import time

import numpy as np

from .errors import InvalidArgumentError

DEFAULT_PROMPT = "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), so a table says which machine made it."""
    import platform
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def read_gbs(threads: int) -> float | None:
    """Memory read bandwidth now (GB/s over a 256 MiB buffer, median of 5), or None without the compiled
    kernels: reported next to speeds, so a slower machine can be told from a slower pipower."""
    from . import _cpu
    if not _cpu.AVAILABLE:
        return None
    from ._cpu import _bandwidth
    return float(_bandwidth.read_bandwidth_gbs(np.ones(64 << 20, np.float32), n_threads=threads))


def _selector_counts(t) -> tuple[int, int]:
    sel = t.ffn_neurons
    return (sel.skipped, sel.total) if sel is not None and hasattr(sel, "skipped") else (0, 0)


def time_model(model, *, prompt_ids=None, decode_tokens: int = 32, repeats: int = 3) -> dict:
    """-> {prefill_tok_s, decode_tok_s, decode_ms (median per step), ffn_sparsity (decode steps),
    weight_mib_per_token, achieved_gb_s, ...}."""
    if decode_tokens < 1 or repeats < 1:
        raise InvalidArgumentError("decode_tokens and repeats must be >= 1")
    t = model.transformer
    ids = np.asarray(prompt_ids if prompt_ids is not None else model.tokenizer.encode(DEFAULT_PROMPT))
    prefill_s, step_s = [], []
    skipped = total = 0
    for _ in range(repeats + 1):                       # the first round warms caches and pages in weights
        cache = t.new_cache(max_len=len(ids) + decode_tokens + 1)
        t0 = time.perf_counter()
        logits = t.forward(ids, cache, last_only=True)
        prefill_s.append(time.perf_counter() - t0)
        s0, n0 = _selector_counts(t)
        steps = []
        for _ in range(decode_tokens):
            token = int(np.argmax(logits[-1]))
            t0 = time.perf_counter()
            logits = t.forward(np.array([token]), cache, last_only=True)
            steps.append(time.perf_counter() - t0)
        s1, n1 = _selector_counts(t)
        skipped, total = skipped + s1 - s0, total + n1 - n0
        step_s.append(float(np.median(steps)))
    prefill, step = float(np.median(prefill_s[1:])), float(np.median(step_s[1:]))
    nbytes = t.nbytes_per_token
    return {
        "weights": t.weights, "backend": t.ops.name, "threads": t.ops.n_threads,
        "prompt_tokens": int(len(ids)), "decode_tokens": decode_tokens, "repeats": repeats,
        "prefill_tok_s": len(ids) / prefill, "decode_tok_s": 1 / step, "decode_ms": 1000 * step,
        "ffn_sparsity": skipped / total if total else 0.0,
        "weight_mib_per_token": nbytes / 2**20,
        # dense bytes: with sparsity the FFN reads fewer rows, so this overstates the bytes read
        "achieved_gb_s": nbytes / step / 1e9,
    }


def compare_settings(model, settings: dict, *, prompt_ids=None, decode_tokens: int = 32, rounds: int = 5) -> dict:
    """Time several sparsity settings of one model against each other, interleaved round by round.

    settings: name -> keyword arguments of Model.set_sparsity ({} = dense). Each round times every
    setting once (time_model with one warm-up and one measured repeat), so drift of this shared
    machine hits all settings alike. -> {name: {decode_tok_s (median over rounds), ffn_sparsity,
    ratio_to_first (median of per-round ratios to the first setting), rounds: [...]}}. The model is
    left dense.
    """
    if rounds < 1 or not settings:
        raise InvalidArgumentError("need at least one round and one setting")
    per = {name: [] for name in settings}
    try:
        for _ in range(rounds):
            for name, kw in settings.items():
                model.set_sparsity(**kw)
                per[name].append(time_model(model, prompt_ids=prompt_ids, decode_tokens=decode_tokens, repeats=1))
    finally:
        model.set_sparsity()
    first = next(iter(per.values()))
    return {name: {"decode_tok_s": float(np.median([r["decode_tok_s"] for r in rs])),
                   "ffn_sparsity": float(np.mean([r["ffn_sparsity"] for r in rs])),
                   "ratio_to_first": float(np.median([r["decode_tok_s"] / f["decode_tok_s"]
                                                      for r, f in zip(rs, first)])),
                   "rounds": rs}
            for name, rs in per.items()}


def compare_drafts(model, drafts: list, *, prompt_ids=None, new_tokens: int = 128, rounds: int = 3) -> dict:
    """Greedy generation of new_tokens without a drafter and with each of `drafts` (speculative decoding),
    interleaved round by round. -> {"none" | draft: {tok_s (median of new tokens / decode seconds),
    ratio_to_plain (median of per-round ratios), drafted, accepted, draft_acceptance, identical (the
    token ids equal the plain run's: they must)}}."""
    if rounds < 1 or new_tokens < 1:
        raise InvalidArgumentError("need at least one round and one new token")
    ids = list(prompt_ids) if prompt_ids is not None else model.tokenizer.encode(DEFAULT_PROMPT)
    names = ["none"] + [str(d) for d in drafts]
    per = {n: [] for n in names}
    outputs = {}
    model.generate_ids(ids, max_tokens=4)                                # warm-up
    for _ in range(rounds):
        for name, draft in zip(names, [None] + list(drafts)):
            out = model.generate_ids(ids, max_tokens=new_tokens, draft=draft)
            st = model.last_stats
            outputs.setdefault(name, out)
            per[name].append({"tok_s": st.new_tokens / (st.prefill_seconds + st.decode_seconds),
                              "drafted": st.drafted, "accepted": st.accepted})
    plain = per["none"]
    return {name: {"tok_s": float(np.median([r["tok_s"] for r in rs])),
                   "ratio_to_plain": float(np.median([r["tok_s"] / p["tok_s"] for r, p in zip(rs, plain)])),
                   "drafted": rs[-1]["drafted"], "accepted": rs[-1]["accepted"],
                   "draft_acceptance": rs[-1]["accepted"] / rs[-1]["drafted"] if rs[-1]["drafted"] else 0.0,
                   "identical": outputs[name] == outputs["none"]}
            for name, rs in per.items()}
