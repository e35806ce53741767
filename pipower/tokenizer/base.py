"""The Tokenizer interface every backend implements, and the incremental (streaming) decoder.

Decoding is defined once, here, on bytes: each backend says what bytes a token stands for
(`_render`), and both `decode` and `StreamDecoder` run those bytes through the same incremental
UTF-8 decoder. So a stream's pieces always join to exactly `decode(all ids)`, and a multibyte
character split across tokens (byte-fallback tokens, byte-level BPE) is only emitted once whole.
"""
from __future__ import annotations

import codecs
import re
from typing import Iterable

from ..errors import InvalidArgumentError, TokenizerError

# Token texts that end a turn or a document in the vocabularies we meet (the same list llama.cpp
# uses for its end-of-generation set). A model's eos id is always added on top.
END_OF_TURN_TEXTS = frozenset({
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
    "<|end_of_text|>", "<EOT>", "_<EOT>", "<end_of_utterance>", "<|return|>", "<|call|>",
    # code models: past these the model starts another file or repo, so generation is over
    "<|file_sep|>", "<|fim_pad|>", "<|repo_name|>", "<|fim_repo|>",
})


def stop_ids_for(token_of_id: Iterable[tuple[int, str]], *extra_ids: int | None) -> frozenset[int]:
    """Ids whose text is an end-of-turn marker, plus the given ids (eos, eot...) that are not None.

    Pass only special (control / added) tokens: an ordinary vocabulary entry that happens to read
    '<|endoftext|>' is text the model may legitimately write.
    """
    ids = {i for i, text in token_of_id if text in END_OF_TURN_TEXTS}
    ids.update(i for i in extra_ids if i is not None)
    return frozenset(ids)


def check_text(text: str, what: str = "text") -> None:
    """InvalidArgumentError when `text` cannot be UTF-8 encoded: lone surrogates, e.g. bytes that were
    not UTF-8 decoded with errors='surrogateescape' (how Python hands over such command-line arguments)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(f"{what} is not valid Unicode: lone surrogate {text[e.start]!r} at character "
                                   f"{e.start} (undecodable bytes? decode them as UTF-8 strictly)") from None


def special_pattern(texts: Iterable[str]) -> re.Pattern | None:
    """A regex matching any of `texts`, longest first, so '<|im_start|>' wins over a prefix of it."""
    texts = sorted({t for t in texts if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def split_special(text: str, pattern: re.Pattern | None):
    """Yield (is_special, fragment) pairs covering `text` in order; empty fragments are dropped."""
    if pattern is None:
        if text:
            yield False, text
        return
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            yield False, text[pos:m.start()]
        yield True, m.group()
        pos = m.end()
    if pos < len(text):
        yield False, text[pos:]


class Tokenizer:
    """Text <-> token ids for one model. Backends: spm.SpmTokenizer, bpe.BpeTokenizer, hf.*."""

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False               # the model's default for encode(add_bos=None)
    stop_ids: frozenset[int] = frozenset()
    chat_template: str | None = None
    strip_first_space: bool = False     # SentencePiece: decode drops the dummy-prefix space

    # --- what a backend implements -------------------------------------------------------------
    def _encode(self, text: str, parse_special: bool) -> list[int]:
        raise NotImplementedError

    def _render(self, token_id: int, skip_special: bool, first: bool) -> bytes | None:
        """Bytes of one token in decoded text; None when skipped (control token, skip_special).

        `first`: this is the first token rendered, where SentencePiece drops its dummy-prefix space.
        """
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` as stored (e.g. 'Ġthe', '▁the', '<0x0A>')."""
        raise NotImplementedError

    # --- shared behaviour ----------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first when `add_bos` (None: the model's default).

        parse_special: control / user-defined token strings in `text` (e.g. '<|im_start|>') become
        their single id, as the chat path of HF tokenizers and llama.cpp does. Pass False for
        untrusted text, so it cannot inject control tokens.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        check_text(text)
        ids = self._encode(text, parse_special)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        dec = StreamDecoder(self, skip_special=skip_special)
        return "".join(dec.feed(i) for i in ids) + dec.flush()

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes one token contributes to decoded text, special tokens included."""
        return self._render(self._check_id(token_id), False, False) or b""

    def stream_decoder(self, skip_special: bool = True, strip_first_space: bool | None = None):
        """A StreamDecoder for this tokenizer (see there)."""
        return StreamDecoder(self, skip_special=skip_special, strip_first_space=strip_first_space)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{'role': ..., 'content': ...}]) per the model's template."""
        from .chat import render_chat_template
        if not self.chat_template:
            raise TokenizerError("this model has no chat template (tokenizer.chat_template / "
                                 "tokenizer_config.json); pass a raw prompt instead")
        return render_chat_template(self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    bos_token=self._text_or_empty(self.bos_id),
                                    eos_token=self._text_or_empty(self.eos_id))

    def _text_or_empty(self, token_id: int | None) -> str:
        return "" if token_id is None else self.token_text(token_id)

    def _check_id(self, token_id) -> int:
        i = int(token_id)
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i} out of range [0, {self.vocab_size})")
        return i

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos})")


class StreamDecoder:
    """Incremental decoding for streaming: feed ids one at a time, get only the new text.

    A multibyte character whose bytes span several tokens is held back until complete, so no
    half character is ever emitted; invalid bytes become U+FFFD as soon as they are known to be
    invalid. The concatenation of every feed() result plus flush() equals tokenizer.decode(ids).

    strip_first_space: None follows decode() (SentencePiece drops the leading space of the first
    token); False keeps it, for text that continues a prompt (' Paris' after 'The capital is').
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True,
                 strip_first_space: bool | None = None):
        self._tok = tokenizer
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # `first` is only ever True for tokenizers whose decode strips a dummy-prefix space
        self._first = tokenizer.strip_first_space if strip_first_space is None else strip_first_space

    def feed(self, token_id) -> str:
        """The text completed by `token_id` (possibly '')."""
        data = self._tok._render(self._tok._check_id(token_id), self._skip, self._first)
        if data is None:
            return ""
        self._first = False
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
