"""What a forward over T new tokens costs, in decode steps: the batched-compute benchmark.

    python bench/batch.py --models qwen2.5-coder-0.5b --formats q8,q4 --tokens 1,2,4,8,16,32 \
        --threads 2 --repeats 7 --out bench/results/batch.json

After a fixed --prompt-tokens prompt, each round times one forward over T new tokens for every T in
--tokens (T = 1 is one decode step), rolling the KV cache back after each, so every call sees the same
cache length. Rounds interleave the T values, so a change of the machine's speed hits them alike; the
table gives medians over --repeats rounds and each T's time as a ratio to the T = 1 step of the same
rounds. Only `Transformer.forward` is timed (no tokenizer or sampling). Prints a markdown table and
writes JSON plus the table as .md next to it.

--llama Q8_0,Q4_0 adds llama.cpp (llama-cpp-python) as an anchor: the model's GGUF requantized to those
types (bench/decode.py's files under $PIPOWER_HOME/bench, made if missing), the same prompt length and
token counts, one llama_decode of T tokens with logits for every row (what verifying T drafted tokens
needs), its KV cache rolled back after each, rounds interleaved the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))       # bench/decode.py for the llama.cpp anchor

import pipower  # noqa: E402
from pipower.benchmark import cpu_model, read_gbs  # noqa: E402


def time_forwards(t, prompt_ids, new_ids, tokens, repeats) -> dict:
    """{T: [seconds of one T-token forward] per round} after the prompt; the cache is rolled back."""
    cache = t.new_cache(len(prompt_ids) + max(tokens) + 1)
    t.forward(prompt_ids, cache)
    base = cache.length
    times = {T: [] for T in tokens}
    for r in range(repeats + 1):                       # round 0 warms up and is dropped
        for T in tokens:
            t0 = time.perf_counter()
            t.forward(new_ids[:T], cache, last_only=False)
            dt = time.perf_counter() - t0
            cache.truncate(base)
            if r:
                times[T].append(dt)
    return times


def bench(model_name, fmt, threads, tokens, repeats, prompt_tokens) -> list[dict]:
    """fmt: a weight format, or "q4-float" for q4 on the float path (q4 defaults to integer dots)."""
    path = pipower.fetch(model_name, progress=False)
    weights, _, dot = fmt.partition("-")
    m = pipower.load(path, backend="cython", threads=threads, weights=weights, dot=dot or None)
    fmt = f"{weights}-{m.dot}" if weights in ("q4", "q8") else weights    # q4-int8, q8-float, ...
    prompt, new = forward_ids(m.config.vocab_size, prompt_tokens, tokens)
    times = time_forwards(m.transformer, prompt, new, tokens, repeats)
    return rows_of(model_name, fmt, threads, tokens, times)


def forward_ids(vocab_size: int, prompt_tokens: int, tokens) -> tuple:
    """The prompt's and the new tokens' ids, the same for every engine (their content does not change the
    cost)."""
    rng = np.random.default_rng(0)
    return (rng.integers(100, min(vocab_size, 30000), prompt_tokens),
            rng.integers(100, min(vocab_size, 30000), max(tokens)))


def time_llama_forwards(session, prompt_ids, new_ids, tokens, repeats) -> dict:
    """llama.cpp's {T: [seconds of one T-token llama_decode, logits for every row] per round}."""
    L = session.L
    L.llama_memory_clear(session.mem, True)
    session._decode([int(t) for t in prompt_ids])
    base = len(prompt_ids)
    times = {T: [] for T in tokens}
    for r in range(repeats + 1):                       # round 0 warms up and is dropped
        for T in tokens:
            batch = L.llama_batch_init(T, 0, 1)
            for i in range(T):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(new_ids[i]), base + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, 1
            batch.n_tokens = T
            t0 = time.perf_counter()
            rc = L.llama_decode(session.ctx, batch)
            dt = time.perf_counter() - t0
            L.llama_batch_free(batch)
            L.llama_memory_seq_rm(session.mem, 0, base, -1)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            if r:
                times[T].append(dt)
    return times


def rows_of(model_name, label, threads, tokens, times) -> list[dict]:
    step = statistics.median(times[1]) if 1 in times else None
    rows = []
    for T in tokens:
        med = statistics.median(times[T])
        # ratio per round (same round's T = 1 step), then the median: robust to a speed change mid-run
        ratios = [a / b for a, b in zip(times[T], times[1])] if 1 in times else []
        rows.append(dict(model=model_name, weights=label, threads=threads, T=T, ms=1e3 * med,
                         tok_per_s=T / med, vs_step=statistics.median(ratios) if ratios else None,
                         step_ms=None if step is None else 1e3 * step))
    return rows


def bench_llama(model_name, gguf_type, threads, tokens, repeats, prompt_tokens) -> list[dict]:
    from decode import LlamaCpp, default_requant_dir   # bench/decode.py: loading and requantizing
    llama = LlamaCpp()
    dst = llama.requantized(pipower.fetch(model_name, progress=False), default_requant_dir(), model_name,
                            gguf_type, threads)
    session = llama.open(dst, threads, prompt_tokens + max(tokens) + 16)
    try:
        prompt, new = forward_ids(session.n_vocab, prompt_tokens, tokens)
        times = time_llama_forwards(session, prompt, new, tokens, repeats)
    finally:
        session.close()
    return rows_of(model_name, f"llama.cpp {gguf_type}", threads, tokens, times)


def core_speeds(rounds: int = 3) -> dict:
    """{cpu: us} of one q4 [8 x 896] x [4864 x 896]^T panel GEMM from cache pinned to each CPU of this
    process (bench/core_speed.py's measure), medians of `rounds`; {} without the compiled kernels. On the
    shared VMs a core runs at full speed or ~1.5x slower, each on its own: a memory-bound one-token step
    hardly notices, a compute-bound 8-token forward does, so the T-cost column moves with this."""
    try:
        from core_speed import measure, timers
        one, team = timers(4864, 896, 8, "q4", 1, 10)
    except ImportError:
        return {}
    cpus = sorted(os.sched_getaffinity(0))
    rows = measure(one, team, cpus, rounds)
    return {c: 1e6 * statistics.median(r[c] for r in rows) for c in cpus}


def speeds_text(speeds: dict) -> str:
    return " / ".join(f"{us:.0f}" for us in speeds.values()) or "n/a"


def markdown(rows) -> str:
    out = ["| model | weights | T | forward ms | tokens/s | x one decode step |", "|---|---|---|---|---|---|"]
    for r in rows:
        vs = "" if r["vs_step"] is None else f"{r['vs_step']:.2f}"
        out.append(f"| {r['model']} | {r['weights']} | {r['T']} | {r['ms']:.1f} | {r['tok_per_s']:.1f} | {vs} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-coder-0.5b", help="comma-separated known model names")
    ap.add_argument("--formats", default="q8,q4", help="comma-separated weight formats (f32,f16,q8,q4; q4 runs "
                    "integer dots by default, q4-float the float path)")
    ap.add_argument("--tokens", default="1,2,4,8,16,32",
                    help="comma-separated T values (new tokens per forward); include 1 for the ratio column")
    ap.add_argument("--threads", type=int, default=2, help="OpenMP threads of the kernels")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (medians over them)")
    ap.add_argument("--prompt-tokens", type=int, default=120, help="tokens in the cache before each forward")
    ap.add_argument("--llama", default="", help="comma-separated GGUF types (Q8_0,Q4_0) to time llama.cpp on "
                    "as well, the model requantized to each ('' = none; needs llama-cpp-python)")
    ap.add_argument("--out", type=Path, help="write JSON here (and the table as .md next to it)")
    a = ap.parse_args(argv)
    tokens = [int(x) for x in a.tokens.split(",")]
    gbs = [read_gbs(a.threads)]
    cores = [core_speeds()]
    rows = []
    for name in a.models.split(","):
        for fmt in a.formats.split(","):
            rows += bench(name, fmt, a.threads, tokens, a.repeats, a.prompt_tokens)
            print(markdown(rows[-len(tokens):]), file=sys.stderr, flush=True)
        for gguf_type in filter(None, a.llama.split(",")):
            rows += bench_llama(name, gguf_type, a.threads, tokens, a.repeats, a.prompt_tokens)
            print(markdown(rows[-len(tokens):]), file=sys.stderr, flush=True)
    gbs.append(read_gbs(a.threads))
    cores.append(core_speeds())
    table = markdown(rows)
    cores_line = (f"one 8-token q4 4864x896 GEMM pinned to each core: {speeds_text(cores[0])} us at the start, "
                  f"{speeds_text(cores[1])} at the end")
    print(table)
    print(f"CPU: {cpu_model()}; memory read {gbs[0]:.1f} GB/s at the start, {gbs[1]:.1f} at the end; {cores_line}")
    if a.out:
        meta = dict(cpu=cpu_model(), read_gbs=gbs, core_us=[{str(c): us for c, us in s.items()} for s in cores],
                    threads=a.threads, repeats=a.repeats, prompt_tokens=a.prompt_tokens, command=" ".join(sys.argv))
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        a.out.with_suffix(".md").write_text(f"CPU: {meta['cpu']}, memory read {gbs[0]:.1f} / {gbs[1]:.1f} GB/s "
                                            f"(start / end), {cores_line}, {a.threads} threads, medians of "
                                            f"{a.repeats} rounds"
                                            f"\n\n`{meta['command']}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
