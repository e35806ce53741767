"""Byte-level BPE (GGUF `tokenizer.ggml.model == "gpt2"`), run by the HF `tokenizers` library.

The GGUF stores the vocabulary and merges but not the pre-tokenizer: `tokenizer.ggml.pre` names it,
and llama.cpp (src/llama-vocab.cpp) maps each name to a list of split regexes applied one after the
other, every piece (matched or not) kept. HF's Split(behavior="isolated") does exactly that, so the
pre-tokenizer here is Sequence(Split(r1), Split(r2), ..., ByteLevel(use_regex=False)).

Where llama.cpp rewrote a tokenizer.json regex for its own regex engine (`(?i:'s|...)` spelled out
as `'[sS]|...`), we use the original tokenizer.json regex: `tokenizers` runs it as the model's
trainers did.
"""
from __future__ import annotations

import logging
from typing import Sequence

from ..errors import TokenizerError
from .base import Tokenizer, stop_ids_for

log = logging.getLogger(__name__)

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (split regexes in order, llama.cpp's ignore_merges, llama.cpp's add_bos default)
# ignore_merges: a pre-token that is itself a vocabulary entry is emitted whole (Llama-3 does this).
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    # LLAMA_VOCAB_PRE_TYPE_DEFAULT (what llama.cpp runs for 'default' or an unknown name)
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False, False),
    "gpt-2": ((_GPT2,), False, False),
    # SmolLM / StarCoder: Digits(individual_digits=True) then the GPT-2 ByteLevel regex
    "smollm": ((r"\p{N}", _GPT2), False, False),
    "starcoder": ((r"\p{N}", _GPT2), False, False),
    "qwen2": ((_QWEN2,), False, False),
    "llama3": ((_LLAMA3,), True, True),
}
# names llama.cpp treats exactly like one of the above
_ALIASES = {
    "phi-2": "gpt-2", "mpt": "gpt-2", "olmo": "gpt-2",
    "refact": "smollm", "codeshell": "smollm",
    "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2", "megrez": "qwen2",
    "llama-bpe": "llama3", "llama-v3": "llama3", "falcon3": "llama3",
}
PRE_TOKENIZERS.update({alias: PRE_TOKENIZERS[name] for alias, name in _ALIASES.items()})


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7F-0xA0,
    0xAD) are moved to U+0100 upwards in byte order, so e.g. space is 'Ġ' and newline is 'Ċ'.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + shifted)
            shifted += 1
    return table


def build_hf_bpe(tokens: Sequence[str], merges: Sequence[str], pre: str):
    """A `tokenizers.Tokenizer` for a byte-level BPE vocabulary with llama.cpp's pre-tokenizer `pre`."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"unsupported tokenizer.ggml.pre {pre!r} for a gpt2 (byte-level BPE) "
                             f"vocabulary; supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    regexes, ignore_merges, _ = PRE_TOKENIZERS[pre]
    # One id per text, the first (llama.cpp keeps the first too): dict() keeps the last of equal keys.
    n = len(tokens)
    vocab = dict(zip(reversed(tokens), range(n - 1, -1, -1)))
    # A merge is 'left right'. Split at the first space, except where a merge starts with a space (a
    # vocabulary whose tokens may start with ' ': then the cut is the first space after the first
    # character). The C-level split is ~5x faster than a Python loop over 150k merges.
    if any(m[:1] == " " for m in merges):
        pairs = [_split_merge(m) for m in merges]
    else:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    try:
        model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False,
                           byte_fallback=False)
    except Exception as e:                    # noqa: BLE001 - `tokenizers` raises plain Exception
        _check_merges(merges, vocab)          # names the damaged merge, when that is the cause
        raise TokenizerError(f"cannot build the BPE tokenizer from this vocabulary: {e}") from e
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()         # unused by BpeTokenizer; makes hf.save() complete
    return hf


def _split_merge(m: str) -> tuple[str, str]:
    cut = m.find(" ", 1)                      # left is at least one character, which may be ' '
    if cut < 0:
        raise TokenizerError(f"malformed BPE merge {m!r} (expected 'left right')")
    return m[:cut], m[cut + 1:]


def _check_merges(merges: Sequence[str], vocab: dict) -> None:
    """Raise a TokenizerError naming the first merge that is malformed or names a text missing from the
    vocabulary (left, right or their concatenation): what `tokenizers` refuses with a bare Exception.
    Run only after `tokenizers` refused, so a good vocabulary pays nothing for it."""
    for m in merges:
        left, right = _split_merge(m)
        for t in (left, right, left + right):
            if t not in vocab:
                raise TokenizerError(f"BPE merge {m!r} names {t!r}, which is not in the vocabulary")


class ByteLevelRenderer:
    """Token id -> bytes for byte-level vocabularies (shared by the GGUF and tokenizer.json paths)."""

    def __init__(self, token_text, special_ids: frozenset[int], verbatim_ids: frozenset[int] = frozenset()):
        self._text = token_text               # id -> vocabulary string
        self._special = special_ids           # skipped by decode(skip_special=True)
        self._verbatim = verbatim_ids         # added tokens: their text as-is, not byte-mapped
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self._cache: dict[int, bytes] = {}

    def render(self, token_id: int, skip_special: bool) -> bytes | None:
        if token_id in self._special:
            return None if skip_special else self._text(token_id).encode("utf-8")
        data = self._cache.get(token_id)
        if data is None:
            text = self._text(token_id)
            if token_id in self._verbatim:
                data = text.encode("utf-8")
            else:
                try:
                    data = bytes(self._byte_of[c] for c in text)
                except KeyError:              # not a byte-level string: HF keeps its UTF-8 as-is
                    data = text.encode("utf-8")
            self._cache[token_id] = data
        return data


class BpeTokenizer(Tokenizer):
    """Byte-level BPE from a GGUF vocabulary (tokens, token types, merges, pre-tokenizer name)."""

    def __init__(self, tokens: Sequence[str], types: Sequence[int], merges: Sequence[str], pre: str, *,
                 bos_id: int | None = None, eos_id: int | None = None, add_bos: bool | None = None,
                 chat_template: str | None = None, extra_stop_ids: Sequence[int] = ()):
        from tokenizers import AddedToken

        if len(types) != len(tokens):
            raise TokenizerError(f"BPE vocab: {len(tokens)} tokens but {len(types)} token types")
        self._hf = build_hf_bpe(tokens, merges, pre)
        # Control tokens are special (matched only when parsing specials, skipped by decode);
        # user-defined ones are plain added tokens: always matched whole, always rendered. This is
        # how both llama.cpp and HF tokenizers treat them.
        # One pass over the types: all but a few hundred ids are normal tokens (type 1).
        by_type: dict[int, list[int]] = {}
        for i, k in enumerate(types):
            if k != NORMAL:
                by_type.setdefault(k, []).append(i)
        control, user = by_type.get(CONTROL, []), by_type.get(USER_DEFINED, [])
        self._hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
        self._hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
        self._tokens = list(tokens)
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = PRE_TOKENIZERS[pre][2] if add_bos is None else add_bos
        self.chat_template = chat_template
        control, user = frozenset(control), frozenset(user)
        self._unused = frozenset(by_type.get(UNUSED, ()))
        self._renderer = ByteLevelRenderer(self._tokens.__getitem__, control, user)
        self.stop_ids = stop_ids_for(((i, tokens[i]) for i in control | user), eos_id, *extra_stop_ids)

    def _encode(self, text: str, parse_special: bool) -> list[int]:
        # a flag on the shared HF object: not safe to encode from two threads at once
        self._hf.encode_special_tokens = not parse_special
        return self._hf.encode(text, add_special_tokens=False).ids

    def token_text(self, token_id: int) -> str:
        return self._tokens[token_id]

    def _render(self, token_id: int, skip_special: bool, first: bool) -> bytes | None:
        if token_id in self._unused:
            return b""                        # padding rows of the embedding ([PAD151665] ...)
        return self._renderer.render(token_id, skip_special)
