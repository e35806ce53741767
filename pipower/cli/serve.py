"""`pipower serve`: the OpenAI-compatible HTTP server (pipower.serve) from the command line."""
from __future__ import annotations

import importlib.util
import ipaddress
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from .args import add_ctx_size, add_model_args, error, load_kwargs

log = logging.getLogger("pipower.serve")

MISSING_EXTRA = 'pipower serve needs the server extra: pip install "pipower[server]"'


def add_commands(sub) -> None:
    s = sub.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API (continuous batching)",
        description="Serve a model over OpenAI's HTTP API: GET /v1/models, POST /v1/completions, POST "
                    "/v1/chat/completions (stream: true = server-sent events), GET /health. Concurrent "
                    "requests decode together in one batched forward per step (continuous batching); "
                    "greedy output is exactly what the request gets when served alone. Binds the loopback "
                    "address unless --host says otherwise. SIGTERM or Ctrl-C: stop accepting, let running "
                    "requests finish (at most --shutdown-timeout s), exit 0. Not available here (they do "
                    "not batch): --draft, the sparsity modes and --device; the server runs dense on the "
                    "CPU engine. Needs the server extra: pip install \"pipower[server]\".")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; anything else "
                        "exposes the model to the network: use --api-key)")
    s.add_argument("--port", type=int, default=8000, help="TCP port; 0 = any free port (default: 8000)")
    s.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id in /v1/models and responses (default: the -m name or file stem)")
    s.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="requests decoded together, 1..64 (default: 8)")
    s.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a batch slot; past this a request gets 429 (default: 64)")
    s.add_argument("--max-tokens", type=int, default=4096, metavar="N", dest="max_tokens_cap",
                   help="largest max_tokens a request may ask for, and the chat default (default: 4096)")
    add_ctx_size(s, None, "per request", "the model's context length")
    s.add_argument("--api-key", default=os.environ.get("PIPOWER_API_KEY") or None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $PIPOWER_API_KEY; none)")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from this origin (repeatable; '*' = any); default: no CORS")
    s.add_argument("--max-body", default="1MiB", metavar="SIZE",
                   help="largest request body, e.g. 1MiB (default: 1MiB); larger ones get 413")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds running requests get to finish before they are cancelled "
                        "(default: 30)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(512)
    except BaseException:
        sock.close()
        raise
    return sock


def _model_name(args) -> str:
    if args.model_name:
        return args.model_name
    p = Path(str(args.model))
    return p.stem if p.suffix.lower() == ".gguf" else p.name or str(args.model)


def cmd_serve(args) -> int:
    if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None:
        return error(MISSING_EXTRA)
    import uvicorn

    import pipower
    from ..errors import InvalidArgumentError
    from ..serve.app import ServerSettings, create_app
    from ..serve.engine import BatchEngine
    from ..units import parse_bytes

    for name in ("max_batch", "max_tokens_cap"):
        if getattr(args, name) < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-').replace('-cap', '')} must be at least 1")
    if args.max_queue < 0 or args.shutdown_timeout < 0 or not 0 <= args.port <= 65535:
        raise InvalidArgumentError("--max-queue and --shutdown-timeout must be >= 0 and --port in 0..65535")
    max_body = parse_bytes(args.max_body)
    model = pipower.load(args.model, **load_kwargs(args))
    if model.tokenizer is None:
        raise InvalidArgumentError(f"{model.source} has no tokenizer; the server needs one for its text")
    engine = BatchEngine(model.transformer, max_batch=args.max_batch, max_queue=args.max_queue,
                         context=args.ctx_size)
    settings = ServerSettings(model_name=_model_name(args), api_key=args.api_key, max_body_bytes=max_body,
                              max_tokens_cap=args.max_tokens_cap, cors_origins=tuple(args.cors_origin))
    app = create_app(model, engine, settings)
    if not _is_loopback(args.host) and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it can use the model", args.host)
    sock = _bind(args.host, args.port)
    level = ["warning", "info", "debug"][min(args.verbose, 2)]
    config = uvicorn.Config(app, log_level=level, log_config=None, access_log=args.verbose >= 1,
                            lifespan="on", timeout_graceful_shutdown=args.shutdown_timeout, server_header=False)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"pipower: serving {settings.model_name} ({model.weights} weights, {model.transformer.ops.n_threads} "
          f"threads, max batch {engine.max_batch}, context {engine.context}) on http://{url_host}:{port}",
          file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM/SIGINT while it serves (stop accepting, wait for running requests, shut down)
    # and re-raises the signal afterwards: the handlers it restores then must not turn that into an error.
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: None)
        except ValueError:                         # not the main thread: uvicorn leaves signals alone too
            pass
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.close(cancel=True, timeout=settings.close_timeout_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("pipower: server stopped", file=sys.stderr, flush=True)
    return 0


COMMANDS = {"serve": cmd_serve}
