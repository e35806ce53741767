"""Two builds of one compiled kernel module, timed in one process and swapped round by round.

    python bench/ab_builds.py --module _panel --a /tmp/panel_old.so --b pipower/_cpu/_panel.*.so \
        --models qwen2.5-coder-0.5b --weights q8 --tokens 1,4,8 --rounds 15
    python bench/ab_builds.py --module _ffn --a /tmp/ffn_old.so --b pipower/_cpu/_ffn.*.so \
        --target-sparsity 0.25 --generate 48 --rounds 6

Why: these VMs' memory bandwidth flips between ~40 and ~80 GB/s from minute to minute, so two builds
timed in separate processes differ by the phase each ran in, often by more than the change being
measured. Here every round times build a, then build b, back to back, and the table gives the median of
the per-round ratios b / a.

How: each .so is copied into its own folder and loaded under the module's own name (a separate shared
library, so a separate module object); before each build's turn, every attribute of a loaded pipower
module that refers to the module is pointed at that build (pipower._cpu.linear_ops._ffn, ...). Keep a
copy of the old build before rebuilding (`cp pipower/_cpu/_ffn.*.so /tmp/ffn_old.so`). The two builds
must take the same arguments (a change of a Cython signature needs the rest of pipower rebuilt alike).

Timed: --tokens: one forward over T new tokens after a --prompt-tokens prompt, the KV cache rolled back
after each (as bench/batch.py); --generate N: a greedy generation of N tokens from a code prompt, its
decode tok/s (with --target-sparsity S, in oracle mode); --gemm ROWSxCOLS (module _panel): no model, the
median of --calls panel GEMMs of T tokens over a random matrix of that shape (--weights q4 / q8 / q4m).

    python bench/ab_builds.py --module _panel --a /tmp/panel_old.so --b pipower/_cpu/_panel.*.so \
        --gemm 4864x896 --tokens 1,8 --rounds 60
    (--matrices 48: 48 such matrices in turn, ~105 MB of q4: every call streams its matrix from DRAM)
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import pipower  # noqa: E402
import pipower._cpu  # noqa: E402

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def load_build(module: str, so_path: str, folder: Path):
    """The extension at so_path as a fresh module object named pipower._cpu.<module>."""
    src = Path(so_path)
    if not src.is_file():
        raise SystemExit(f"no such file: {so_path}")
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    shutil.copy(src, dst)
    name = f"pipower._cpu.{module}"
    loader = importlib.machinery.ExtensionFileLoader(name, str(dst))
    spec = importlib.util.spec_from_file_location(name, str(dst), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def references(original) -> list[tuple[object, str]]:
    """(module, attribute) of every loaded pipower module attribute that is `original`."""
    refs = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("pipower") and mod is not None:
            for attr, value in list(vars(mod).items()):
                if value is original:
                    refs.append((mod, attr))
    return refs


def use(refs, build) -> None:
    for mod, attr in refs:
        setattr(mod, attr, build)


def time_forwards(t, prompt, new, T) -> float:
    cache = t.new_cache(len(prompt) + T + 1)
    t.forward(prompt, cache)
    t0 = time.perf_counter()
    t.forward(new[:T], cache, last_only=False)
    return time.perf_counter() - t0


def random_panels(shape: str, fmt: str, count: int = 1, seed: int = 0) -> list:
    """count random panel matrices of shape "ROWSxCOLS" in fmt."""
    from pipower import panels, quant
    rows, cols = (int(v) for v in shape.lower().split("x"))
    rng = np.random.default_rng(seed)
    return [panels.pack(quant.quantize(rng.standard_normal((rows, cols)).astype(np.float32), fmt))
            for _ in range(count)]


def gemm_timer(build, shape: str, fmt: str, T: int, threads: int, calls: int, matrices: list | None = None):
    """A function () -> the median seconds of `calls` panel GEMMs of build (a _panel module): T random
    tokens against a random matrix of shape "ROWSxCOLS" in fmt, or against `matrices` (random_panels)
    in turn, one per call (more of them than the caches hold: every call streams its matrix from DRAM)."""
    mats = matrices or random_panels(shape, fmt)
    rows, cols = mats[0].shape
    rng = np.random.default_rng(1)
    xq = build.quantize(rng.standard_normal((T, cols)).astype(np.float32), fmt)
    out = np.empty((T, rows), dtype=np.float32)
    turn = [0]

    def timed() -> float:
        ts = []
        for _ in range(calls):
            p = mats[turn[0] % len(mats)]
            turn[0] += 1
            t0 = time.perf_counter()
            build.gemm_panels(fmt, p.data, p.scales, rows, xq, out=out, n_threads=threads, offsets=p.offsets)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    return timed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", required=True, help="the extension module's name in pipower._cpu (_ffn, _panel, "
                    "_linear, _attention, _kernels)")
    ap.add_argument("--a", required=True, help="build a's .so (the baseline)")
    ap.add_argument("--b", required=True, help="build b's .so")
    ap.add_argument("--models", default="qwen2.5-coder-0.5b", help="a known model name or a path")
    ap.add_argument("--weights", default=None, help="weight format (default: pipower.load's)")
    ap.add_argument("--threads", type=int, default=2, help="kernel threads")
    ap.add_argument("--tokens", default="1,8", help="comma-separated T: time one T-token forward each")
    ap.add_argument("--prompt-tokens", type=int, default=120, help="tokens in the cache before each forward")
    ap.add_argument("--generate", type=int, default=0, help="instead of forwards: a greedy generation of this "
                    "many tokens, its decode tok/s")
    ap.add_argument("--target-sparsity", type=float, default=None, help="with --generate: oracle mode at this "
                    "target (the fused threshold FFN)")
    ap.add_argument("--gemm", default=None, metavar="ROWSxCOLS", help="(module _panel) instead of a model: "
                    "panel GEMMs of each --tokens T over a random matrix of this shape, format --weights (q4)")
    ap.add_argument("--calls", type=int, default=20, help="with --gemm: calls per round, their median counts")
    ap.add_argument("--matrices", type=int, default=1, help="with --gemm: this many random matrices, one per "
                    "call in turn (1: the same matrix, cache-resident; enough to exceed the caches: from DRAM)")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds (one more warms up)")
    a = ap.parse_args(argv)
    if a.gemm:
        return gemm_main(a)
    original = getattr(pipower._cpu, a.module, None)
    if original is None:
        __import__(f"pipower._cpu.{a.module}")
        original = sys.modules[f"pipower._cpu.{a.module}"]
    m = pipower.load(a.models, weights=a.weights, threads=a.threads, progress=False)
    if a.target_sparsity is not None:
        m.set_sparsity(target_sparsity=a.target_sparsity)
    refs = references(original)
    with tempfile.TemporaryDirectory() as tmp:
        builds = {"a": load_build(a.module, a.a, Path(tmp) / "a"), "b": load_build(a.module, a.b, Path(tmp) / "b")}
        rng = np.random.default_rng(0)
        V = m.config.vocab_size
        prompt = rng.integers(100, min(V, 30000), a.prompt_tokens)
        tokens = [int(x) for x in a.tokens.split(",")]
        new = rng.integers(100, min(V, 30000), max(tokens))
        cases = [f"generate {a.generate}"] if a.generate else [f"T={T}" for T in tokens]
        times = {(k, c): [] for k in builds for c in cases}
        try:
            for r in range(a.rounds + 1):
                for k, build in builds.items():
                    use(refs, build)
                    for c in cases:
                        if a.generate:
                            m.generate(PROMPT, max_tokens=a.generate, temperature=0)
                            value = 1.0 / m.last_stats.decode_tokens_per_second      # seconds per token
                        else:
                            value = time_forwards(m.transformer, prompt, new, int(c[2:]))
                        if r:
                            times[(k, c)].append(value)
        finally:
            use(refs, original)
    print(ratio_table("ms per decode token" if a.generate else "ms per forward", cases, times, 1e3, 2))
    print(f"module {a.module}; a = {a.a}; b = {a.b}; {a.rounds} rounds; model {a.models}"
          f"{'' if a.target_sparsity is None else f', target sparsity {a.target_sparsity}'}")
    return 0


def ratio_table(unit: str, cases: list, times: dict, scale: float, digits: int) -> str:
    """The markdown table: per case, each build's median (seconds x scale, in `unit`) and the median of
    the per-round ratios b / a. times: {("a" or "b", case): [seconds per round]}."""
    lines = [f"| case | a ({unit}) | b | b / a (median per round) |", "|---|---|---|---|"]
    for c in cases:
        ta, tb = times[("a", c)], times[("b", c)]
        ratio = statistics.median(y / x for x, y in zip(ta, tb))
        lines.append(f"| {c} | {scale * statistics.median(ta):.{digits}f} | {scale * statistics.median(tb):.{digits}f} "
                     f"| {ratio:.3f} |")
    return "\n".join(lines)


def gemm_main(a) -> int:
    """--gemm: the two builds' panel GEMMs, round by round (no model, nothing to swap)."""
    if a.module != "_panel":
        raise SystemExit("--gemm times the _panel module's gemm_panels: use --module _panel")
    fmt = a.weights or "q4"
    tokens = [int(x) for x in a.tokens.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        builds = {"a": load_build(a.module, a.a, Path(tmp) / "a"), "b": load_build(a.module, a.b, Path(tmp) / "b")}
        mats = random_panels(a.gemm, fmt, a.matrices)
        timers = {(k, T): gemm_timer(b, a.gemm, fmt, T, a.threads, a.calls, mats)
                  for k, b in builds.items() for T in tokens}
        times = {key: [] for key in timers}
        for r in range(a.rounds + 1):
            for key, timed in timers.items():
                value = timed()
                if r:
                    times[key].append(value)
    print(ratio_table("us per GEMM", [f"T={T}" for T in tokens],
                      {(k, f"T={T}"): v for (k, T), v in times.items()}, 1e6, 1))
    print(f"module _panel; a = {a.a}; b = {a.b}; {a.rounds} rounds of {a.calls} calls; {fmt} {a.gemm}"
          f"{f' x {a.matrices} matrices in turn' if a.matrices > 1 else ''}, {a.threads} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
