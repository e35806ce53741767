"""Speculative decoding: the same greedy text, fewer model steps when a drafter guesses right.

A drafter proposes the next few tokens and the model checks them all in one batched forward. "lookup"
(prompt lookup) proposes what followed the latest earlier occurrence of the last few tokens, so it pays
off when the output repeats the prompt (code edits, boilerplate). Greedy text is token for token the
plain greedy text; only the speed changes.

    python examples/speculative.py
    python examples/speculative.py -m path/to/model.gguf --draft lookup+sparse:0.5
"""
import argparse
import sys
import time

import pipower

PROMPT = '''class Vector:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __add__(self, other):
        return Vector(self.x + other.x, self.y + other.y)

    def __sub__(self, other):
        return Vector(self.x - other.x, self.y - other.y)

    def __mul__(self, k):
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b",
                    help="GGUF file, Hugging Face model directory or known model name (default: qwen2.5-coder-0.5b)")
    ap.add_argument("-n", "--max-tokens", type=int, default=96, help="new tokens (default: 96)")
    ap.add_argument("--draft", default="lookup",
                    help="drafter: lookup, sparse:S, act:TAU, pred:FILE[:TAU] or several joined by '+' "
                         "(default: lookup)")
    args = ap.parse_args()
    try:
        return run(pipower.load(args.model), args)
    except pipower.PipowerError as e:            # every error pipower raises on purpose derives from this
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(model, args) -> int:
    model.generate(PROMPT, max_tokens=1)          # warm-up, so neither timing pays for first-call set-up
    t0 = time.perf_counter()
    plain = model.generate(PROMPT, max_tokens=args.max_tokens)
    t_plain = time.perf_counter() - t0
    n_plain = model.last_stats.new_tokens

    t0 = time.perf_counter()
    fast = model.generate(PROMPT, max_tokens=args.max_tokens, draft=args.draft)
    t_fast = time.perf_counter() - t0
    st = model.last_stats              # drafted / accepted count the drafter's proposals and the model's keeps

    print(PROMPT + fast)
    print("---")
    print(f"plain:       {n_plain} tokens in {t_plain:.2f} s ({n_plain / t_plain:.1f} tok/s)")
    print(f"draft {args.draft}: {st.new_tokens} tokens in {t_fast:.2f} s ({st.new_tokens / t_fast:.1f} tok/s)")
    print(f"drafted {st.drafted}, accepted {st.accepted}, draft_acceptance {st.draft_acceptance:.2f}")
    print(f"identical text: {fast == plain}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
