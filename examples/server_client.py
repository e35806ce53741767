"""A client of `pipower serve` with the official `openai` package: a chat completion, the same streamed,
and a plain completion. Against a running server (--url), or one this script starts and stops (-m).

    pip install ".[server]" openai
    pipower serve -m qwen2.5-coder-0.5b &            # then:
    python examples/server_client.py --url http://127.0.0.1:8000/v1
    python examples/server_client.py -m qwen2.5-coder-0.5b          # starts its own server on a free port
"""
from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    """`pipower serve` on a free loopback port -> (the process, its base URL for the openai client)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipower", "serve", "-m", model, "--host", "127.0.0.1",
                             "--port", "0", "-t", "1"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:                    # it names its address once it listens
        m = re.search(r"on (http://127\.0\.0\.1:\d+)$", line.strip())
        if m:
            return proc, m.group(1) + "/v1"
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="base URL of a running server (e.g. http://127.0.0.1:8000/v1)")
    ap.add_argument("-m", "--model", default=None, help="start a server for this model instead of --url")
    ap.add_argument("-n", type=int, default=32, help="max new tokens per request (default: 32)")
    args = ap.parse_args()
    from openai import OpenAI

    proc = None
    if args.url is None:
        proc, args.url = start_server(args.model or "qwen2.5-coder-0.5b")
    try:
        client = OpenAI(base_url=args.url, api_key="none")        # the key matters only with --api-key
        messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
        reply = client.chat.completions.create(model="any", messages=messages, max_tokens=args.n, temperature=0)
        text = reply.choices[0].message.content
        print("--- chat:", text)
        print("--- usage:", reply.usage.prompt_tokens, "prompt +", reply.usage.completion_tokens, "completion tokens")
        pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="any", messages=messages, max_tokens=args.n, temperature=0, stream=True) if chunk.choices]
        print("--- streamed == not streamed:", "".join(pieces) == text)
        done = client.completions.create(model="any", prompt="def add(a, b):", max_tokens=args.n, temperature=0)
        print("--- completion:", done.choices[0].text, f"({done.choices[0].finish_reason})")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            print("--- server exit code:", proc.wait(60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
