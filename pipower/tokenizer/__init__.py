"""Tokenizers: text <-> token ids, streaming decode, chat templates.

    tok = tokenizer_from_gguf_metadata(read_gguf_metadata("model.gguf"))
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
    dec = tok.stream_decoder(); text = "".join(dec.feed(i) for i in ids) + dec.flush()
"""
from .base import StreamDecoder, Tokenizer
from .from_gguf import tokenizer_from_gguf_metadata
from .gguf_meta import read_gguf_metadata
from .hf import tokenizer_from_hf_dir

__all__ = ["Tokenizer", "StreamDecoder", "tokenizer_from_gguf_metadata", "tokenizer_from_hf_dir",
           "read_gguf_metadata"]
