"""Continuous batching: many generations decode together, one batched forward per step.

A BatchEngine owns one background thread that runs the step loop over a Transformer:

1. requests waiting in the (bounded) queue join while the batch has room. A joining prompt rides in the
   step's batched forward (step 2) while the step's rows stay within the batch-invariant limit
   (batch_limit: the prompt's rows are then bitwise its solo prefill, and the decoding requests do not
   stop for it); a longer one is prefilled alone first, with the same code as a solo generation
   (pipower.generate.prefill on its own KV cache). Its first token is sampled from the prompt's last
   logits;
2. one `Transformer.forward_batch` runs the last token of every active request (and the joining
   prompts), each over its own cache (`last_only=True`), and each request's own Sampler picks its next
   token;
3. a request that sampled a stop id, reached max_tokens or filled its context leaves the batch; one that
   was cancelled leaves at the next step boundary.

On the compiled CPU engine a batched forward gives every sequence bitwise what a one-sequence forward
gives it while the batch has at most pipower._cpu.linear_ops.MAX_TOKENS rows, so each request's tokens
are exactly those of `Model.generate_ids` on the same prompt and sampling settings (greedy, or a seeded
sampler), whoever else is in the batch. The loop mirrors pipower.generate.generate_ids step for step.

Requests are handles (GenerationRequest) with a thread-safe token queue: `get()` blocks for the next
token (None at the end), `get_nowait()` polls, and an optional listener is called from the engine
thread after every new item (an async server uses it to wake its event loop). The engine never prints;
it logs to the `pipower` logger, and a failing step ends the requests it held with finish_reason
"error" instead of killing the thread.
"""
from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ContextLengthError, InvalidArgumentError, PipowerError
from ..generate import prefill
from ..ops import NumpyOps
from ..sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

# eos: a stop id was sampled; length: max_tokens; context: the KV cache is full;
# cancelled: cancel() or close(cancel=True); error: the model step raised (see GenerationRequest.error)
FINISH_REASONS = ("eos", "length", "context", "cancelled", "error")


class QueueFullError(PipowerError):
    """The engine's wait queue is full; try again later."""


class EngineClosedError(PipowerError):
    """The engine is shutting down (or shut down) and takes no new requests."""


class GenerationError(PipowerError):
    """The model step of a request failed; the original exception is the __cause__."""


_END = object()


class GenerationRequest:
    """One generation inside a BatchEngine: a handle for the consumer (one consumer per request).

    Attributes: id, prompt_tokens, completion_tokens (tokens delivered so far), finish_reason (None while
    running, else one of FINISH_REASONS), error (the exception when finish_reason is "error"), and
    monotonic timestamps submitted_at / first_token_at / finished_at.
    """

    def __init__(self, engine: BatchEngine, rid: str, prompt_ids: list[int], max_tokens: int,
                 params: SamplingParams, stop_ids: frozenset[int], listener: Callable[[], None] | None):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.params = params
        self.stop_ids = stop_ids
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._engine = engine
        self._listener = listener
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = False                       # the consumer has taken the end marker
        self._cancel = threading.Event()
        self._done = threading.Event()
        # engine-thread state
        self._sampler: Sampler | None = None
        self._cache = None
        self._next = 0

    def __repr__(self) -> str:
        return (f"<GenerationRequest {self.id}: {self.prompt_tokens} prompt tokens, {self.completion_tokens} "
                f"new, finish_reason={self.finish_reason}>")

    # -- consumer side ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once the engine has finished with this request (every token is in the queue)."""
        return self._done.is_set()

    def get(self, timeout: float | None = None) -> int | None:
        """The next token id, blocking; None when the generation is over (and on every later call).
        Raises queue.Empty after `timeout` seconds without one."""
        if self._ended:
            return None
        return self._item(self._queue.get(timeout=timeout))

    def get_nowait(self) -> int | None:
        """Like get() without waiting: raises queue.Empty when no new token is there yet."""
        if self._ended:
            return None
        return self._item(self._queue.get_nowait())

    def _item(self, item):
        if item is _END:
            self._ended = True
            return None
        return item

    def __iter__(self):
        """Token ids until the end; raises GenerationError if the model step failed."""
        while (token := self.get()) is not None:
            yield token
        if self.finish_reason == "error":
            raise GenerationError(f"generation {self.id} failed: {self.error}") from self.error

    def result(self, timeout: float | None = None) -> list[int]:
        """All (remaining) token ids once finished. Raises TimeoutError after `timeout` seconds and
        GenerationError if the model step failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"generation {self.id} not finished after {timeout} s")
        return list(self)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Stop this generation: a waiting request is dropped now, a running one at the next step
        boundary (finish_reason "cancelled"). No-op once finished."""
        if self._done.is_set():
            return
        self._cancel.set()
        self._engine._drop_pending(self)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- engine side --------------------------------------------------------------------------------
    def _notify(self) -> None:
        if self._listener is not None:
            try:
                self._listener()
            except Exception:                     # a consumer's hook must not break the engine
                log.exception("listener of request %s failed", self.id)

    def _put(self, token: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.completion_tokens += 1
        self._queue.put(token)
        self._notify()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason, self.error = reason, error
        self.finished_at = time.monotonic()
        self._cache = self._sampler = None        # the KV cache can go now
        self._done.set()
        self._queue.put(_END)
        self._notify()
        self._engine._count_finish(self)


@dataclass
class EngineStats:
    """Counters since the engine started (a snapshot: BatchEngine.stats())."""
    submitted: int = 0
    rejected: int = 0                  # refused at submit: queue full or closing
    completed: int = 0                 # finished with eos / length / context
    cancelled: int = 0
    failed: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0                     # batched decode forwards
    prefills_in_step: int = 0          # prompts prefilled inside a decode step's forward (not alone)
    step_rows: int = 0                 # sequences over all steps (step_rows / steps = mean batch size)
    max_rows: int = 0                  # the largest batch seen
    queued: int = 0                    # waiting now
    active: int = 0                    # decoding now

    @property
    def mean_batch(self) -> float:
        return self.step_rows / self.steps if self.steps else 0.0


def batch_limit(ops) -> int:
    """The largest batch for which every sequence gets its solo result: MAX_TOKENS rows on the compiled
    CPU engine; 1 on device engines (forward_batch runs one sequence there)."""
    if not isinstance(ops, NumpyOps):
        return 1
    try:
        from .._cpu.linear_ops import MAX_TOKENS
        return int(MAX_TOKENS)
    except Exception:                              # extension not built: the NumPy reference batches too
        return 64


class BatchEngine:
    """Continuous batching over one Transformer (see the module docstring).

    max_batch: sequences decoded together (at most batch_limit(transformer.ops)); max_queue: requests
    that may wait for a batch slot (beyond the free slots) before submit() raises QueueFullError;
    context: KV positions per request (None = the model's context length).
    """

    def __init__(self, transformer, *, max_batch: int = 8, max_queue: int = 64, context: int | None = None):
        limit = batch_limit(transformer.ops)
        if not 1 <= max_batch <= limit:
            raise InvalidArgumentError(f"max_batch must be in [1, {limit}] on the {transformer.ops.name} engine, "
                                       f"got {max_batch}")
        if max_queue < 0:
            raise InvalidArgumentError(f"max_queue must be >= 0, got {max_queue}")
        if context is not None and context < 2:
            raise InvalidArgumentError(f"context must be at least 2 positions, got {context}")
        self.transformer = transformer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context = transformer.new_cache(context).max_len
        self.vocab_size = transformer.config.vocab_size
        # rows of one step's forward (decoding tokens + riding prompts) that keep every row's solo result
        self._rows_limit = limit
        self._cond = threading.Condition()
        self._pending: collections.deque[GenerationRequest] = collections.deque()
        self._active: list[GenerationRequest] = []
        self._closing = False
        self._cancel_all = False                  # close(cancel=True): running requests end at the next step
        self._thread: threading.Thread | None = None
        self._stats = EngineStats()
        self._ids = itertools.count(1)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> BatchEngine:
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine was closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pipower-engine", daemon=True)
                self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """The step loop is alive and takes requests."""
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def close(self, cancel: bool = True, timeout: float | None = None) -> bool:
        """Take no new requests; cancel the waiting and running ones (cancel=True) or let them finish;
        then stop the thread. Returns False if the thread is still running after `timeout` seconds."""
        with self._cond:
            self._closing = True
            if cancel:
                self._cancel_all = True
                while self._pending:
                    self._pending.popleft()._finish("cancelled")
                for req in self._active:
                    req._cancel.set()
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> BatchEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> EngineStats:
        with self._cond:
            s = EngineStats(**{k: v for k, v in vars(self._stats).items()})
            s.queued, s.active = len(self._pending), len(self._active)
        return s

    # -- submitting ---------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], max_tokens: int, params: SamplingParams | None = None,
               stop_ids: Iterable[int] = (), *, listener: Callable[[], None] | None = None) -> GenerationRequest:
        """Queue a generation of up to max_tokens new tokens after prompt_ids; -> its handle.

        stop_ids: token ids that end the generation (not delivered), e.g. Model._stop_ids(). listener:
        called (from the engine thread, without arguments) after each token and at the end.
        Raises InvalidArgumentError / ContextLengthError for a bad request (empty prompt, ids outside the
        vocabulary, a prompt that leaves no room for a new token), QueueFullError when max_queue requests
        are already waiting, EngineClosedError once close() was called.
        """
        ids = self._check_prompt(prompt_ids)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
            raise InvalidArgumentError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
        params = params or SamplingParams()
        req = GenerationRequest(self, f"req-{next(self._ids)}", ids, int(max_tokens), params,
                                frozenset(int(i) for i in stop_ids), listener)
        with self._cond:
            if self._closing:
                self._stats.rejected += 1
                raise EngineClosedError("the server is shutting down")
            # free batch slots take requests at the next step; past those, max_queue may wait
            room = self.max_queue + max(self.max_batch - len(self._active), 0)
            if max_tokens > 0 and len(self._pending) >= room:
                self._stats.rejected += 1
                raise QueueFullError(f"{len(self._pending)} requests are waiting already (max_queue "
                                     f"{self.max_queue}); try again later")
            self._stats.submitted += 1
            if max_tokens == 0:                   # nothing to generate (generate_ids yields nothing)
                req._finish("length")
                return req
            self._pending.append(req)
            self._cond.notify_all()
        return req

    def _check_prompt(self, prompt_ids) -> list[int]:
        if isinstance(prompt_ids, (str, bytes, bytearray)):
            raise InvalidArgumentError("prompt_ids must be a sequence of token ids, not text")
        ids = []
        for i in prompt_ids:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise InvalidArgumentError(f"token ids must be integers, got {type(i).__name__}")
            ids.append(int(i))
        if not ids:
            raise InvalidArgumentError("empty prompt: give at least one token")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidArgumentError(f"token ids must be in [0, {self.vocab_size})")
        if len(ids) >= self.context:
            raise ContextLengthError(f"prompt of {len(ids)} tokens does not fit the context of {self.context} "
                                     f"(one position is needed for the first new token)")
        return ids

    def _drop_pending(self, req: GenerationRequest) -> None:
        with self._cond:
            try:
                self._pending.remove(req)
            except ValueError:
                return                            # running (dropped at the next step) or finished
        req._finish("cancelled")

    def _count_finish(self, req: GenerationRequest) -> None:
        with self._cond:
            s = self._stats
            s.generated_tokens += req.completion_tokens
            if req.finish_reason == "cancelled":
                s.cancelled += 1
            elif req.finish_reason == "error":
                s.failed += 1
            else:
                s.completed += 1

    # -- the step loop (engine thread) --------------------------------------------------------------
    def _run(self) -> None:
        log.debug("engine started: max_batch %d, max_queue %d, context %d", self.max_batch, self.max_queue,
                  self.context)
        while True:
            with self._cond:
                while not self._pending and not self._active and not self._closing:
                    self._cond.wait()
                if self._closing and not self._pending and not self._active:
                    break
                joining = []
                while self._pending and len(self._active) + len(joining) < self.max_batch:
                    joining.append(self._pending.popleft())
            try:
                self._iteration(joining)
            except Exception as e:                # a bug here must not kill the thread: fail what it held
                log.exception("engine step failed")
                for req in joining + self._active:
                    req._finish("error", e)
                with self._cond:
                    self._active = []
        log.debug("engine stopped")

    def _iteration(self, joining: list[GenerationRequest]) -> None:
        running = [r for r in self._active if not self._dropped(r)]
        rows = len(running) + len(joining)        # each joining prompt has >= 1 row
        riding = []                               # prompts prefilled inside this step's forward
        for req in joining:
            if self._dropped(req):
                continue
            extra = len(req.prompt_ids) - 1
            if self._rows_limit > 1 and rows + extra <= self._rows_limit:
                rows += extra
                req._sampler = Sampler(req.params)
                req._cache = self.transformer.new_cache(self.context)
                riding.append(req)
            elif self._start(req):                # prefilled alone, as a solo generation would be
                running.append(req)
            with self._cond:
                self._active = running + riding
        running = [r for r in running if not self._dropped(r)]
        if running or riding:
            self._step(running, riding)
            running = [r for r in running + riding if r.finish_reason is None]
        with self._cond:
            self._active = running

    def _dropped(self, req: GenerationRequest) -> bool:
        if req.finish_reason is not None:
            return True
        if req._cancel.is_set() or self._cancel_all:
            req._finish("cancelled")
            return True
        return False

    def _start(self, req: GenerationRequest) -> bool:
        """Prefill one request and sample its first token; True if it goes on decoding."""
        req._sampler = Sampler(req.params)
        req._cache = self.transformer.new_cache(self.context)
        try:
            logits = prefill(self.transformer, np.asarray(req.prompt_ids, dtype=np.int64), req._cache)
        except Exception as e:
            log.exception("prefill of %s failed", req.id)
            req._finish("error", e)
            return False
        with self._cond:
            self._stats.prefill_tokens += req.prompt_tokens
        return self._advance(req, logits)

    def _step(self, running: list[GenerationRequest], riding: list[GenerationRequest] = ()) -> None:
        """One batched forward over the last token of every running request and the whole prompt of
        every riding one (its prefill, rows within the batch-invariant limit)."""
        ids = [np.array([r._next], dtype=np.int64) for r in running] + \
              [np.asarray(r.prompt_ids, dtype=np.int64) for r in riding]
        seqs = list(running) + list(riding)
        try:
            out = self.transformer.forward_batch(ids, [r._cache for r in seqs], last_only=True)
        except Exception as e:
            log.exception("batched forward of %d sequences failed", len(seqs))
            for r in seqs:
                r._finish("error", e)
            return
        with self._cond:
            s = self._stats
            s.steps += bool(running)              # a forward of riding prompts only is no decode step
            s.step_rows += len(running)
            s.max_rows = max(s.max_rows, len(running))
            s.prefills_in_step += len(riding)
            s.prefill_tokens += sum(r.prompt_tokens for r in riding)
        for r, logits in zip(seqs, out):
            self._advance(r, logits[-1])

    def _advance(self, req: GenerationRequest, logits: np.ndarray) -> bool:
        """Sample from `logits` and deliver the token, as generate_ids does; True if the request goes on."""
        try:
            token = req._sampler(logits)
        except Exception as e:
            log.exception("sampling for %s failed", req.id)
            req._finish("error", e)
            return False
        if token in req.stop_ids:
            req._finish("eos")
            return False
        req._put(token)
        if req.completion_tokens >= req.max_tokens:
            req._finish("length")
            return False
        if req._cache.length >= req._cache.max_len:
            req._finish("context")
            return False
        req._next = token
        return True
