"""The public Model: load once, then logits / generate / stream / chat."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .backend import make_ops
from .config import ModelConfig
from .errors import InvalidArgumentError, ModelFileError, TokenizerError
from .fetcher import KNOWN_MODELS, fetch
from .generate import GenerationStats, generate_ids, stream_text
from .model import INT_DOT_ONLY, INT_DOT_WEIGHTS, Transformer
from .ops import DOTS
from .sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)


class TextStream:
    """Iterator of text pieces; `.stats` is complete once it is exhausted (or closed)."""

    def __init__(self, pieces: Iterator[str], stats: GenerationStats):
        self._pieces, self.stats = pieces, stats

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()


class Model:
    def __init__(self, config: ModelConfig, transformer: Transformer, tokenizer, source: str,
                 fingerprint: str = ""):
        self.config = config
        self.transformer = transformer
        self.tokenizer = tokenizer          # None for a HF directory without tokenizer files
        self.source = source
        self.fingerprint = fingerprint
        self.last_stats: GenerationStats | None = None
        self.plan = None                    # pipower.hybrid ExecutionPlan when not on the CPU engine

    @property
    def backend(self) -> str:
        return self.transformer.ops.name

    # -- sparsity -------------------------------------------------------------------------------
    def set_sparsity(self, *, act_threshold: float | None = None, target_sparsity: float | None = None,
                     predictors=None, pred_threshold: float = 0.0) -> None:
        """Choose which FFN neurons each token computes (all by default).

        act_threshold: oracle mode, skip neurons with |act(gate . h)| <= tau_act (one value, all layers);
        target_sparsity: oracle mode with per-layer tau_act calibrated to skip that fraction;
        predictors (file or Predictors) + pred_threshold: skip neurons whose predictor logit < tau_pred.
        No argument: dense again. Measured skipping is in `last_stats.ffn_sparsity` after a generation.
        """
        from .sparse.modes import make_selector
        self.transformer.ffn_neurons = make_selector(
            self, act_threshold=act_threshold, target_sparsity=target_sparsity, predictors=predictors,
            pred_threshold=pred_threshold)

    @property
    def weights(self) -> str:
        """In-memory weight format: f32, f16, q8 or q4."""
        return self.transformer.weights

    @property
    def dot(self) -> str:
        """How q4 projections multiply: "int8" (integer dot products) or "float" (see load)."""
        return getattr(self.transformer.ops, "dot", "float")

    def __repr__(self) -> str:
        c = self.config
        return (f"<pipower.Model {Path(self.source).name}: {c.arch}, {c.num_hidden_layers} layers, "
                f"D={c.hidden_size}, F={c.intermediate_size}, backend={self.backend}, weights={self.weights}>")

    # -- numbers --------------------------------------------------------------------------------
    def logits(self, ids) -> np.ndarray:
        """float32 [len(ids), vocab] for the whole sequence, from a fresh cache."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise InvalidArgumentError("logits() needs at least one token id")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise InvalidArgumentError(f"token ids must be in [0, {self.config.vocab_size}), "
                                       f"got range [{ids.min()}, {ids.max()}]")
        cache = self.transformer.new_cache()
        from .generate import PREFILL_CHUNK
        return np.concatenate([self.transformer.forward(ids[s:s + PREFILL_CHUNK], cache)
                               for s in range(0, ids.size, PREFILL_CHUNK)])

    # -- text -----------------------------------------------------------------------------------
    def _require_tokenizer(self, need: str = "text prompts need one"):
        if self.tokenizer is None:
            raise TokenizerError(f"{self.source} has no tokenizer (no tokenizer.json / tokenizer.model): {need}. "
                                 f"Without one, give token ids to generate_ids() (returns the new token ids) "
                                 f"or logits()")
        return self.tokenizer

    def _prompt_ids(self, prompt) -> list[int]:
        """Token ids of `prompt`: str is encoded; a sequence of integers is taken as token ids. bytes are
        refused rather than guessed at (as a sequence they would read as byte values = token ids)."""
        if isinstance(prompt, str):
            return self._require_tokenizer().encode(prompt)
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(f"prompt is {type(prompt).__name__}: give text as str (e.g. "
                                       f"data.decode('utf-8')) or token ids as a list of int")
        try:
            arr = np.asarray(prompt)
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"prompt must be str or a sequence of token ids, got "
                                       f"{type(prompt).__name__}: {e}") from None
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise InvalidArgumentError(f"prompt must be str or a flat sequence of integer token ids, got "
                                       f"{type(prompt).__name__} ({arr.dtype}, shape {arr.shape})")
        ids = [int(i) for i in arr]
        if ids and (min(ids) < 0 or max(ids) >= self.config.vocab_size):
            raise InvalidArgumentError(f"token ids must be in [0, {self.config.vocab_size})")
        return ids

    def _stop_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.stop_ids)
        return ids

    def stream(self, prompt, max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop: Iterable[str] = (), draft=None) -> TextStream:
        """Iterator of text pieces as they are generated. `prompt`: text (str) or a list of token ids;
        bytes are refused (InvalidArgumentError): decode them first. The output is text, so the model needs
        a tokenizer even for an id prompt; without one, use generate_ids().

        The text continues the prompt, so a SentencePiece model's first piece keeps its leading space.

        draft: speculative decoding (pipower.speculative): "lookup", "sparse:0.5", "pred:FILE[:tau]",
        "act:TAU", combinations joined by "+", or a loaded Model with the same vocabulary. The model
        verifies every drafted token: greedy text is token for token the plain greedy text, sampling keeps
        the model's distribution; only speed changes. last_stats gains drafted / accepted.
        """
        ids = self._prompt_ids(prompt)
        tok = self._require_tokenizer("generate() and stream() return text, which needs one to decode the "
                                      "new tokens")
        return self._stream(ids, False, max_tokens, temperature, top_k, top_p, seed, stop, tok, draft)

    def _token_stream(self, ids, max_tokens, temperature, top_k, top_p, seed, draft=None) -> tuple:
        if max_tokens < 0:
            raise InvalidArgumentError(f"max_tokens must be >= 0, got {max_tokens}")
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, seed))
        stats = GenerationStats()
        self.last_stats = stats
        if draft is None:
            gen = generate_ids(self.transformer, ids, sampler, max_tokens, self._stop_ids(), stats)
        else:
            from .speculative import check_verifier, make_drafter, speculative_ids
            check_verifier(self.transformer.ops)
            gen = speculative_ids(self.transformer, ids, sampler, max_tokens, self._stop_ids(), stats,
                                  make_drafter(self, draft))
        token_ids = _count_sparsity(gen, self.transformer.ffn_neurons, stats)
        return token_ids, stats

    def _stream(self, ids, strip_first_space, max_tokens, temperature, top_k, top_p, seed, stop,
                tok, draft=None) -> TextStream:
        token_ids, stats = self._token_stream(ids, max_tokens, temperature, top_k, top_p, seed, draft)
        decoder = tok.stream_decoder(strip_first_space=strip_first_space)
        return TextStream(stream_text(token_ids, decoder, tuple(stop), stats), stats)

    def generate_ids(self, prompt, max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int | None = None, draft=None) -> list[int]:
        """The new token ids after `prompt` (token ids, or text when the model has a tokenizer), until an
        end-of-sequence id (not included) or max_tokens. Works without a tokenizer; stats in last_stats."""
        ids = self._prompt_ids(prompt)
        return list(self._token_stream(ids, max_tokens, temperature, top_k, top_p, seed, draft)[0])

    def generate(self, prompt, max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: Iterable[str] = (), draft=None) -> str:
        """The completion of `prompt` (str, or a list of token ids; not bytes) as one string, without the
        prompt. Needs a tokenizer for the text it returns: see generate_ids() for a model without one."""
        return "".join(self.stream(prompt, max_tokens, temperature, top_k, top_p, seed, stop, draft))

    def chat(self, messages: list[dict], **kwargs) -> str:
        """Apply the model's chat template to `messages` and generate the assistant's reply."""
        return "".join(self.stream_chat(messages, **kwargs))

    def chat_session(self, system: str | None = None, **kwargs):
        """A multi-turn conversation (pipower.chat.ChatSession) whose history stays in one KV cache:
        `session.send(text)` streams the reply and prefills only the new turn. kwargs: max_tokens,
        temperature, top_k, top_p, seed."""
        from .chat import ChatSession
        return ChatSession(self, system, **kwargs)

    def stream_chat(self, messages: list[dict], max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int | None = None, stop: Iterable[str] = (), draft=None
                    ) -> TextStream:
        """Like chat(), as an iterator of text pieces. The reply starts fresh: no leading space."""
        tok = self._require_tokenizer("chat needs one for its template and its text")
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        ids = tok.encode(prompt, add_bos=None, parse_special=True)
        return self._stream(ids, True, max_tokens, temperature, top_k, top_p, seed, stop, tok, draft)


def _count_sparsity(token_ids, selector, stats: GenerationStats):
    """Pass tokens through; when done, record the fraction of FFN neurons the selector skipped."""
    if selector is None or not hasattr(selector, "sparsity"):
        yield from token_ids
        return
    skipped0, total0 = selector.skipped, selector.total
    try:
        yield from token_ids
    finally:
        total = selector.total - total0
        stats.ffn_sparsity = (selector.skipped - skipped0) / total if total else 0.0


def resolve_source(source) -> str:
    """A known model name -> its fetched GGUF path; otherwise the path itself (checked to exist)."""
    s = str(source)
    # a known name wins over a same-named folder that is not a model (say, a results folder)
    is_model_path = os.path.isfile(s) or os.path.isfile(os.path.join(s, "config.json"))
    if s in KNOWN_MODELS and not is_model_path:
        return fetch(s)
    if not os.path.exists(s):
        raise ModelFileError(f"{s}: no such file or directory, and not a known model name "
                             f"({', '.join(sorted(KNOWN_MODELS))})")
    return s


def default_weights(path: str, ops) -> str:
    """GGUF sources run compact (q8) where the backend has kernels for it; HF directories and backends
    without compact kernels keep float32 (the NumPy reference would dequantize on every call)."""
    return "q8" if "q8" in ops.native_formats and not os.path.isdir(path) else "f32"


def default_dot(weights: str, device: str = "cpu") -> str:
    """Integer dot products by default where they are faster and checked on HumanEval: q4 and q8 weights on
    the CPU engine (weight panels, Qwen2.5-Coder-0.5B against the float path: decode 1.05x (q8) / 1.7x
    (q4), an 8-token forward 2.5-3x, a 512-token prefill ~2.5x; HumanEval Pass@1 unchanged,
    results/humaneval/qwen2.5-coder-0.5b-dots-v2). q4m has only integer dots. f32/f16 and the devices
    multiply in float."""
    return "int8" if weights in INT_DOT_WEIGHTS and device == "cpu" else "float"


def check_dot(dot: str | None, weights: str, device: str = "cpu") -> str:
    """The `dot` of load(): None -> default_dot; else validated against the weight format and device."""
    if weights in INT_DOT_ONLY and device != "cpu":
        raise InvalidArgumentError(f"{weights} weights run on the CPU engine only (integer dots), not device "
                                   f"{device!r}; use weights='q8'")
    if dot is None:
        return default_dot(weights, device)
    if dot not in DOTS:
        raise InvalidArgumentError(f"dot must be one of {', '.join(DOTS)}, got {dot!r}")
    if dot == "int8" and weights not in INT_DOT_WEIGHTS:
        raise InvalidArgumentError(f"dot='int8' (integer dot products) is implemented for q4, q8 and q4m weights, "
                                   f"not {weights}; use weights='q4' or 'q8', or dot='float'")
    if dot == "float" and weights in INT_DOT_ONLY:
        raise InvalidArgumentError(f"{weights} weights multiply with integer dots only (dot='int8'); for float "
                                   f"dots use weights='q4' or 'q8'")
    if dot == "int8" and device != "cpu":
        raise InvalidArgumentError(f"dot='int8' runs on the CPU engine only, not device {device!r}")
    return dot


def load(source, *, backend: str = "auto", threads: int | None = None, weights: str | None = None,
         progress: bool = True, device: str = "cpu", vram_budget: int | str | None = None,
         placement=None, stats=None, predictors=None, cache: bool = True, dot: str | None = None) -> Model:
    """Load a GGUF file, a Hugging Face model directory, or a known model name.

    weights: in-memory format of the weight matrices, f32 | f16 | q8 | q4 | q4m (pipower.quant), or
    "native" (GGUF only: each 4-bit matrix of the file (Q4_0 / Q4_1 / Q4_K) kept as q4m, every other one
    q8); None = q8 for GGUF on the compiled backend, else f32. GGUF tensors are dequantized once, then
    re-stored, except 4-bit tensors into q4m, which convert block by block (the file's nibbles, scales and
    minimums; pipower.loader.native). q4m and native run on the CPU engine's integer dots only; the sparse
    FFN modes run a q4m layer on q8 copies of its rows.
    device: cpu (default) | gpu | hybrid | offload (pipower.hybrid.engine); vram_budget: bytes or
    "4GiB", a hard limit on device memory; placement (file from `pipower plan`) or stats (file from
    `pipower profile`, solved at vram_budget) decide the hot neurons of "hybrid"; predictors: the
    predictor file you will use with set_sparsity, so the GPU plan counts its bytes.
    dot: "float" or "int8": how q4 / q8 projections multiply. "int8" quantizes activations per 32-block
    to int8 and sums 4/8-bit x int8 products exactly (pipower.intdot), like llama.cpp; None = "int8" for
    q4 and q8 weights on the CPU engine, else "float" (the only choice for f32/f16 and the devices).
    cache: a GGUF model on the CPU engine is prepared (converted, laid out for the backend) once and
    kept under $PIPOWER_HOME/prepared (pipower.model_cache); later loads read that instead. False:
    neither read nor write it. HF directories, GGUFs under 32 MiB and device gpu/hybrid/offload always
    build afresh.
    """
    from .tokenizer import tokenizer_from_gguf_metadata, tokenizer_from_hf_dir
    device_ops = None
    if isinstance(vram_budget, str):
        from .units import parse_bytes
        vram_budget = parse_bytes(vram_budget)
    if device == "cpu" and any(v is not None for v in (vram_budget, placement, stats, predictors)):
        raise InvalidArgumentError("vram_budget, placement, stats and predictors apply to device gpu/hybrid/offload, "
                                   "not to the CPU engine")
    if device != "cpu":
        from .hybrid.engine import DEVICES, device_ops_for
        if device not in DEVICES:
            raise InvalidArgumentError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        device_ops = device_ops_for(vram_budget)         # fails fast, before fetching or reading weights
    path = resolve_source(source)
    ops = make_ops(backend, threads)
    weights = weights or default_weights(path, ops)
    ops.dot = check_dot(dot, weights, device)
    key = None
    from . import model_cache
    if cache and device_ops is None and model_cache.worth_caching(path):
        key = model_cache.cache_key(path, weights, ops)
        hit = model_cache.load(key, ops)
        if hit is not None:
            log.info("loaded %s (%s backend, %s weights, %d threads, prepared-model cache)", path, ops.name,
                     weights, ops.n_threads)
            return Model(hit.config, hit.transformer, tokenizer_from_gguf_metadata(hit.tokenizer_meta),
                         key["source"], hit.fingerprint)
    from .loader import load_model_files
    files = load_model_files(path, progress=progress)
    if os.path.isdir(path):
        tokenizer = tokenizer_from_hf_dir(path)
    else:
        tokenizer = tokenizer_from_gguf_metadata(files.metadata)
    try:
        transformer = Transformer(files.config, files.tensors, ops, weights=weights)
    finally:
        files.close()
    log.info("loaded %s (%s backend, %s weights, %d threads)", path, ops.name, weights, ops.n_threads)
    if key is not None:
        model_cache.save(key, transformer, files.config,
                         {k: v for k, v in files.metadata.items() if k.startswith("tokenizer.")}, files.fingerprint)
    model = Model(files.config, transformer, tokenizer, files.source, files.fingerprint)
    if device_ops is not None:
        from .hybrid import to_device
        to_device(model, device, vram_budget=vram_budget, placement=placement, stats=stats,
                  predictors=predictors, device_ops=device_ops)
    return model
