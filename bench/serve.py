"""`pipower serve` under concurrent clients: aggregate tokens/s and latency at 1, 2, 4 and 8 clients.

    python bench/serve.py --model qwen2.5-coder-0.5b --threads 2 --clients 1,2,4,8 --requests 4 \
        --max-tokens 64 --rounds 2 --out bench/results/serve.json

Starts `python -m pipower serve` on 127.0.0.1 (an ephemeral port; or use --url for a server that is
already running) and, for each client count C, runs C client threads that each send --requests streaming
/v1/completions requests one after the other (greedy, --max-tokens new tokens, code prompts of a few
dozen tokens). Rounds repeat the levels in order (1, 2, 4, 8, 1, 2, ...) so a change of the machine's
speed hits every level; the table gives, per level, the median over rounds of

  agg tok/s    completion tokens of all the level's requests / the level's wall time
  vs 1         that, over the 1-client figure of the same round (the issue's target: >= 2.5 at 4 clients,
               >= 3.5 at 8)
  p50/p95 s    request latency (send to last byte) over all the level's requests
  TTFT p50 s   time to the first text chunk
  mean batch   sequences per batched decode step while the level ran (from /health)
  tok/CPU s    completion tokens per CPU second the server process used (Linux, a server this script
               started): less sensitive than wall time to other programs taking the cores, and its ratio
               to 1 client ("CPU vs 1") tells what batching saves when the machine is shared

Prints a markdown table and writes JSON plus the table as .md next to it. Only loopback addresses.
"""
from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = [
    'def is_prime(n: int) -> bool:\n    """Return True if n is a prime number."""\n',
    'def fibonacci(n):\n    """Return the n-th Fibonacci number, fibonacci(0) == 0."""\n',
    'def reverse_words(s: str) -> str:\n    """Reverse the order of the words in s."""\n',
    'def flatten(xs):\n    """Flatten a nested list of lists into one list."""\n',
    'def count_vowels(text):\n    """Count the vowels (a, e, i, o, u) in text, ignoring case."""\n',
    'def merge_sorted(a, b):\n    """Merge two sorted lists into one sorted list."""\n',
    'def gcd(a: int, b: int) -> int:\n    """Greatest common divisor of a and b."""\n',
    'def is_palindrome(s):\n    """True if s reads the same forwards and backwards, ignoring spaces."""\n',
    'def word_count(text):\n    """Return a dict mapping each word of text to its count."""\n',
    'def transpose(matrix):\n    """Transpose a matrix given as a list of rows."""\n',
    'def binary_search(xs, target):\n    """Index of target in the sorted list xs, or -1."""\n',
    'def chunks(xs, n):\n    """Split xs into consecutive lists of length n (the last may be shorter)."""\n',
    'def celsius_to_fahrenheit(c):\n    """Convert a temperature from Celsius to Fahrenheit."""\n',
    'def unique(xs):\n    """The elements of xs without duplicates, in first-seen order."""\n',
    'def factorial(n):\n    """n! for n >= 0, computed iteratively."""\n',
    'def rle(s):\n    """Run-length encode s: "aaab" -> [("a", 3), ("b", 1)]."""\n',
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Server:
    def __init__(self, model, threads, weights, max_batch, extra):
        cmd = [sys.executable, "-m", "pipower", "serve", "-m", model, "--host", "127.0.0.1", "--port", "0",
               "-t", str(threads), "--max-batch", str(max_batch), "--model-name", "bench", *extra]
        if weights:
            cmd += ["--weights", weights]
        log("starting:", " ".join(cmd))
        # the pipower this script would import: an installed one, else this checkout's
        spec = importlib.util.find_spec("pipower")
        pkg_parent = str(Path(spec.origin).parent.parent) if spec and spec.origin else str(ROOT)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [pkg_parent] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
        self.proc = subprocess.Popen(cmd, cwd=tempfile.gettempdir(), env=env, stdin=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.url, self.banner = None, ""
        deadline = time.monotonic() + 600
        for line in self.proc.stderr:
            log("  server:", line.rstrip())
            m = re.search(r"on (http://127\.0\.0\.1:\d+)$", line.strip())
            if m:
                self.url, self.banner = m.group(1), line.strip()
                break
            if time.monotonic() > deadline:
                break
        if self.url is None:
            self.proc.kill()
            raise SystemExit("the server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stop(self):
        self.proc.terminate()
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(30)


def request(url: str, prompt: str, max_tokens: int, api_key: str | None) -> dict:
    """One streaming completion -> {latency, ttft, tokens, finish}."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers=headers)
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    ttft, tokens, finish = None, 0, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            break
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(event["error"]["message"])
        if event.get("choices"):
            c = event["choices"][0]
            if c["text"] and ttft is None:
                ttft = time.perf_counter() - t0
            finish = c["finish_reason"] or finish
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    conn.close()
    return {"latency": latency, "ttft": ttft if ttft is not None else latency, "tokens": tokens, "finish": finish}


def health(url: str) -> dict:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("GET", "/health")
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def cpu_seconds(pid: int | None) -> float | None:
    """user + system CPU seconds of process `pid` and its threads (Linux /proc), else None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_level(url, clients, per_client, max_tokens, api_key, offset, pid=None) -> dict:
    results, errors = [], []

    def client(c):
        for k in range(per_client):
            prompt = PROMPTS[(offset + c * per_client + k) % len(PROMPTS)]
            try:
                results.append(request(url, prompt, max_tokens, api_key))
            except Exception as e:                 # noqa: BLE001 - reported, the level is marked failed
                errors.append(str(e))
    h0 = health(url)
    cpu0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu1 = cpu_seconds(pid)
    h1 = health(url)
    steps = h1["steps"] - h0["steps"]
    rows = h1["step_rows"] - h0["step_rows"]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": errors, "tokens": tokens, "wall_s": wall,
            "agg_tok_s": tokens / wall if wall else 0.0,
            "server_cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
            "latencies": [r["latency"] for r in results],
            "ttfts": [r["ttft"] for r in results], "mean_batch": rows / steps if steps else 0.0,
            "finish": {f: sum(r["finish"] == f for r in results) for f in ("stop", "length")}}


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    i = min(int(round(q / 100 * (len(xs) - 1))), len(xs) - 1)
    return xs[i]


def memory_gbs(threads: int) -> float | None:
    """Memory read bandwidth now (pipower.benchmark.read_gbs), or None without pipower's kernels. This VM
    kind switches between ~45 and ~80 GB/s: at the slower speed a decode step is more memory-bound, so
    batching gains more and the ratios to one client are higher; the table says which it was."""
    try:
        from pipower.benchmark import read_gbs
        return read_gbs(threads)
    except Exception:                              # no pipower importable here (--url), no kernels
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except Exception:                              # noqa: BLE001
        return ""


def summarize(rounds: list[list[dict]], levels: list[int]) -> list[dict]:
    rows = []
    for i, c in enumerate(levels):
        per = [r[i] for r in rounds]
        base = [r[0]["agg_tok_s"] for r in rounds]
        cpu = [p["tokens"] / p["server_cpu_s"] if p.get("server_cpu_s") else None for p in per]
        cpu_base = [r[0]["tokens"] / r[0]["server_cpu_s"] if r[0].get("server_cpu_s") else None for r in rounds]
        lat = [x for p in per for x in p["latencies"]]
        ttft = [x for p in per for x in p["ttfts"]]
        rows.append({
            "clients": c, "requests": sum(p["requests"] for p in per), "errors": sum(len(p["errors"]) for p in per),
            "tokens": sum(p["tokens"] for p in per),
            "agg_tok_s": statistics.median(p["agg_tok_s"] for p in per),
            "agg_tok_s_rounds": [round(p["agg_tok_s"], 2) for p in per],
            "vs_1": statistics.median(p["agg_tok_s"] / b for p, b in zip(per, base) if b),
            "p50_s": pct(lat, 50), "p95_s": pct(lat, 95), "ttft_p50_s": pct(ttft, 50),
            "mean_batch": statistics.median(p["mean_batch"] for p in per),
            "tok_per_cpu_s": statistics.median(cpu) if None not in cpu else None,
            "cpu_vs_1": (statistics.median(a / b for a, b in zip(cpu, cpu_base))
                         if None not in cpu and None not in cpu_base else None),
            "finish_stop": sum(p["finish"]["stop"] for p in per),
        })
    return rows


def table(rows) -> str:
    out = ["| clients | requests | tokens | agg tok/s | vs 1 client | p50 s | p95 s | TTFT p50 s | mean batch "
           "| tok/CPU s | CPU vs 1 |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]

    def opt(x, fmt):
        return "n/a" if x is None else format(x, fmt)
    for r in rows:
        out.append(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['agg_tok_s']:.1f} | {r['vs_1']:.2f}x | "
                   f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['ttft_p50_s']:.2f} | {r['mean_batch']:.2f} | "
                   f"{opt(r['tok_per_cpu_s'], '.1f')} | {opt(r['cpu_vs_1'], '.2f')}x |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="known model name or GGUF path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default=None, help="server --weights (default: the server's default)")
    ap.add_argument("--clients", default="1,2,4,8", help="comma-separated client counts (the first is the base)")
    ap.add_argument("--requests", type=int, default=4, help="requests each client sends per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--url", default=None, help="use this running server (http://127.0.0.1:PORT) instead")
    ap.add_argument("--api-key", default=os.environ.get("PIPOWER_API_KEY"))
    ap.add_argument("--server-arg", action="append", default=[], help="extra `pipower serve` argument")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",")]
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("--url must be a loopback address")

    if os.path.exists(args.model):                 # the server runs in another folder
        args.model = os.path.abspath(args.model)
    gbs_start = memory_gbs(args.threads)
    server = None if args.url else Server(args.model, args.threads, args.weights, args.max_batch, args.server_arg)
    url = args.url or server.url
    rc = 0
    try:
        log("warm-up")
        request(url, PROMPTS[0], 8, args.api_key)
        rounds = []
        for rnd in range(args.rounds):
            got = []
            for c in levels:
                res = run_level(url, c, args.requests, args.max_tokens, args.api_key, offset=rnd,
                                pid=server.proc.pid if server else None)
                log(f"round {rnd + 1} clients {c}: {res['tokens']} tokens in {res['wall_s']:.1f} s = "
                    f"{res['agg_tok_s']:.1f} tok/s, mean batch {res['mean_batch']:.2f}, server CPU "
                    f"{res['server_cpu_s'] or 0:.1f} s, errors {len(res['errors'])}")
                got.append(res)
            rounds.append(got)
    finally:
        stopped = server.stop() if server else 0
    gbs_end = memory_gbs(args.threads)
    rows = summarize(rounds, levels)
    if any(r["errors"] for r in rows) or stopped != 0:
        rc = 1
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "model": args.model,
            "threads": args.threads, "weights": args.weights, "max_batch": args.max_batch,
            "requests_per_client": args.requests, "max_tokens": args.max_tokens, "rounds": args.rounds,
            "cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_end": load, "commit": git_commit(),
            "server": server.banner if server else args.url, "server_exit": stopped,
            "memory_gbs": [gbs_start, gbs_end]}
    md = "\n".join([
        f"# pipower serve benchmark ({meta['date']})", "",
        f"- model {args.model}; server: {meta['server']}",
        f"- CPU: {meta['cpu']}, {meta['cores']} cores; load average at the end: "
        + (", ".join(f"{x:.2f}" for x in load) if load else "n/a") + "; memory read "
        + " / ".join("n/a" if g is None else f"{g:.1f}" for g in (gbs_start, gbs_end)) + " GB/s (start / end)",
        f"- each client sends {args.requests} streaming /v1/completions requests in a row (greedy, max_tokens "
        f"{args.max_tokens}, {len(PROMPTS)} code prompts of ~20-30 tokens); {args.rounds} rounds, medians; "
        f"pipower commit {meta['commit']}", "",
        table(rows), ""])
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "rounds": rounds}, indent=2))
    out.with_suffix(".md").write_text(md)
    return rc


if __name__ == "__main__":
    sys.exit(main())
