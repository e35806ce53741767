"""Tokenizers of Hugging Face model directories: tokenizer.json (HF `tokenizers`) or tokenizer.model
(the `sentencepiece` library), with tokenizer_config.json for BOS/EOS, add_bos_token, added tokens
and the chat template, and generation_config.json for extra end-of-generation ids.

Encoding is delegated to those libraries (they define these models' behaviour). Decoding goes
through the shared byte-level path of base.py so streaming is exact; we read the tokenizer.json
decoder to know how a token maps to bytes (byte-level, or SentencePiece-style '▁' + <0xXX>).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..errors import TokenizerError
from .base import Tokenizer, stop_ids_for
from .bpe import ByteLevelRenderer
from .spm import BYTE, CONTROL, NORMAL, SPACE, UNKNOWN, UNUSED, USER_DEFINED, SpmTokenizer

log = logging.getLogger(__name__)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read: {e}") from e


def _token_str(v) -> str | None:
    """tokenizer_config stores a special token as a string or as {'content': ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _chat_template(d: Path, cfg: dict) -> str | None:
    jinja = d / "chat_template.jinja"             # newer transformers save it on its own
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = cfg.get("chat_template")
    if isinstance(t, list):                       # [{'name': 'default', 'template': ...}, ...]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    if t is None:
        t = _read_json(d / "chat_template.json").get("chat_template")
    return t if isinstance(t, str) else None


def _generation_eos_ids(gen: dict) -> list[int]:
    v = gen.get("eos_token_id")
    return [v] if isinstance(v, int) else [i for i in (v or []) if isinstance(i, int)]


def tokenizer_from_hf_dir(path) -> Tokenizer | None:
    """The tokenizer of an HF model directory, or None when it has no tokenizer files."""
    d = Path(path)
    cfg = {**_read_json(d / "special_tokens_map.json"), **_read_json(d / "tokenizer_config.json")}
    extra = dict(chat_template=_chat_template(d, cfg),
                 extra_stop_ids=_generation_eos_ids(_read_json(d / "generation_config.json")))
    if (d / "tokenizer.json").is_file():
        return HfJsonTokenizer(d / "tokenizer.json", cfg, **extra)
    if (d / "tokenizer.model").is_file():
        return SentencePieceTokenizer(d / "tokenizer.model", cfg, **extra)
    return None


class HfJsonTokenizer(Tokenizer):
    """A tokenizer.json run by HF `tokenizers`."""

    def __init__(self, path: Path, cfg: dict, chat_template: str | None = None, extra_stop_ids=()):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self._hf = HFTokenizer.from_file(str(path))
        except Exception as e:                    # the Rust side raises plain Exception
            raise TokenizerError(f"{path}: cannot load: {e}") from e
        hf = self._hf
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        added = hf.get_added_tokens_decoder()     # {id: AddedToken}
        special = frozenset(i for i, t in added.items() if t.special)
        self.bos_id = self._id_of(_token_str(cfg.get("bos_token")))
        self.eos_id = self._id_of(_token_str(cfg.get("eos_token")))
        self.add_bos = self._default_add_bos(cfg)
        self.chat_template = chat_template
        self.stop_ids = stop_ids_for(((i, t.content) for i, t in added.items()),
                                     self.eos_id, *extra_stop_ids)
        decoder = json.loads(hf.decoder.__getstate__()) if hf.decoder is not None else {}
        parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        kinds = {p.get("type") for p in parts}
        if "ByteLevel" in kinds:
            r = ByteLevelRenderer(self.token_text, special, frozenset(added))
            self._render_one = lambda i, skip, first: r.render(i, skip)
        elif kinds & {"Metaspace", "Replace", "ByteFallback"}:
            self.strip_first_space = any(
                (p.get("type") == "Strip" and p.get("content") == " " and p.get("start", 0) > 0)
                or (p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
                    and p.get("add_prefix_space", True))
                for p in parts)
            byte_fallback = "ByteFallback" in kinds
            self._render_one = lambda i, skip, first: self._render_spm(i, skip, first, special,
                                                                       added, byte_fallback)
        else:
            log.warning("%s: decoder %s not handled; decoding token by token", path, sorted(kinds))
            self._render_one = lambda i, skip, first: (
                None if skip and i in special else hf.decode([i], skip_special_tokens=False).encode())

    def _id_of(self, text: str | None) -> int | None:
        return None if text is None else self._hf.token_to_id(text)

    def _default_add_bos(self, cfg: dict) -> bool:
        if "add_bos_token" in cfg:
            return bool(cfg["add_bos_token"])
        if self.bos_id is None:
            return False
        # no explicit setting: does the post-processor put BOS first?
        plain = self._hf.encode("a", add_special_tokens=False).ids
        full = self._hf.encode("a", add_special_tokens=True).ids
        return len(full) > len(plain) and full[0] == self.bos_id

    def _encode(self, text: str, parse_special: bool) -> list[int]:
        # a flag on the shared HF object: not safe to encode from two threads at once
        self._hf.encode_special_tokens = not parse_special
        return self._hf.encode(text, add_special_tokens=False).ids

    def token_text(self, token_id: int) -> str:
        return self._hf.id_to_token(token_id) or ""

    def _render(self, token_id: int, skip_special: bool, first: bool) -> bytes | None:
        return self._render_one(token_id, skip_special, first)

    def _render_spm(self, i: int, skip: bool, first: bool, special, added, byte_fallback) -> bytes | None:
        if i in special:
            return None if skip else added[i].content.encode("utf-8")
        if i in added:
            return added[i].content.encode("utf-8")
        piece = self.token_text(i)
        m = _BYTE_PIECE.fullmatch(piece) if byte_fallback else None
        if m:
            return bytes([int(m.group(1), 16)])
        text = piece.replace(SPACE, " ")
        if first and text.startswith(" "):
            text = text[1:]
        return text.encode("utf-8")


class SentencePieceTokenizer(SpmTokenizer):
    """A tokenizer.model run by the `sentencepiece` library (its normalizer included).

    Special tokens are split out first (llama.cpp's way) and each text fragment is encoded by
    sentencepiece, which adds its own dummy prefix; decoding uses SpmTokenizer's rules.
    """

    def __init__(self, path: Path, cfg: dict, chat_template: str | None = None, extra_stop_ids=()):
        import sentencepiece
        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:                    # sentencepiece raises OSError/RuntimeError
            raise TokenizerError(f"{path}: cannot load: {e}") from e
        n = sp.get_piece_size()
        tokens = [sp.id_to_piece(i) for i in range(n)]
        scores = [sp.get_score(i) for i in range(n)]
        types = [BYTE if sp.is_byte(i) else CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i)
                 else UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
        # tokens tokenizer_config.json adds on top of (or re-marks inside) the .model vocabulary
        for key, t in sorted(cfg.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            i, typ = int(key), CONTROL if t.get("special") else USER_DEFINED
            if i < n:
                tokens[i], types[i] = t["content"], typ if types[i] != BYTE else BYTE
            elif i == len(tokens):
                tokens.append(t["content"]); scores.append(0.0); types.append(typ)
            else:
                raise TokenizerError(f"{path}: added token id {i} leaves a gap after {len(tokens) - 1}")
        ids = {t: i for i, t in enumerate(tokens)}
        bos = _token_str(cfg.get("bos_token"))
        eos = _token_str(cfg.get("eos_token"))
        super().__init__(tokens, scores, types,
                         bos_id=ids.get(bos) if bos else (sp.bos_id() if sp.bos_id() >= 0 else None),
                         eos_id=ids.get(eos) if eos else (sp.eos_id() if sp.eos_id() >= 0 else None),
                         unk_id=sp.unk_id() if sp.unk_id() >= 0 else None,
                         add_bos=bool(cfg.get("add_bos_token", True)), add_space_prefix=True,
                         chat_template=chat_template, extra_stop_ids=extra_stop_ids)
        self._sp = sp

    def _encode_fragment(self, text: str) -> list[int]:
        return self._sp.encode(text)
