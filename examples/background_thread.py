"""Embed pipower in an application: one worker thread owns the model, the rest of the app talks to it
through a queue and gets results back as futures (whole answers) or as a queue of pieces (streaming).

The model is used from one thread only: the worker loads it, runs the requests one at a time, and
never blocks the application's main thread (a GUI loop, an asyncio loop, a request handler...). A
request can be cancelled while it runs; close() finishes or cancels what is queued and joins the thread.

    python examples/background_thread.py
    python examples/background_thread.py -m path/to/model.gguf -n 24
"""
import argparse
import queue
import sys
import threading
from concurrent.futures import Future

import pipower

_DONE = object()


class Request:
    def __init__(self, prompt: str, kwargs: dict, pieces: "queue.Queue | None"):
        self.prompt, self.kwargs, self.pieces = prompt, kwargs, pieces
        self.future: Future = Future()         # -> the whole text, or the exception the worker met
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop the generation at the next token (the future then holds the text so far)."""
        self.cancelled.set()


class ModelWorker:
    """A thread that owns one pipower Model and serves requests in order."""

    def __init__(self, source: str, **load_kwargs):
        self._requests: queue.Queue = queue.Queue()
        self.ready: Future = Future()           # -> the loaded Model's description, or the load error
        self._thread = threading.Thread(target=self._run, args=(source, load_kwargs), name="pipower-worker",
                                        daemon=True)
        self._thread.start()

    def submit(self, prompt: str, **kwargs) -> Request:
        """Queue a completion; `request.future.result()` is the text."""
        req = Request(prompt, kwargs, None)
        self._requests.put(req)
        return req

    def stream(self, prompt: str, **kwargs):
        """Queue a completion and yield its pieces in the calling thread as the worker produces them."""
        req = Request(prompt, kwargs, queue.Queue())
        self._requests.put(req)
        try:
            while (piece := req.pieces.get()) is not _DONE:
                yield piece
        finally:
            req.cancel()                         # the consumer stopped early: stop generating too
        req.future.result()                      # re-raise the worker's error, if any

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join()

    def _run(self, source, load_kwargs):
        try:
            model = pipower.load(source, **load_kwargs)
        except BaseException as e:               # the app sees the load error through `ready`
            self.ready.set_exception(e)
            return
        self.ready.set_result(repr(model))
        while (req := self._requests.get()) is not None:
            if not req.future.set_running_or_notify_cancel():
                continue
            try:
                text = []
                stream = model.stream(req.prompt, **req.kwargs)
                for piece in stream:
                    text.append(piece)
                    if req.pieces is not None:
                        req.pieces.put(piece)
                    if req.cancelled.is_set():
                        stream.close()
                        break
                req.future.set_result("".join(text))
            except Exception as e:               # a bad request fails its future, never the worker
                req.future.set_exception(e)
            finally:
                if req.pieces is not None:
                    req.pieces.put(_DONE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b",
                    help="GGUF file, Hugging Face model directory or known model name (default: qwen2.5-coder-0.5b)")
    ap.add_argument("-n", "--max-tokens", type=int, default=48, help="new tokens per request (default: 48)")
    args = ap.parse_args()

    worker = ModelWorker(args.model)
    try:
        print(f"worker loaded {worker.ready.result()}")
    except pipower.PipowerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    # Several requests queued at once; the main thread stays free and collects results as they finish.
    prompts = ["def is_prime(n):", "def reverse(s):", "import json\n\ndef load(path):"]
    requests = [worker.submit(p, max_tokens=args.max_tokens) for p in prompts]
    for p, req in zip(prompts, requests):
        print(f"--- {p!r} ->\n{p}{req.future.result(timeout=600)}")

    # Streaming through the worker: pieces arrive in this thread while the worker generates.
    print("--- streamed from the worker:")
    for piece in worker.stream("def fibonacci(n):", max_tokens=args.max_tokens):
        print(piece, end="", flush=True)
    print()

    # Cancelling: stop a long request after its first pieces; the future holds the text so far.
    req = Request("class Stack:", {"max_tokens": 4 * args.max_tokens}, queue.Queue())
    worker._requests.put(req)
    first = req.pieces.get()
    req.cancel()
    partial = req.future.result(timeout=600)
    print(f"--- cancelled after a first piece {first!r}: kept {len(partial)} characters")

    # Errors come back as exceptions on the future, and the worker keeps serving.
    bad = worker.submit("x", max_tokens=-1)
    try:
        bad.future.result(timeout=600)
    except pipower.InvalidArgumentError as e:
        print(f"--- a bad request fails alone: {e}")
    print(f"--- still serving: {worker.submit('x = ', max_tokens=4).future.result(timeout=600)!r}")
    worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
