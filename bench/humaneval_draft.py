"""HumanEval chat generation end to end, plain vs speculative, interleaved per problem, with llama-cpp-python
plain and with its prompt lookup decoding (LlamaPromptLookupDecoding) as the anchor, all in one run.

    python bench/humaneval_draft.py --model qwen2.5-coder-1.5b --drafts lookup,lookup+model:qwen2.5-coder-0.5b \
        --llama-gguf ~/.cache/pipower/bench/qwen2.5-coder-1.5b.Q8_0.gguf --out bench/results/humaneval_draft_1.5b.jsonl

For every problem (chat prompt, greedy, --max-tokens new tokens) it times, one after another: pipower plain,
pipower with each drafter, then llama.cpp plain and llama.cpp with prompt lookup (when --llama-gguf is
given). Times are wall seconds of the whole generation (prefill + decode), so machine drift hits every
mode of a problem alike. Each problem's row is appended to the --out JSONL at once: rerunning resumes.
The summary (printed, and as .md next to the JSONL) gives per mode the total seconds, the ratio to plain,
how many completions equal plain's token for token (pipower's drafters must give 164/164) and the
acceptance. llama.cpp is run on the file given (e.g. the model requantized to Q8_0 by bench/decode.py),
with llama.cpp's own tokenizer on the same prompt text; its lookup column compares with its own plain run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import pipower  # noqa: E402  (first: its _cpu package sets the OpenMP wait policy before libgomp loads)
from pipower.benchmark import cpu_model, read_gbs  # noqa: E402
from pipower.eval.humaneval import chat_messages, load_problems  # noqa: E402


def pipower_run(model, ids, max_tokens, draft):
    t0 = time.perf_counter()
    out = model.generate_ids(ids, max_tokens=max_tokens, draft=draft)
    seconds = time.perf_counter() - t0
    st = model.last_stats
    return {"seconds": seconds, "tokens": out, "drafted": st.drafted, "accepted": st.accepted}


class LlamaAnchor:
    """llama-cpp-python's Llama, plain and with LlamaPromptLookupDecoding, greedy, fresh state per prompt."""

    def __init__(self, path: str, threads: int, n_ctx: int, lookup_tokens: int):
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        kw = dict(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.plain = Llama(**kw)
        self.lookup = Llama(**kw, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=lookup_tokens))

    def run(self, which: str, prompt: str, max_tokens: int) -> dict:
        llm = self.plain if which == "plain" else self.lookup
        llm.reset()                                   # no prompt-prefix reuse between problems
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        t0 = time.perf_counter()
        out = llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, top_k=1, top_p=1.0,
                                    repeat_penalty=1.0)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "text": out["choices"][0]["text"],
                "completion_tokens": out["usage"]["completion_tokens"]}


def ran(row: dict, mode: str) -> bool:
    """The mode ran on this problem and finished (an anchor run that raised is recorded with "error")."""
    return mode in row and "error" not in row[mode]


def summarize(rows: list[dict], modes: list[str]) -> list[dict]:
    """Per mode: seconds, ratio to pipower plain (llama modes: over the problems where both llama runs
    finished) and identical text; `failed` counts problems where the mode raised."""
    plain = sum(r["pipower plain"]["seconds"] for r in rows)
    out = []
    for mode in modes:
        if mode.startswith("llama"):
            both = [r for r in rows if ran(r, "llama plain") and ran(r, "llama lookup")]
        else:
            both = [r for r in rows if ran(r, mode)]
        runs = [r[mode] for r in both]
        if not runs:
            continue
        secs = sum(x["seconds"] for x in runs)
        row = {"mode": mode, "problems": len(runs), "seconds": round(secs, 1),
               "failed": sum(mode in r and "error" in r[mode] for r in rows)}
        if mode.startswith("pipower"):
            row["vs_plain"] = round(plain / secs, 3)
            row["identical"] = sum(r[mode]["tokens"] == r["pipower plain"]["tokens"] for r in rows if mode in r)
            d = sum(x.get("drafted", 0) for x in runs)
            a = sum(x.get("accepted", 0) for x in runs)
            row["acceptance"] = round(a / d, 3) if d else None
            row["new_tokens"] = sum(len(x["tokens"]) for x in runs)
        else:
            base = sum(r["llama plain"]["seconds"] for r in both)
            row["vs_llama_plain"] = round(base / secs, 3)
            row["vs_pipower_plain"] = round(sum(r["pipower plain"]["seconds"] for r in both) / secs, 3)
            row["identical_to_llama_plain"] = sum(r[mode]["text"] == r["llama plain"]["text"] for r in both)
            row["new_tokens"] = sum(x["completion_tokens"] for x in runs)
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="known model name or path (pipower)")
    ap.add_argument("--drafts", default="lookup", help="comma-separated pipower drafters (see --draft)")
    ap.add_argument("--problems", type=int, default=164, help="first N HumanEval problems")
    ap.add_argument("--max-tokens", type=int, default=384, help="new tokens at most per problem")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-gguf", help="GGUF for the llama-cpp-python anchor (none: no anchor)")
    ap.add_argument("--llama-problems", type=int, help="run the anchor on the first N problems only "
                    "(llama-cpp-python's Python sampling loop makes it the slow part of the run)")
    ap.add_argument("--llama-lookup-tokens", type=int, default=10, help="LlamaPromptLookupDecoding num_pred_tokens")
    ap.add_argument("--out", type=Path, required=True, help="JSONL of per-problem rows (resumed); .md summary")
    a = ap.parse_args(argv)
    model = pipower.load(a.model, threads=a.threads)
    drafts = [d for d in a.drafts.split(",") if d]
    modes = ["pipower plain"] + [f"pipower {d}" for d in drafts]
    anchor = None
    if a.llama_gguf:
        anchor = LlamaAnchor(a.llama_gguf, a.threads, 4096, a.llama_lookup_tokens)
        modes += ["llama plain", "llama lookup"]
    done = {}
    if a.out.exists():
        for line in a.out.read_text().splitlines():
            r = json.loads(line)
            done[r["task_id"]] = r
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tok = model.tokenizer
    with a.out.open("a") as f:
        for i, p in enumerate(load_problems()[:a.problems]):
            if p["task_id"] in done:
                continue
            prompt = tok.apply_chat_template(chat_messages(p), add_generation_prompt=True)
            ids = tok.encode(prompt, add_bos=None, parse_special=True)
            row = {"task_id": p["task_id"], "prompt_tokens": len(ids),
                   "pipower plain": pipower_run(model, ids, a.max_tokens, None)}
            for d in drafts:
                row[f"pipower {d}"] = pipower_run(model, ids, a.max_tokens, d)
            if anchor is not None and (a.llama_problems is None or i < a.llama_problems):
                for which in ("plain", "lookup"):
                    try:
                        row[f"llama {which}"] = anchor.run(which, prompt, a.max_tokens)
                    except Exception as e:       # noqa: BLE001 - the anchor's own bugs must not end the run
                        row[f"llama {which}"] = {"error": f"{type(e).__name__}: {e}"}
            f.write(json.dumps(row) + "\n")
            f.flush()
            done[p["task_id"]] = row
            print(f"[{i + 1}/{a.problems}] {p['task_id']}: " + ", ".join(
                f"{m} {row[m]['seconds']:.1f}s" if ran(row, m) else f"{m} failed" for m in modes if m in row),
                file=sys.stderr, flush=True)
    rows = [done[p["task_id"]] for p in load_problems()[:a.problems] if p["task_id"] in done]
    summary = summarize(rows, modes)
    meta = {"cpu": cpu_model(), "read_gbs": read_gbs(a.threads), "model": str(model.source),
            "weights": model.weights, "dot": model.dot, "threads": a.threads, "max_tokens": a.max_tokens,
            "llama_gguf": a.llama_gguf}
    lines = [f"HumanEval chat, greedy, {len(rows)} problems, max {a.max_tokens} new tokens; {meta['model']} "
             f"({meta['weights']}, {meta['dot']} dots), {a.threads} threads; CPU {meta['cpu']}, memory read "
             f"{meta['read_gbs']:.1f} GB/s (after the run); llama.cpp file: {a.llama_gguf or 'none'}", "",
             "| mode | seconds | vs pipower plain (same problems) | identical to plain | acceptance | new tokens |",
             "|---|---|---|---|---|---|"]
    for r in summary:
        if r["mode"].startswith("pipower"):
            lines.append(f"| {r['mode']} | {r['seconds']} | {r['vs_plain']:.2f}x | {r['identical']}/{r['problems']} | "
                         f"{r['acceptance'] if r['acceptance'] is not None else ''} | {r['new_tokens']} |")
        else:
            lines.append(f"| {r['mode']} | {r['seconds']} | {r['vs_pipower_plain']:.2f}x (vs llama plain "
                         f"{r['vs_llama_plain']:.2f}x) | {r['identical_to_llama_plain']}/{r['problems']} (to llama "
                         f"plain){'; failed on ' + str(r['failed']) if r['failed'] else ''} | | {r['new_tokens']} |")
    text = "\n".join(lines) + "\n"
    a.out.with_suffix(".md").write_text(text)
    a.out.with_suffix(".summary.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
