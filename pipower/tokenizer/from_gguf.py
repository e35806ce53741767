"""Build the right Tokenizer from GGUF metadata (`tokenizer.ggml.*` keys)."""
from __future__ import annotations

import logging

from ..errors import TokenizerError
from .base import Tokenizer

log = logging.getLogger(__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bad(key: str, v, expected: str) -> TokenizerError:
    if isinstance(v, list):
        shown = f"an array of {len(v)} ({', '.join(sorted({type(x).__name__ for x in v})) or 'empty'})"
    else:
        shown = repr(v)[:80]
    return TokenizerError(f"damaged GGUF tokenizer metadata: {key} is {shown}, expected {expected}")


def _need(meta: dict, key: str):
    if key not in meta:
        raise TokenizerError(f"GGUF metadata has no {key!r}; cannot build the tokenizer")
    return meta[key]


def _str(meta: dict, key: str) -> str:
    v = _need(meta, key)
    if not isinstance(v, str):
        raise _bad(key, v, "a string")
    return v


def _list(meta: dict, key: str, types: frozenset, expected: str, n: int | None = None) -> list:
    """meta[key], checked to be a list whose items' exact types are all in `types` (bool is not int):
    one C-level pass (set(map(type, v))), ~5 ms for a 150k vocabulary where a per-item Python check
    took ~50 ms of every load."""
    v = _need(meta, key)
    if not isinstance(v, list) or not set(map(type, v)) <= types:
        raise _bad(key, v, f"an array of {expected}")
    if n is not None and len(v) != n:
        raise TokenizerError(f"damaged GGUF tokenizer metadata: {key} has {len(v)} entries for {n} tokens")
    return v


_STRS, _INTS, _REALS = frozenset({str}), frozenset({int}), frozenset({int, float})


def _flag(meta: dict, key: str) -> bool | None:
    v = meta.get(key)
    if v is not None and not _is_int(v) and not isinstance(v, bool):
        raise _bad(key, v, "a bool")
    return None if v is None else bool(v)


def _token_id(meta: dict, key: str, n_vocab: int) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    if not _is_int(v):
        raise _bad(key, v, "an integer token id")
    if not 0 <= v < n_vocab:
        # llama.cpp ignores an out-of-range special id too (with a warning)
        log.warning("GGUF %s = %s is outside the vocabulary (%d tokens); ignored", key, v, n_vocab)
        return None
    return int(v)


def tokenizer_from_gguf_metadata(meta: dict) -> Tokenizer:
    """The tokenizer a GGUF file describes. `meta` maps keys to Python values (read_gguf_metadata).

    tokenizer.ggml.model 'llama' -> SentencePiece BPE (spm.py); 'gpt2' -> byte-level BPE (bpe.py).
    Every value is checked for type (and arrays for length) first: damaged metadata is a TokenizerError.
    """
    model = _str(meta, "tokenizer.ggml.model")
    if model not in ("llama", "gpt2"):
        raise TokenizerError(f"unsupported tokenizer.ggml.model {model!r} (supported: 'llama', 'gpt2')")
    tokens = _list(meta, "tokenizer.ggml.tokens", _STRS, "strings")
    if not tokens:
        raise TokenizerError("damaged GGUF tokenizer metadata: tokenizer.ggml.tokens is empty")
    n = len(tokens)
    types = _list(meta, "tokenizer.ggml.token_type", _INTS, "integers", n)
    ids = {name: _token_id(meta, f"tokenizer.ggml.{name}_token_id", n)
           for name in ("bos", "eos", "unknown", "eot", "eom")}
    add_bos = _flag(meta, "tokenizer.ggml.add_bos_token")
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise _bad("tokenizer.chat_template", template, "a string")
    common = dict(bos_id=ids["bos"], eos_id=ids["eos"], chat_template=template,
                  extra_stop_ids=[i for i in (ids["eot"], ids["eom"]) if i is not None])
    space_prefix = _flag(meta, "tokenizer.ggml.add_space_prefix")
    if model == "llama":
        from .spm import SpmTokenizer
        scores = _list(meta, "tokenizer.ggml.scores", _REALS, "numbers", n)
        return SpmTokenizer(tokens, scores, types,
                            unk_id=ids["unknown"], add_bos=True if add_bos is None else add_bos,
                            add_space_prefix=True if space_prefix is None else space_prefix,
                            **common)
    from .bpe import BpeTokenizer
    if space_prefix:
        log.warning("tokenizer.ggml.add_space_prefix is set on a gpt2 vocabulary; ignored")
    merges = _list(meta, "tokenizer.ggml.merges", _STRS, "strings")
    return BpeTokenizer(tokens, types, merges, _str(meta, "tokenizer.ggml.pre"), add_bos=add_bos, **common)
