"""`pipower serve` end to end: the real server process (`python -m pipower serve`) on 127.0.0.1 with an
ephemeral port, driven by the official `openai` client and by raw HTTP (httpx).

Two servers on tiny NumPy-made GGUFs: `server` (the 1-layer tiny model, an API key, max batch 8) for the
API, the errors and the load test (64 requests over 8 connections, each greedy answer equal to its solo
answer); `busy_server` (a wider 4-layer model with no end-of-sequence token and a 4096 context, so a
long generation really runs for a while; max batch 1, no queue, CORS for one origin) for 429, a client
that disconnects mid-stream, CORS and SIGTERM. Only loopback addresses; every wait is bounded.
"""
import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import pipower  # noqa: E402
from helpers_models import write_tiny_gguf  # noqa: E402
from pipower import _cpu  # noqa: E402

KEY = "test-key-123"
START_TIMEOUT = 120
REQUEST_TIMEOUT = 120
ERROR_KEYS = {"message", "type", "param", "code"}


class Server:
    """A `python -m pipower serve` process; .url once it listens, .stop() sends SIGTERM."""

    def __init__(self, model_path, *args, cwd):
        cmd = [sys.executable, "-m", "pipower", "serve", "-m", str(model_path), "--host", "127.0.0.1",
               "--port", "0", "-t", "1", "--model-name", "tiny", *args]
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines = []
        self._ready = threading.Event()
        self.url = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(START_TIMEOUT) or self.url is None:
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:\d+)$", line.strip())
            if m:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()                         # exited before listening

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(10)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("serve") / "tiny.gguf")


@pytest.fixture(scope="module")
def server(tiny_path, tmp_path_factory):
    s = Server(tiny_path, "--api-key", KEY, "--max-batch", "8", "--max-queue", "64", "--max-tokens", "200",
               "--max-body", "64KiB", cwd=tmp_path_factory.mktemp("cwd"))
    yield s
    rc = s.stop()
    assert rc == 0, s.log
    assert "Traceback" not in s.log, s.log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=REQUEST_TIMEOUT)


@pytest.fixture(scope="module")
def local_model(tiny_path):
    """The same model in this process: the library's answers to compare with."""
    return pipower.load(tiny_path, threads=1, progress=False)


def http(server, method, path, key=KEY, **kw):
    headers = kw.pop("headers", {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, server.url + path, headers=headers, timeout=REQUEST_TIMEOUT, **kw)


def assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# ---- the API -------------------------------------------------------------------------------------
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = httpx.get(server.url + "/health", timeout=REQUEST_TIMEOUT)          # no key needed
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["max_batch"] == 8


def test_completion_equals_library_generate(client, local_model):
    for prompt, n in (("hello there", 12), ("def fib(n):", 30), ("the", 1)):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
        expected = local_model.generate(prompt, max_tokens=n, temperature=0)
        st = local_model.last_stats
        assert r.object == "text_completion" and r.model == "tiny" and len(r.choices) == 1
        assert r.choices[0].text == expected
        assert r.choices[0].finish_reason == ("length" if st.stop_reason == "length" else "stop")
        assert r.usage.prompt_tokens == len(local_model.tokenizer.encode(prompt))
        assert r.usage.completion_tokens == st.new_tokens
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_token_id_prompt(client, local_model):
    ids = local_model.tokenizer.encode("hello")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == local_model.generate(ids, max_tokens=8, temperature=0)


def test_streaming_completion_joins_to_the_plain_answer(client):
    plain = client.completions.create(model="tiny", prompt="stream me", max_tokens=25, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="stream me", max_tokens=25, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_uses_the_template_and_streams(client, local_model):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    expected = local_model.chat(messages, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    prompt = local_model.tokenizer.apply_chat_template(messages)
    assert r.usage.prompt_tokens == len(local_model.tokenizer.encode(prompt, parse_special=True))
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_raw_stream_ends_with_done(server):
    r = http(server, "POST", "/v1/chat/completions",
             json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
                   "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings(client, local_model):
    full = local_model.generate("abc", max_tokens=40, temperature=0)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    expected = local_model.generate("abc", max_tokens=40, temperature=0, stop=[stop])
    assert local_model.last_stats.stop_reason == "stop"
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=40, temperature=0, stop=[stop, "\x00z"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=40, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_matches_the_library(client, local_model):
    kw = dict(model="tiny", prompt="seed", max_tokens=20, temperature=0.9, top_p=0.95, seed=42)
    a = client.completions.create(**kw, extra_body={"top_k": 40})
    b = client.completions.create(**kw, extra_body={"top_k": 40})
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text == local_model.generate("seed", max_tokens=20, temperature=0.9, top_p=0.95,
                                                     top_k=40, seed=42)


def test_max_tokens_zero(client):
    r = client.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 0


# ---- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 201}, "max_tokens"),                  # over --max-tokens
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 5.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"prompt": "x", "seed": "1"}, "seed"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "logprobs": 3}, "logprobs"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "model": 5}, "model"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2, 10**6]}, "prompt"),                               # a token id outside the vocabulary
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hello " * 300, "max_tokens": 1}, "prompt"),             # past the 256-token context
    ({"prompt": "hello " * 4000, "max_tokens": 1}, "prompt"),            # (tokenized on a worker thread)
])
def test_bad_completion_requests_are_400(server, body, param):
    err = assert_error(http(server, "POST", "/v1/completions", json=body), 400, param)
    if "hello " in str(body):
        assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body,param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
])
def test_bad_chat_requests_are_400(server, body, param):
    assert_error(http(server, "POST", "/v1/chat/completions", json=body), 400, param)


@pytest.mark.parametrize("raw", [b"{bad json", b"[1, 2]", b"", b'{"prompt": NaN}', b"\xff\xfe{}",
                                 b"[" * 30000 + b"]" * 30000])
def test_malformed_bodies_are_400(server, raw):
    assert_error(http(server, "POST", "/v1/completions", content=raw,
                      headers={"Content-Type": "application/json"}), 400)


def test_body_over_the_cap_is_413(server):
    assert_error(http(server, "POST", "/v1/completions", content=b'{"prompt": "' + b"a" * 70000 + b'"}'), 413)


def test_unknown_route_wrong_method_and_auth(server):
    assert_error(http(server, "GET", "/v1/nothing"), 404)
    assert_error(http(server, "POST", "/v2/completions", json={}), 404)
    err = assert_error(http(server, "GET", "/v1/completions"), 405)
    assert err["code"] == "method_not_allowed"
    assert_error(http(server, "GET", "/v1/models/other"), 404, "model")
    assert http(server, "GET", "/v1/models/tiny").json()["id"] == "tiny"
    for key in (None, "wrong", KEY + "x", ""):
        r = http(server, "POST", "/v1/completions", key=key, json={"prompt": "x", "max_tokens": 1})
        assert assert_error(r, 401)["code"] == "invalid_api_key"
    assert_error(http(server, "GET", "/v1/models", key=None, headers={"Authorization": KEY}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_no_cors_headers_unless_asked(server):
    r = http(server, "GET", "/v1/models", headers={"Origin": "http://elsewhere.test"})
    assert r.status_code == 200 and not any(h.lower().startswith("access-control") for h in r.headers)
    r = http(server, "OPTIONS", "/v1/completions", headers={"Origin": "http://elsewhere.test",
                                                              "Access-Control-Request-Method": "POST"})
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers


# ---- continuous batching under load ---------------------------------------------------------------
@pytest.mark.skipif(not _cpu.AVAILABLE, reason="batch invariance needs the compiled kernels")
def test_load_64_requests_over_8_connections_equal_their_solo_answers(server):
    prompts = [(f"request {i}: " + "abcdefgh"[: i % 8] * (1 + i % 5), 8 + (i * 7) % 57) for i in range(64)]
    kinds = ["completion", "chat", "stream"]

    def ask(http_client, i):
        prompt, n = prompts[i]
        kind = kinds[i % 3]
        if kind == "chat":
            r = http_client.post("/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": n,
                "temperature": 0})
            assert r.status_code == 200, r.text
            c = r.json()["choices"][0]
            return c["message"]["content"], c["finish_reason"], r.json()["usage"]["completion_tokens"]
        if kind == "stream":
            text, finish = [], None
            with http_client.stream("POST", "/v1/completions", json={
                    "model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}) as r:
                assert r.status_code == 200
                lines = [line for line in r.iter_lines() if line]
            assert lines[-1] == "data: [DONE]"
            events = [json.loads(line[6:]) for line in lines[:-1]]
            for e in events:
                if e["choices"]:
                    text.append(e["choices"][0]["text"])
                    finish = e["choices"][0]["finish_reason"] or finish
            return "".join(text), finish, events[-1]["usage"]["completion_tokens"]
        r = http_client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": n,
                                                      "temperature": 0})
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        return c["text"], c["finish_reason"], r.json()["usage"]["completion_tokens"]

    def client_for():
        return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                            timeout=REQUEST_TIMEOUT)

    with client_for() as c:                                   # solo: one request at a time
        solo = [ask(c, i) for i in range(64)]
    before = http(server, "GET", "/health").json()

    def worker(w):                                            # 8 connections, 8 requests each
        with client_for() as c:
            return [(i, ask(c, i)) for i in range(w, 64, 8)]
    with ThreadPoolExecutor(8) as pool:
        results = dict(kv for part in pool.map(worker, range(8)) for kv in part)
    assert sorted(results) == list(range(64))                 # none lost
    for i in range(64):
        assert results[i] == solo[i], i
    health = http(server, "GET", "/health").json()
    assert health["status"] == "ok" and health["active"] == 0 and health["queued"] == 0
    assert health["completed"] - before["completed"] == 64 and health["failed"] == 0
    assert health["max_batch_seen"] >= 2                       # they did decode together


# ---- a busy engine: 429, disconnects, CORS, SIGTERM ------------------------------------------------
@pytest.fixture(scope="module")
def busy_path(tmp_path_factory):
    # wider and deeper than the tiny model, and without an end-of-sequence token: a long request runs long
    return write_tiny_gguf(tmp_path_factory.mktemp("busy") / "busy.gguf", hidden_size=256, intermediate_size=1024,
                           num_hidden_layers=4, max_position_embeddings=4096, eos_token_id=None)


def start_busy(busy_path, tmp_path_factory):
    return Server(busy_path, "--max-batch", "1", "--max-queue", "0", "--cors-origin", "http://allowed.test",
                  "--shutdown-timeout", "60", cwd=tmp_path_factory.mktemp("cwd"))


def wait_for(pred, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_queue_full_429_and_disconnect_cancels(busy_path, tmp_path_factory):
    s = start_busy(busy_path, tmp_path_factory)
    try:
        long_req = {"model": "tiny", "prompt": "go", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.Client(base_url=s.url, timeout=REQUEST_TIMEOUT) as a:
            with a.stream("POST", "/v1/completions", json=long_req) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                assert next(line for line in lines if line).startswith("data: {")   # it is decoding
                busy = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                  timeout=REQUEST_TIMEOUT)
                err = assert_error(busy, 429)
                assert busy.headers["retry-after"] == "1" and err["code"] == "queue_full"
                health = httpx.get(s.url + "/health", timeout=REQUEST_TIMEOUT).json()
                assert health["active"] == 1 and health["cancelled"] == 0
            # leaving the `with` closes the connection mid-stream
        assert wait_for(lambda: httpx.get(s.url + "/health", timeout=REQUEST_TIMEOUT).json()["active"] == 0)
        health = httpx.get(s.url + "/health", timeout=REQUEST_TIMEOUT).json()
        assert health["cancelled"] == 1 and health["generated_tokens"] < 4000 and health["status"] == "ok"
        # and the server goes on serving
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 0},
                       timeout=REQUEST_TIMEOUT)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        # CORS for the origin it was told, and only that one
        r = httpx.get(s.url + "/v1/models", headers={"Origin": "http://allowed.test"}, timeout=REQUEST_TIMEOUT)
        assert r.headers["access-control-allow-origin"] == "http://allowed.test"
        r = httpx.get(s.url + "/v1/models", headers={"Origin": "http://other.test"}, timeout=REQUEST_TIMEOUT)
        assert "access-control-allow-origin" not in r.headers
    finally:
        assert s.stop() == 0, s.log
    assert "Traceback" not in s.log, s.log


def test_sigterm_finishes_running_requests_and_exits_0(busy_path, tmp_path_factory):
    s = start_busy(busy_path, tmp_path_factory)
    try:
        with httpx.Client(base_url=s.url, timeout=REQUEST_TIMEOUT) as c:
            with c.stream("POST", "/v1/completions", json={"prompt": "go", "max_tokens": 300, "temperature": 0,
                                                           "stream": True}) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line).startswith("data: {")
                s.proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"    # it ran to the end
        assert s.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=5)
    finally:
        s.kill()
    assert "server stopped" in s.log and "Traceback" not in s.log, s.log


def test_serve_without_the_extra_says_so(tmp_path):
    code = ("import sys; sys.modules['starlette'] = None; from pipower.cli import main; "
            "sys.exit(main(['serve', '-m', 'no-such-model.gguf']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and 'pip install "pipower[server]"' in r.stderr


def test_bench_script_runs(tiny_path, tmp_path):
    import importlib.util
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", script)
    if not script.is_file():
        pytest.skip("bench/serve.py is not here (installed tests)")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "serve.json"
    assert bench.main(["--model", str(tiny_path), "--threads", "1", "--clients", "1,2", "--requests", "2",
                       "--max-tokens", "4", "--rounds", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["clients"] for r in res["rows"]] == [1, 2] and res["rows"][0]["vs_1"] == 1.0
    assert all(r["requests"] == 2 * r["clients"] and r["errors"] == 0 for r in res["rows"])
    assert "| clients |" in out.with_suffix(".md").read_text()


# ---- a real model (slow) ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not _cpu.AVAILABLE, reason="batch invariance needs the compiled kernels")
def test_real_model_concurrent_chats_equal_solo(tmp_path):
    path = pipower.fetch("qwen2.5-coder-0.5b", progress=False)
    s = Server(path, "--max-batch", "4", cwd=tmp_path)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=600)
        questions = ["Write a Python function that reverses a string.", "What is a linked list?",
                     "Sum of 2 and 3?", "Name three sorting algorithms."]

        def ask(q):
            return c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                             max_tokens=40, temperature=0).choices[0].message.content
        solo = [ask(q) for q in questions]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, questions))
        assert together == solo
        m = pipower.load(path, threads=1, progress=False)
        assert solo[0] == m.chat([{"role": "user", "content": questions[0]}], max_tokens=40, temperature=0)
    finally:
        assert s.stop() == 0, s.log


def test_one_loop_wake_up_sets_every_event_of_a_step():
    """The engine thread delivers a batched step's tokens to several requests; their events are set by
    one wake-up of the event loop (pipower.serve.app._LoopWaker), and later ones get a wake-up again."""
    import asyncio

    from pipower.serve.app import _LoopWaker

    async def main():
        loop = asyncio.get_running_loop()
        waker = _LoopWaker(loop)
        calls = []
        real = loop.call_soon_threadsafe

        def counting(*args):
            calls.append(args)
            return real(*args)
        loop.call_soon_threadsafe = counting
        for step in range(2):
            events = [asyncio.Event() for _ in range(4)]
            engine = threading.Thread(target=lambda: [waker.set_soon(e) for e in events])
            engine.start()
            engine.join()
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 10)
            assert len(calls) == step + 1
    asyncio.run(main())
