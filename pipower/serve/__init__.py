"""Serving: the continuous-batching engine (pipower.serve.engine, no extra dependencies) and the
OpenAI-compatible HTTP app (pipower.serve.app, needs the `server` extra: Starlette and uvicorn).

    from pipower.serve import BatchEngine
    engine = BatchEngine(model.transformer, max_batch=8).start()
    req = engine.submit(model.tokenizer.encode("def fib(n):"), 32, SamplingParams(), stop_ids=model._stop_ids())
    print(model.tokenizer.decode(list(req)))
"""
from __future__ import annotations

from .engine import (BatchEngine, EngineClosedError, EngineStats, GenerationRequest, QueueFullError)
from .text import StopTextStream

__all__ = ["BatchEngine", "EngineClosedError", "EngineStats", "GenerationRequest", "QueueFullError",
           "StopTextStream"]
