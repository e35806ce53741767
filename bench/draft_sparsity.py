"""Sparse self-drafts under verification: acceptance and speed vs target sparsity (the study's question
"under verification the activation threshold moves speed, never the text").

    python bench/draft_sparsity.py --model qwen2.5-coder-0.5b --problems 6 --sparsities 0.25,0.5,0.7,0.9 \
        --out bench/results/draft_sparsity.json

For each of the first --problems HumanEval chat prompts, greedy generation of --tokens new tokens plain,
then with each drafter (sparse:S for every S, each also with a draft vocabulary sparse:S@N for every N of
--vocab, and lookup+sparse:S when --lookup); rounds interleave the drafters per prompt. Reports per
drafter: one draft step's cost relative to a dense step (median of one-token forwards, interleaved),
acceptance (accepted / drafted), tokens per verifying forward, end-to-end tokens/s relative to plain in
the same rounds, and whether every text equals the plain one (it must). Prints a markdown table and
writes JSON plus the table as .md next to it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import pipower  # noqa: E402
from pipower.benchmark import cpu_model, read_gbs  # noqa: E402
from pipower.eval.humaneval import chat_messages, load_problems  # noqa: E402


def run(model, ids, tokens, draft):
    t0 = time.perf_counter()
    out = model.generate_ids(ids, max_tokens=tokens, draft=draft)
    return out, time.perf_counter() - t0, model.last_stats


def step_costs(model, drafts: list[str], repeats: int) -> dict[str, float]:
    """Median time of a one-token draft forward per drafter over a dense one-token forward, the drafters
    and the dense step taking turns after a 128-token prefix (each on its own cache)."""
    from pipower.speculative import ModelDrafter, make_drafter
    runners = {"dense": ModelDrafter(model.transformer, None, "dense")}
    runners.update({d: make_drafter(model, d) for d in drafts})
    prefix = list(range(1000, 1128))
    for r in runners.values():
        if r.vocab is not None:
            r.vocab.cover(prefix)
        r._forward(prefix)
    times = {d: [] for d in runners}
    for i in range(repeats):
        for d, r in runners.items():
            t0 = time.perf_counter()
            r._forward([1000 + i])
            times[d].append(time.perf_counter() - t0)
    dense = statistics.median(times.pop("dense"))
    return {d: statistics.median(t) / dense for d, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="known model name or path")
    ap.add_argument("--problems", type=int, default=6, help="first N HumanEval problems (chat prompts)")
    ap.add_argument("--tokens", type=int, default=160, help="new tokens per generation")
    ap.add_argument("--sparsities", default="0.25,0.5,0.7,0.9", help="target sparsities of the self-drafts")
    ap.add_argument("--lookup", action="store_true", help="also lookup+sparse:S drafters")
    ap.add_argument("--vocab", default="", help="comma-separated draft vocabulary sizes N: also sparse:S@N")
    ap.add_argument("--step-repeats", type=int, default=40, help="one-token forwards timed per drafter")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write JSON here (and the table as .md next to it)")
    a = ap.parse_args(argv)
    m = pipower.load(a.model, threads=a.threads)
    drafts = [f"sparse:{s}" for s in a.sparsities.split(",")]
    drafts += [f"{d}@{n}" for n in a.vocab.split(",") if n for d in drafts]
    if a.lookup:
        drafts += ["lookup"] + [f"lookup+{d}" for d in drafts]
    for d in drafts:                                   # calibrate each threshold before timing
        m.generate_ids([1, 2, 3], max_tokens=2, draft=d)
    gbs = read_gbs(a.threads)
    costs = step_costs(m, [d for d in drafts if "+" not in d and d != "lookup"], a.step_repeats)
    per = {d: {"drafted": 0, "accepted": 0, "verifies": 0, "ratios": [], "identical": True} for d in drafts}
    for p in load_problems()[:a.problems]:
        tok = m.tokenizer
        ids = tok.encode(tok.apply_chat_template(chat_messages(p), add_generation_prompt=True), add_bos=None,
                         parse_special=True)
        want, t_plain, _ = run(m, ids, a.tokens, None)
        for d in drafts:
            got, t, st = run(m, ids, a.tokens, d)
            r = per[d]
            r["drafted"] += st.drafted
            r["accepted"] += st.accepted
            r["verifies"] += max(st.new_tokens - 1 - st.accepted, 0)   # one forward per non-drafted token
            r["tokens"] = r.get("tokens", 0) + max(st.new_tokens - 1, 0)
            r["ratios"].append(t_plain / t)
            r["identical"] &= got == want
        print(f"{p['task_id']} done", file=sys.stderr, flush=True)
    rows = []
    for d, r in per.items():
        rows.append(dict(draft=d, step_cost=costs.get(d), acceptance=r["accepted"] / r["drafted"] if r["drafted"] else 0.0,
                         tokens_per_verify=r["tokens"] / r["verifies"] if r["verifies"] else 0.0,
                         speed_vs_plain=statistics.median(r["ratios"]), identical=r["identical"],
                         drafted=r["drafted"], accepted=r["accepted"]))
    table = ["| draft | draft step / dense step | acceptance | tokens per verifying forward | "
             "end-to-end vs plain (median) | identical |", "|---|---|---|---|---|---|"]
    table += [f"| {r['draft']} | {'' if r['step_cost'] is None else format(r['step_cost'], '.2f')} | "
              f"{r['acceptance']:.2f} | {r['tokens_per_verify']:.2f} | {r['speed_vs_plain']:.2f} | "
              f"{r['identical']} |" for r in rows]
    text = "\n".join(table)
    print(text)
    if a.out:
        meta = dict(cpu=cpu_model(), read_gbs=gbs, model=str(m.source), weights=m.weights, threads=a.threads,
                    problems=a.problems, tokens=a.tokens, command=" ".join(sys.argv))
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        a.out.with_suffix(".md").write_text(f"CPU: {meta['cpu']}, memory read {gbs:.1f} GB/s, {a.threads} threads, "
                                            f"{m.weights}, first {a.problems} HumanEval chat prompts, {a.tokens} "
                                            f"new tokens\n\n`{meta['command']}`\n\n{text}\n")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
