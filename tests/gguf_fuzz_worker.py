"""Load damaged GGUF files, each in a fresh process, and report how each load ended (for test_gguf_fuzz.py).

    python gguf_fuzz_worker.py LIST.json [GOOD.gguf]   (LIST: a JSON list of GGUF paths) -> one JSON line per file:
    {"path": ..., "outcome": "ok" | "pipower" | "foreign" | "crash" | "hang", "detail": ...}

The worker imports pipower once, then forks one child per file: the child is a fresh process (its own
memory, no state left from earlier files) without paying the imports again; GOOD, an undamaged file,
is exercised once in the parent first so that lazy imports and first-call set-up are done before forking. In the child the address
space is capped (RLIMIT_AS: what the imports took plus MEM_LIMIT) and an alarm kills a hang. A child
loads the file with the NumPy backend (no OpenMP team to carry across fork()), then uses the model:
encode/decode, a short generation, a chat turn when there is a template. `ok` or `pipower` (a
PipowerError) are the acceptable outcomes; `foreign` is any other exception, with its traceback.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback

MEM_LIMIT = 1 << 30          # bytes of address space a child may add to what the imports mapped
TIME_LIMIT = 30              # seconds a child may take (a tiny model loads in milliseconds)


def _exercise(path: str) -> str:
    import pipower
    m = pipower.load(path, backend="numpy", progress=False, cache=False)   # no prepared-model cache writes
    tok = m.tokenizer
    ids = tok.encode("Hello world, <|extra_0|> 123 \u00e9t\u00e9 \U0001F600", parse_special=True)
    tok.decode(ids)
    tok.decode(range(tok.vocab_size), skip_special=False)
    m.generate("Hello", max_tokens=3)
    m.generate(ids or [0], max_tokens=2)
    if tok.chat_template:
        m.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    return f"loaded: vocab {tok.vocab_size}, {m.config.num_hidden_layers} layers"


def _child(path: str, w: int) -> None:
    import resource
    from pipower.errors import PipowerError
    try:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + MEM_LIMIT, vm + MEM_LIMIT))
    except (OSError, StopIteration, ValueError):
        pass                                   # not Linux: no cap (the alarm still bounds a hang)
    signal.alarm(TIME_LIMIT)                   # default action: the child dies with SIGALRM
    try:
        result = {"outcome": "ok", "detail": _exercise(path)}
    except PipowerError as e:
        result = {"outcome": "pipower", "detail": f"{type(e).__name__}: {e}"[:300]}
    except BaseException as e:                 # noqa: BLE001 - exactly what the fuzz test looks for
        result = {"outcome": "foreign",
                  "detail": f"{type(e).__name__}: {e}"[:300] + "\n" + "".join(traceback.format_exc()[-1500:])}
    os.write(w, json.dumps(result).encode())
    os.close(w)
    os._exit(0)


def run_one(path: str) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _child(path, w)
        finally:
            os._exit(3)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return {"path": path, "outcome": "hang" if sig == signal.SIGALRM else "crash",
                "detail": f"killed by {signal.Signals(sig).name}"}
    try:
        return {"path": path, **json.loads(b"".join(chunks))}
    except ValueError:
        return {"path": path, "outcome": "crash", "detail": f"exit status {os.WEXITSTATUS(status)}, no report"}


def main() -> None:
    import pipower  # noqa: F401  - import once in the parent; every child starts from here
    import pipower.loader  # noqa: F401
    import pipower.tokenizer.bpe  # noqa: F401
    import pipower.tokenizer.spm  # noqa: F401
    import jinja2.sandbox  # noqa: F401
    import tokenizers  # noqa: F401
    with open(sys.argv[1]) as f:
        paths = json.load(f)
    if len(sys.argv) > 2:
        _exercise(sys.argv[2])
    for path in paths:
        print(json.dumps(run_one(path)), flush=True)


if __name__ == "__main__":
    main()
