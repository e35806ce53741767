"""Whether this machine's cores run at one speed: one compute-bound GEMM timed on each core in turn, then
on one thread against the whole team, round after round.

    python bench/core_speed.py --rounds 30            # q4 4864x896 panels, 8 tokens (an 8-token FFN's up)

Why: on the shared VMs this project runs on, each core flips between full speed and ~1.55x slower within
tens of milliseconds (a neighbour on its host sibling, seen in session 20), so a kernel that gives each
thread a fixed half waits for the slower one, and two-thread timings move with the neighbour. The
per-core columns show the flips; the last column is what a team of threads makes of them (the panel
GEMM's threads claim work as they go, pipower/_cpu/_panel_impl.h: pp_panel_queue).

Each round: the GEMM's median time over --calls calls pinned to each CPU of this process's affinity in
turn (one thread), then unpinned on one thread and on --threads threads; medians over the rounds at the
end. The weights are random q4 panels (no model needed), small enough to stay in L2/L3: compute, not
memory, is timed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))       # bench/ab_builds.py: the same GEMM timer

from ab_builds import gemm_timer  # noqa: E402

from pipower.panels import FORMATS  # noqa: E402


def timers(rows: int, cols: int, tokens: int, fmt: str, threads: int, calls: int) -> tuple:
    """(one thread, `threads` threads): functions () -> the median seconds of `calls` panel GEMMs of
    `tokens` random tokens over a random [rows, cols] matrix (bench/ab_builds.py's --gemm timer)."""
    from pipower._cpu import _panel
    shape = f"{rows}x{cols}"
    return (gemm_timer(_panel, shape, fmt, tokens, 1, calls), gemm_timer(_panel, shape, fmt, tokens, threads, calls))


def measure(one, team, cpus: list, rounds: int) -> list:
    """One dict per round: {cpu: seconds of one() pinned there, "one": one() unpinned, "team": team()}."""
    home = os.sched_getaffinity(0)
    out = []
    try:
        for _ in range(rounds):
            row = {}
            for c in cpus:
                os.sched_setaffinity(0, {c})
                row[c] = one()
            os.sched_setaffinity(0, home)
            row["one"] = one()
            row["team"] = team()
            out.append(row)
    finally:
        os.sched_setaffinity(0, home)
    return out


def markdown(rows: list, cpus: list, threads: int) -> str:
    head = [f"cpu {c}" for c in cpus] + ["1 thread", f"{threads} threads", "speed-up"]
    lines = ["| round | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]

    def cells(r):
        return [f"{r[c] * 1e6:.0f}" for c in cpus] + [f"{r['one'] * 1e6:.0f}", f"{r['team'] * 1e6:.0f}",
                                                      f"{r['one'] / r['team']:.2f}"]
    for i, r in enumerate(rows):
        lines.append(f"| {i} | " + " | ".join(cells(r)) + " |")
    med = {k: statistics.median(r[k] for r in rows) for k in (*cpus, "one", "team")}
    speedup = statistics.median(r["one"] / r["team"] for r in rows)
    lines.append("| median | " + " | ".join(cells(med)[:-1]) + f" | {speedup:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4864, help="weight rows (default: Qwen2.5-0.5B's FFN width)")
    ap.add_argument("--cols", type=int, default=896, help="weight columns, a multiple of 32")
    ap.add_argument("--tokens", type=int, default=8, help="tokens per GEMM")
    ap.add_argument("--format", default="q4", choices=FORMATS, help="weight format")
    ap.add_argument("--threads", type=int, default=2, help="threads of the team column")
    ap.add_argument("--rounds", type=int, default=20, help="rounds (each times every column)")
    ap.add_argument("--calls", type=int, default=30, help="calls per cell (their median is the cell)")
    a = ap.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    rows = measure(*timers(a.rows, a.cols, a.tokens, a.format, a.threads, a.calls), cpus, a.rounds)
    print(markdown(rows, cpus, a.threads))
    print(f"\nus per {a.format} GEMM [{a.tokens} x {a.cols}] x [{a.rows} x {a.cols}]^T, medians of {a.calls} calls "
          f"per cell; speed-up = 1 thread / {a.threads} threads per round")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
