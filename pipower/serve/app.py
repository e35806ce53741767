"""The OpenAI-compatible HTTP API over a BatchEngine, as a Starlette (ASGI) app.

    GET  /v1/models              the one served model
    POST /v1/completions         prompt: text, token ids, or a one-element list of either
    POST /v1/chat/completions    messages through the model's chat template
    GET  /health                 engine state (no API key needed)

Both generation routes take max_tokens (chat also max_completion_tokens), temperature, top_p, top_k (an
extension), stop (a string or up to 4), seed, n (1 only), stream (server-sent events ending in
`data: [DONE]`) and stream_options.include_usage. Defaults follow OpenAI's: temperature 1, top_p 1;
max_tokens 16 for completions and the server's cap for chat. Generation stops at the model's end of
turn (finish_reason "stop"), a stop string ("stop", the string is not returned), max_tokens or a full
context ("length").

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with no traceback ever: 400 for
a malformed body (bad JSON, wrong types, out-of-range values, a prompt past the context), 401 for a
missing or wrong API key, 404 for an unknown route, 405 for a wrong method, 413 for a body over the cap,
429 with Retry-After when the engine's queue is full, 503 while shutting down, 500 for anything else.

A client that disconnects cancels its generation (streaming or not): each request watches its ASGI
`receive` channel for http.disconnect while it waits for tokens.

Needs the `server` extra (Starlette); the engine module itself has no extra dependencies.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..errors import ContextLengthError, PipowerError
from ..sampling import SamplingParams
from .engine import BatchEngine, EngineClosedError, GenerationRequest, QueueFullError
from .text import StopTextStream

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4                    # OpenAI's limit
BIG_BODY = 16 << 10                     # bodies above this are tokenized on a worker thread
UNSUPPORTED = {                         # parameters we refuse rather than silently ignore
    "logprobs": "logprobs are not supported", "top_logprobs": "logprobs are not supported",
    "echo": "echo is not supported", "suffix": "suffix (fill-in-the-middle) is not supported",
    "tools": "tool calls are not supported", "functions": "function calls are not supported",
    "tool_choice": "tool calls are not supported", "function_call": "function calls are not supported",
    "response_format": "response_format is not supported", "logit_bias": "logit_bias is not supported",
}
ZERO_ONLY = ("presence_penalty", "frequency_penalty")    # accepted when 0 (what clients send by default)


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20            # request bodies above this are refused (413)
    max_tokens_cap: int = 4096               # max_tokens above this is a 400; the chat default
    completion_default_max_tokens: int = 16  # OpenAI's default for /v1/completions
    cors_origins: tuple[str, ...] = ()       # none: no CORS headers at all
    retry_after_s: int = 1                   # Retry-After of a 429
    close_timeout_s: float = 10.0            # waiting for the engine thread at shutdown


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- request parsing ---------------------------------------------------------------------------------
async def _read_json(request: Request, cap: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            too_big = int(length) > cap
        except ValueError:
            raise _bad(None, "invalid Content-Length header") from None
        if too_big:
            raise APIError(413, f"request body of {length} bytes is over the limit of {cap} bytes",
                           code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise APIError(413, f"request body is over the limit of {cap} bytes", code="request_too_large")

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")
    try:
        data = json.loads(bytes(body), parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise _bad(None, f"We could not parse the JSON body of your request: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise _bad(None, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def _get_int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"{name} must be an integer, got {json.dumps(v)[:40]}")
    if lo is not None and v < lo:
        raise _bad(name, f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise _bad(name, f"{name} must be <= {hi}, got {v}")
    return v


def _get_number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"{name} must be a number, got {json.dumps(v)[:40]}")
    if not ((lo < v) if lo_open else (lo <= v)) or not v <= hi:
        raise _bad(name, f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


@dataclass
class GenParams:
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _parse_common(body: dict, settings: ServerSettings, chat: bool) -> GenParams:
    for name, why in UNSUPPORTED.items():
        v = body.get(name)
        if v not in (None, False, [], {}):              # (0 == False: logprobs 0 passes too)
            raise _bad(name, why)
    for name in ZERO_ONLY:
        if _get_number(body, name, 0.0, -2.0, 2.0) != 0:
            raise _bad(name, f"{name} is not supported (only 0)")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "model must be a string")
    n = _get_int(body, "n", 1)
    if n != 1:
        raise _bad("n", f"only n = 1 is supported, got {n}")
    best_of = _get_int(body, "best_of", 1)
    if best_of != 1:
        raise _bad("best_of", f"only best_of = 1 is supported, got {best_of}")
    cap = settings.max_tokens_cap
    name = "max_tokens"
    if chat and body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
    default = cap if chat else min(settings.completion_default_max_tokens, cap)
    max_tokens = _get_int(body, name, default, 0)
    if max_tokens > cap:
        raise _bad(name, f"{name} must be at most {cap} on this server, got {max_tokens}")
    temperature = _get_number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _get_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _get_int(body, "top_k", 0, 0)
    seed = _get_int(body, "seed", None)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_STRINGS:
            raise _bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        stop = tuple(stop)
    else:
        raise _bad("stop", "stop must be a string or a list of strings")
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", "stream must be a boolean")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("stream_options", "stream_options must be an object")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad("stream_options", "stream_options.include_usage must be a boolean")
    sampling = SamplingParams(temperature, top_k, top_p, None if seed is None else seed % (1 << 64))
    return GenParams(max_tokens, sampling, stop, stream, include_usage)


def _prompt_ids(model, body: dict) -> list[int]:
    """/v1/completions prompt -> token ids: text (encoded as Model.stream encodes it), token ids, or a list
    holding one of these."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise _bad("prompt", "this model has no tokenizer: give the prompt as token ids")
        try:
            return model.tokenizer.encode(prompt)
        except PipowerError as e:
            raise _bad("prompt", str(e)) from None
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        return prompt
    if prompt is None:
        raise _bad("prompt", "prompt is required")
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad("prompt", "one prompt per request: a list of several prompts is not supported")
    raise _bad("prompt", "prompt must be a string, a list of token ids, or a list with one of these")


CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _chat_ids(model, body: dict) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"{where} must be an object")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"{where}.role", f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got "
                                        f"{json.dumps(role)[:40]}")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _bad(f"{where}.content", "only text content parts ({'type': 'text', 'text': ...}) "
                                                   "are supported")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise _bad(f"{where}.content", f"{where}.content must be a string or a list of text parts")
        out.append({"role": CHAT_ROLES[role], "content": content})
    tok = model.tokenizer
    if tok is None:
        raise _bad("messages", "this model has no tokenizer, so no chat template: use /v1/completions")
    try:
        prompt = tok.apply_chat_template(out, add_generation_prompt=True)
        return tok.encode(prompt, add_bos=None, parse_special=True)      # as Model.stream_chat does
    except PipowerError as e:
        raise _bad("messages", str(e)) from None


# ---- generation --------------------------------------------------------------------------------------
class _LoopWaker:
    """Sets asyncio Events of one event loop from the engine thread, one loop wake-up for all the events
    set before the loop gets to them: a batched step delivers a token to every running request at once,
    and one call_soon_threadsafe per request (a write to the loop's self-pipe each) was the engine
    thread's largest cost outside the forward with 4 clients (py-spy: 2.5% of its time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[asyncio.Event] = []

    def set_soon(self, event: asyncio.Event) -> None:        # engine thread
        with self._lock:
            self._pending.append(event)
            if len(self._pending) > 1:                       # a wake-up is already on its way
                return
        try:
            self.loop.call_soon_threadsafe(self._fire)
        except RuntimeError:                                 # the loop is gone (server stopped)
            pass

    def _fire(self) -> None:                                 # event loop
        with self._lock:
            events, self._pending = self._pending, []
        for e in events:
            e.set()


class _Generation:
    """One request's tokens, turned into text pieces on the event loop."""

    def __init__(self, engine: BatchEngine, model, ids: list[int], p: GenParams, chat: bool, waker: _LoopWaker,
                 retry_after_s: int = 1):
        self.wake = asyncio.Event()

        def listener():                           # engine thread -> event loop
            waker.set_soon(self.wake)
        self.text = StopTextStream(model.tokenizer.stream_decoder(strip_first_space=chat), p.stop)
        self.tokens = 0
        self.started = time.monotonic()
        try:
            self.handle: GenerationRequest = engine.submit(ids, p.max_tokens, p.sampling, model._stop_ids(),
                                                           listener=listener)
        except QueueFullError as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(retry_after_s)}) from None
        except EngineClosedError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        except ContextLengthError as e:
            raise _bad("messages" if chat else "prompt", str(e), code="context_length_exceeded") from None
        except PipowerError as e:
            raise _bad("messages" if chat else "prompt", str(e)) from None

    async def pieces(self) -> AsyncIterator[str]:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while True:
                try:
                    token = self.handle.get_nowait()
                except queue.Empty:
                    break
                if token is None:
                    if self.handle.finish_reason != "error":
                        rest = self.text.finish()
                        if rest:
                            yield rest
                    return
                self.tokens += 1
                piece = self.text.feed(token)
                if piece:
                    yield piece
                if self.text.stopped:
                    self.handle.cancel()
                    return

    @property
    def finish_reason(self) -> str:
        if self.text.stopped or self.handle.finish_reason == "eos":
            return "stop"
        return "length"

    @property
    def failed(self) -> bool:
        return self.handle.finish_reason == "error"

    def usage(self) -> dict:
        return {"prompt_tokens": self.handle.prompt_tokens, "completion_tokens": self.tokens,
                "total_tokens": self.handle.prompt_tokens + self.tokens}

    def log_done(self, kind: str) -> None:
        log.info("%s %s: %d prompt + %d new tokens, %s, %.2f s", kind, self.handle.id, self.handle.prompt_tokens,
                 self.tokens, self.handle.finish_reason if not self.text.stopped else "stop string",
                 time.monotonic() - self.started)


async def _watch_disconnect(receive, handle: GenerationRequest) -> None:
    """Cancel `handle` when the client goes away (the body has been read, so the next ASGI message is
    http.disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not handle.done:
                log.info("client of %s disconnected: cancelling", handle.id)
            handle.cancel()
            return


GENERATION_FAILED = APIError(500, "the model failed to generate (see the server log)", type="server_error",
                             code="generation_failed")


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _EventStream:
    """An ASGI response sending `events` as server-sent events; cancels the generation on disconnect."""

    def __init__(self, events: AsyncIterator[bytes], gen: _Generation):
        self.events, self.gen = events, gen

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.create_task(_watch_disconnect(receive, self.gen.handle))
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:                            # the client went away mid-send
            pass
        finally:
            watcher.cancel()
            self.gen.handle.cancel()
            await self.events.aclose()
            self.gen.log_done("stream")


# ---- the app -----------------------------------------------------------------------------------------
def create_app(model, engine: BatchEngine, settings: ServerSettings) -> Starlette:
    """The ASGI app serving `model` (a pipower.Model, for its tokenizer and stop ids) through `engine`
    (started at startup, closed at shutdown)."""
    created = int(time.time())
    waker: list[_LoopWaker | None] = [None]       # the serving event loop's

    def loop_waker() -> _LoopWaker:
        loop = asyncio.get_running_loop()
        if waker[0] is None or waker[0].loop is not loop:    # first request, or an app served again
            waker[0] = _LoopWaker(loop)
        return waker[0]

    def authorize(request: Request) -> None:
        if not settings.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer"
                and hmac.compare_digest(token.strip().encode(), settings.api_key.encode())):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "pipower"}

    async def list_models(request: Request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request):
        authorize(request)
        if request.path_params["model"] != settings.model_name:
            raise APIError(404, f"The model '{request.path_params['model']}' does not exist",
                           param="model", code="model_not_found")
        return JSONResponse(model_card())

    async def health(request: Request):
        s = engine.stats()
        ok = engine.running
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": settings.model_name,
                             "queued": s.queued, "active": s.active, "max_batch": engine.max_batch,
                             "max_queue": engine.max_queue, "context": engine.context,
                             "completed": s.completed, "cancelled": s.cancelled, "failed": s.failed,
                             "rejected": s.rejected, "generated_tokens": s.generated_tokens,
                             "steps": s.steps, "step_rows": s.step_rows, "mean_batch": round(s.mean_batch, 3),
                             "max_batch_seen": s.max_rows},
                            status_code=200 if ok else 503)

    async def generate(request: Request, chat: bool):
        authorize(request)
        body = await _read_json(request, settings.max_body_bytes)
        try:
            p = _parse_common(body, settings, chat)
        except PipowerError as e:                  # SamplingParams' own checks
            raise _bad(None, str(e)) from None
        if model.tokenizer is None:
            raise _bad(None, "this model has no tokenizer: the server returns text, which needs one")
        tokenize = _chat_ids if chat else _prompt_ids
        if int(request.headers.get("content-length") or 0) > BIG_BODY:    # keep the event loop responsive
            ids = await asyncio.to_thread(tokenize, model, body)
        else:
            ids = tokenize(model, body)
        gen = _Generation(engine, model, ids, p, chat, loop_waker(), settings.retry_after_s)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        now = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if p.stream:
            return _EventStream(_stream_events(gen, rid, now, chat, p.include_usage), gen)
        watcher = asyncio.create_task(_watch_disconnect(request.receive, gen.handle))
        try:
            text = "".join([piece async for piece in gen.pieces()])
        finally:
            watcher.cancel()
            gen.handle.cancel()
        gen.log_done(obj)
        if gen.failed:
            raise GENERATION_FAILED
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": gen.finish_reason} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": gen.finish_reason})
        return JSONResponse({"id": rid, "object": obj, "created": now, "model": settings.model_name,
                             "system_fingerprint": None, "choices": [choice], "usage": gen.usage()})

    async def _stream_events(gen: _Generation, rid: str, now: int, chat: bool, include_usage: bool):
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now,
                "model": settings.model_name, "system_fingerprint": None}

        def chunk(piece: str | None, finish: str | None, first: bool = False) -> bytes:
            if chat:
                delta = {} if piece is None else {"content": piece}
                if first:
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return _sse({**base, "choices": [choice]})

        if chat:
            yield chunk(None, None, first=True)
        async for piece in gen.pieces():
            yield chunk(piece, None)
        if gen.failed:
            yield _sse(GENERATION_FAILED.body())
        else:
            yield chunk(None, gen.finish_reason)
            if include_usage:
                yield _sse({**base, "choices": [], "usage": gen.usage()})
        yield b"data: [DONE]\n\n"

    async def completions(request: Request):
        return await generate(request, chat=False)

    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def api_error(request: Request, exc: APIError):
        return exc.response()

    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            e = APIError(404, f"Unknown route: {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            e = APIError(405, f"Method {request.method} is not allowed on {request.url.path}",
                         code="method_not_allowed", headers=dict(exc.headers or {}))
        else:
            e = APIError(exc.status_code, str(exc.detail), code=None, headers=dict(exc.headers or {}))
        return e.response()

    async def server_error(request: Request, exc: Exception):
        # Starlette re-raises exc after this response, so the server logs the traceback (never the client)
        return APIError(500, "internal server error (see the server log)", type="server_error").response()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            # uvicorn has already stopped accepting and waited for the open requests (or cancelled them)
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: engine.close(cancel=True, timeout=settings.close_timeout_s))

    middleware = []
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})
