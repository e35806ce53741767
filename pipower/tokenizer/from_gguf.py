"""Build the right Tokenizer from GGUF metadata (`tokenizer.ggml.*` keys)."""
from __future__ import annotations

import logging

from ..errors import TokenizerError
from .base import Tokenizer

log = logging.getLogger(__name__)


def _need(meta: dict, key: str):
    if key not in meta:
        raise TokenizerError(f"GGUF metadata has no {key!r}; cannot build the tokenizer")
    return meta[key]


def _token_id(meta: dict, key: str, n_vocab: int) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    if not 0 <= int(v) < n_vocab:
        # llama.cpp ignores an out-of-range special id too (with a warning)
        log.warning("GGUF %s = %s is outside the vocabulary (%d tokens); ignored", key, v, n_vocab)
        return None
    return int(v)


def tokenizer_from_gguf_metadata(meta: dict) -> Tokenizer:
    """The tokenizer a GGUF file describes. `meta` maps keys to Python values (read_gguf_metadata).

    tokenizer.ggml.model 'llama' -> SentencePiece BPE (spm.py); 'gpt2' -> byte-level BPE (bpe.py).
    """
    model = _need(meta, "tokenizer.ggml.model")
    tokens = _need(meta, "tokenizer.ggml.tokens")
    types = _need(meta, "tokenizer.ggml.token_type")
    n = len(tokens)
    ids = {name: _token_id(meta, f"tokenizer.ggml.{name}_token_id", n)
           for name in ("bos", "eos", "unknown", "eot", "eom")}
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    common = dict(bos_id=ids["bos"], eos_id=ids["eos"], chat_template=meta.get("tokenizer.chat_template"),
                  extra_stop_ids=[i for i in (ids["eot"], ids["eom"]) if i is not None])
    if model == "llama":
        from .spm import SpmTokenizer
        return SpmTokenizer(tokens, _need(meta, "tokenizer.ggml.scores"), types,
                            unk_id=ids["unknown"], add_bos=True if add_bos is None else bool(add_bos),
                            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                            **common)
    if model == "gpt2":
        from .bpe import BpeTokenizer
        if meta.get("tokenizer.ggml.add_space_prefix"):
            log.warning("tokenizer.ggml.add_space_prefix is set on a gpt2 vocabulary; ignored")
        return BpeTokenizer(tokens, types, _need(meta, "tokenizer.ggml.merges"),
                            _need(meta, "tokenizer.ggml.pre"),
                            add_bos=None if add_bos is None else bool(add_bos), **common)
    raise TokenizerError(f"unsupported tokenizer.ggml.model {model!r} (supported: 'llama', 'gpt2')")
