"""Start-up: load a GGUF and generate one token, pipower against llama.cpp, in one run.

    python bench/startup.py --model qwen2.5-coder-0.5b --llama-simple PATH/llama-simple \
        --repeats 7 --out bench/results/startup.json

Each round runs, as fresh processes one after the other:
  pipower warm   `python -m pipower generate -n 1 -t THREADS PROMPT` (the prepared-model cache is filled by
                 an untimed run first);
  llama.cpp      `llama-simple -m GGUF -n 1 PROMPT` (llama.cpp's minimal load-and-generate example; skipped
                 without --llama-simple);
  pipower first  the same pipower command with --no-cache (every load converts the GGUF), with --cold.
Wall time and peak resident memory (the child's ru_maxrss, from wait4) per run; the table gives medians
over --repeats rounds, each time as a ratio to llama.cpp's of the same rounds, and the peak RSS as a
ratio to the prepared model's bytes (its cache file). Both sides read the GGUF from the page cache
(a first untimed run of each warms it), so this is load and conversion work, not disk speed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import pipower  # noqa: E402
from pipower.benchmark import cpu_model  # noqa: E402


def run_once(cmd: list[str], env: dict) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process; fails loudly if it fails."""
    with tempfile.TemporaryFile() as err:          # a file, not a pipe: llama.cpp logs more than a pipe holds
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        dt = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{err.read()[-2000:].decode(errors='replace')}")
    return dt, usage.ru_maxrss * 1024


def prepared_bytes(gguf: Path, weights: str | None) -> int | None:
    """Bytes of the prepared model the timed `pipower generate` reads: the data blobs of its cache file
    (the one its load keys: source, weight format, layout and dot mode, as pipower.load computes them),
    not the file's size, whose 2 MiB alignment padding is holes on disk. None without the file."""
    from pipower import model_cache
    from pipower.api import check_dot, default_weights
    from pipower.backend import make_ops
    ops = make_ops("auto", 1)
    weights = weights or default_weights(str(gguf), ops)
    ops.dot = check_dot(None, weights)
    path = model_cache.cache_path(model_cache.cache_key(gguf, weights, ops))
    if not path.is_file():
        return None
    return sum(b["nbytes"] for b in model_cache.read_header(path).json["blobs"])


def shown_args(argv: list[str], args) -> str:
    """The command line as the table shows it: the llama.cpp binary's folder is this machine's business."""
    return " ".join("PATH/llama-simple" if a == args.llama_simple else a for a in argv)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="a known model name or a GGUF path")
    ap.add_argument("--weights", default=None, help="pipower weight format (default: the loader's default)")
    ap.add_argument("--threads", type=int, default=2, help="pipower threads (-t)")
    ap.add_argument("--prompt", default="hi", help="the prompt both sides get")
    ap.add_argument("--llama-simple", default=None, help="path to llama.cpp's llama-simple binary")
    ap.add_argument("--cold", action="store_true", help="also time pipower without the prepared-model cache")
    ap.add_argument("--repeats", type=int, default=7, help="rounds (medians over them)")
    ap.add_argument("--out", default=None, help="write JSON here and the table as .md next to it")
    args = ap.parse_args(argv)

    gguf = Path(pipower.fetch(args.model, progress=False)) if not Path(args.model).exists() else Path(args.model)
    # the children import the pipower this script imported (a checkout's or the installed one)
    home = str(Path(pipower.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": home + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base = [sys.executable, "-m", "pipower", "generate", "-m", str(gguf), "-n", "1", "-t", str(args.threads)]
    if args.weights:
        base += ["--weights", args.weights]
    sides = {"pipower warm": base + [args.prompt]}
    if args.llama_simple:
        sides["llama.cpp"] = [args.llama_simple, "-m", str(gguf), "-n", "1", args.prompt]
    if args.cold:
        sides["pipower first"] = base + ["--no-cache", args.prompt]
    load_before = os.getloadavg()[0]
    for cmd in sides.values():              # fill the cache, warm the page cache; untimed
        run_once(cmd, env)
    runs = {name: [] for name in sides}
    for r in range(args.repeats):
        for name, cmd in sides.items():
            runs[name].append(run_once(cmd, env))
            print(f"round {r + 1}/{args.repeats} {name}: {runs[name][-1][0]:.2f} s", file=sys.stderr)
    load_after = os.getloadavg()[0]
    prep = prepared_bytes(gguf, args.weights)
    ref = statistics.median(t for t, _ in runs["llama.cpp"]) if "llama.cpp" in runs else None
    rows = []
    for name, rs in runs.items():
        t = statistics.median(x for x, _ in rs)
        rss = max(m for _, m in rs)
        rows.append({"side": name, "seconds": t, "x_llama": t / ref if ref else None, "peak_rss": rss,
                     "rss_x_prepared": rss / prep if prep and name.startswith("pipower") else None})
    lines = [f"CPU: {cpu_model()}, {args.threads} pipower threads, medians of {args.repeats} rounds; "
             f"GGUF {gguf.name}" + (f"; prepared model {prep / 1e6:.0f} MB" if prep else "")
             + f"; load average {load_before:.1f} / {load_after:.1f} (start / end)",
             "", f"`python bench/startup.py {shown_args(argv if argv is not None else sys.argv[1:], args)}`", "",
             "| side | load + 1 token, s | x llama.cpp | peak RSS, MB | RSS x prepared model |",
             "|---|---|---|---|---|"]
    for row in rows:
        x = f"{row['x_llama']:.2f}" if row["x_llama"] else "-"
        rx = f"{row['rss_x_prepared']:.2f}" if row["rss_x_prepared"] else "-"
        lines.append(f"| {row['side']} | {row['seconds']:.2f} | {x} | {row['peak_rss'] / 1e6:.0f} | {rx} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"cpu": cpu_model(), "gguf": gguf.name, "prepared_bytes": prep,
                                   "load_average": [load_before, load_after],
                                   "rows": rows, "runs": runs}, indent=1))
        out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
