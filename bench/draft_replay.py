"""Replay the speculative draft policy on stored greedy generations: modeled speed of prompt lookup.

    python bench/draft_replay.py --results bench/results/humaneval_draft_1.5b.jsonl \
        --model qwen2.5-coder-1.5b --ngrams 3,8 --curve 2:1.18,4:1.27,8:1.39,16:2.25

For every problem of a bench/humaneval_draft.py results file it walks the plain greedy tokens as the
model would emit them under speculative decoding: each round `propose_round` (the library's policy)
drafts from prompt + emitted tokens, the drafts are checked against the stored tokens (greedy output
does not depend on drafting, so the stored stream is the truth), and the round costs what a forward of
that size costs by --curve (in decode steps; sizes between the points interpolated, 1 token = 1 step).
No model runs, so a policy change is measured over all 164 problems in seconds; the prompt ids come
from the model's tokenizer and chat template, as humaneval_draft.py builds them.

Policies: "curve" prices a verify forward by the cost curve, as pipower does (VerifyCost, calibrated);
"line" prices it by one per-token cost fitted to the forwards seen so far, as pipower did before
(kept here to show what the curve buys). Reported per policy and longest n-gram: modeled speed-up over
plain decoding (decode time only; prefill is the same in both), acceptance (accepted / drafted),
tokens per verifying forward and drafts per forward.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import pipower  # noqa: E402
from pipower import speculative as spec  # noqa: E402
from pipower.eval.humaneval import chat_messages, load_problems  # noqa: E402


def cost_curve(text: str):
    """"2:1.18,4:1.27" -> steps(T) for T >= 1, linear between the points (and past the last one on its
    line from T = 1)."""
    points = {1: 1.0}
    for part in text.split(","):
        T, c = part.split(":")
        points[int(T)] = float(c)
    sizes = sorted(points)

    def steps(T: int) -> float:
        if T in points:
            return points[T]
        lo = max(n for n in sizes if n < T)
        hi = min((n for n in sizes if n > T), default=None)
        if hi is None:
            return points[lo] + (points[lo] - 1.0) / max(lo - 1, 1) * (T - lo)
        return points[lo] + (points[hi] - points[lo]) * (T - lo) / (hi - lo)
    return steps


class LinePrice:
    """One cost per extra verified token, a running mean over the forwards seen (the policy's price
    before the cost curve): 1 + c k steps for k drafts."""

    def __init__(self, prior: float = spec.VERIFY_COST, weight: float = 0.2):
        self.prior, self.weight = prior, weight
        self.step = self.extra = None

    def add(self, tokens: int, seconds: float) -> None:
        if tokens == 1:
            self.step = seconds if self.step is None else self.step + self.weight * (seconds - self.step)
        elif self.step is not None:
            per = max(0.0, seconds - self.step) / (tokens - 1)
            self.extra = per if self.extra is None else self.extra + self.weight * (per - self.extra)

    def forward_steps(self, drafts: int) -> float:
        ratio = self.prior if self.step is None or self.extra is None else \
            min(2.0, max(0.02, self.extra / self.step))
        return 1.0 + ratio * drafts


def calibrated(steps) -> spec.VerifyCost:
    """A VerifyCost holding the curve at the sizes pipower calibrates (as calibrate_verify_cost would)."""
    cost = spec.VerifyCost()
    cost.add(1, 1.0)
    for T in spec.CALIBRATION_TOKENS:
        cost.add(T, steps(T))
    return cost


def replay(prompt: list[int], tokens: list[int], drafter, cost, steps, max_tokens: int) -> tuple:
    """-> (modeled steps, plain steps, drafted, accepted, forwards) for one generation."""
    records: dict = {}
    context = list(prompt) + [tokens[0]]          # the first token comes from the prefill
    i, spent, drafted, accepted, forwards = 1, 0.0, 0, 0, 0
    while i < len(tokens):
        drafts, _, used = spec.propose_round(drafter, np.asarray(context, dtype=np.int64), max_tokens - i,
                                             None, records, cost)
        n = 0
        while n < len(drafts) and i + n < len(tokens) and drafts[n] == tokens[i + n]:
            n += 1
        c = steps(1 + len(drafts))
        cost.add(1 + len(drafts), c)               # seconds = steps: a step costs 1
        spent, drafted, accepted, forwards = spent + c, drafted + len(drafts), accepted + n, forwards + 1
        for key, rec in records.items():
            if key == used:
                rec.add(len(drafts), n)
            else:
                rec.idle()
        context += tokens[i:i + n + 1]
        i += n + 1
    return spent, len(tokens) - 1, drafted, accepted, forwards


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True, help="a bench/humaneval_draft.py JSONL")
    ap.add_argument("--model", required=True, help="the model of those results (its tokenizer)")
    ap.add_argument("--ngrams", default="3,8", help="longest lookup n-grams to compare")
    ap.add_argument("--curve", required=True, help="verify cost in steps, T:steps,... (bench/batch.py's "
                    "'x one decode step' column, or pipower's calibration log line)")
    ap.add_argument("--max-tokens", type=int, default=384)
    a = ap.parse_args(argv)
    rows = [json.loads(line) for line in a.results.read_text().splitlines() if line.strip()]
    tok = pipower.load(a.model).tokenizer
    prompts = {}
    for p in load_problems():
        text = tok.apply_chat_template(chat_messages(p), add_generation_prompt=True)
        prompts[p["task_id"]] = tok.encode(text, add_bos=None, parse_special=True)
    steps = cost_curve(a.curve)
    print(f"{len(rows)} problems of {a.results}; verify cost curve {a.curve}")
    print("| policy | longest n-gram | modeled speed-up | acceptance | tokens / forward | drafts / forward |")
    print("|---|---|---|---|---|---|")
    for policy, make_cost in (("line", LinePrice), ("curve", lambda: calibrated(steps))):
        for n in (int(x) for x in a.ngrams.split(",")):
            spent = plain = drafted = accepted = forwards = 0
            for row in rows:
                tokens = row["pipower plain"]["tokens"]
                if len(tokens) < 2:
                    continue
                s, p, d, acc, f = replay(prompts[row["task_id"]], tokens, spec.LookupDrafter(n), make_cost(),
                                         steps, a.max_tokens)
                spent, plain, drafted, accepted, forwards = (spent + s, plain + p, drafted + d,
                                                             accepted + acc, forwards + f)
            print(f"| {policy} | {n} | {plain / spent:.2f}x | {accepted / max(drafted, 1):.3f} | "
                  f"{plain / forwards:.2f} | {drafted / forwards:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
