"""Where a forward's time goes: per-op timers around the backend's ops, for T-token forwards.

    python bench/ops_profile.py --models qwen2.5-coder-0.5b --weights q4 --tokens 1,4,8 --rounds 7

After a --prompt-tokens prompt, each round times one forward over T new tokens for every T in --tokens
(the KV cache rolled back after each, as bench/batch.py), with each op of the model's ops object
(rms_norm, rope, attention, linear, linear_many, ffn, ...) wrapped in a timer. The table gives, per T,
the medians over the rounds of the whole forward and of each op's summed time in it, in ms; "rest" is
the forward minus the ops (the Python between them, the embedding lookup). A timer costs ~1 us per
call, a few hundred calls per forward.

Why: kernel changes are judged by in-process A/B (bench/ab_builds.py); this says which op is worth a
change in the first place (docs/dev/PERF_NOTES.md sections 11, 12 and 15 used hand-written copies).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))       # bench/batch.py: the same token ids

import pipower  # noqa: E402
from batch import forward_ids  # noqa: E402

# The ops a forward calls, in the table's column order; ops a backend lacks are left out.
OPS = ("rms_norm", "linear_many", "rope", "attention", "linear", "ffn", "activation")


def wrap_ops(ops, spent: dict) -> list:
    """Replace each op in OPS on the instance `ops` by a timer adding its seconds to spent[name].
    Returns the names wrapped (undo: delete those instance attributes)."""
    names = []
    for name in OPS:
        fn = getattr(ops, name, None)
        if fn is None:
            continue

        def timed(*args, _fn=fn, _name=name, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kw)
            finally:
                spent[_name] += time.perf_counter() - t0
        setattr(ops, name, timed)
        names.append(name)
    return names


def profile(transformer, prompt_ids, new_ids, tokens, rounds) -> dict:
    """{T: {"total" or op name: [seconds per forward, one per timed round]}}; round 0 warms up."""
    spent = defaultdict(float)
    names = wrap_ops(transformer.ops, spent)
    try:
        cache = transformer.new_cache(len(prompt_ids) + max(tokens) + 1)
        transformer.forward(prompt_ids, cache)
        base = cache.length
        out = {T: defaultdict(list) for T in tokens}
        for r in range(rounds + 1):
            for T in tokens:
                spent.clear()
                t0 = time.perf_counter()
                transformer.forward(new_ids[:T], cache, last_only=False)
                total = time.perf_counter() - t0
                cache.truncate(base)
                if r:
                    out[T]["total"].append(total)
                    for n in names:
                        out[T][n].append(spent[n])
                    out[T]["rest"].append(total - sum(spent[n] for n in names))
    finally:
        for n in names:
            delattr(transformer.ops, n)
    return out


def markdown(label: str, times: dict) -> str:
    cols = [c for c in ("total", *OPS, "rest") if any(c in v for v in times.values())]
    lines = [f"| {label}, T | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for T, per in times.items():
        lines.append(f"| {T} | " + " | ".join(f"{statistics.median(per[c]) * 1e3:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-coder-0.5b", help="a known model name or a GGUF path")
    ap.add_argument("--weights", default=None, help="weight format (default: pipower.load's)")
    ap.add_argument("--backend", default="auto", help="pipower.load's backend")
    ap.add_argument("--threads", type=int, default=2, help="kernel threads")
    ap.add_argument("--tokens", default="1,4,8", help="comma-separated T: one T-token forward each")
    ap.add_argument("--prompt-tokens", type=int, default=120, help="tokens in the cache before each forward")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (one more warms up)")
    a = ap.parse_args(argv)
    tokens = [int(x) for x in a.tokens.split(",")]
    m = pipower.load(a.models, backend=a.backend, weights=a.weights, threads=a.threads, progress=False)
    prompt, new = forward_ids(m.config.vocab_size, a.prompt_tokens, tokens)     # bench/batch.py's ids
    times = profile(m.transformer, prompt, new, tokens, a.rounds)
    print(markdown(f"{Path(a.models).name} {m.transformer.ops.name}", times))
    print(f"\nms per forward, medians of {a.rounds} rounds, {a.threads} threads, after a {a.prompt_tokens}-token "
          f"prompt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
