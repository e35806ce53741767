"""SentencePiece-style BPE (GGUF `tokenizer.ggml.model == "llama"`), pure Python.

Same algorithm as sentencepiece's BPE encoder and llama.cpp's SPM tokenizer: spaces become '▁', a
dummy '▁' is prefixed to each text fragment, the text is split into characters, and the adjacent pair
whose concatenation is the highest-scoring vocabulary piece is merged, repeatedly (ties: leftmost
first). Characters no piece covers fall back to their UTF-8 bytes as `<0xXX>` tokens.
"""
from __future__ import annotations

import heapq
import logging
import re
from typing import Sequence

from ..errors import TokenizerError
from .base import Tokenizer, special_pattern, split_special, stop_ids_for

log = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type; sentencepiece's piece types use the same numbers)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # '▁', SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class SpmTokenizer(Tokenizer):
    """SentencePiece BPE from pieces + scores + types (as a GGUF or a .model file stores them)."""

    def __init__(self, tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                 bos_id: int | None = None, eos_id: int | None = None, unk_id: int | None = None,
                 add_bos: bool = True, add_space_prefix: bool = True,
                 chat_template: str | None = None, extra_stop_ids: Sequence[int] = ()):
        n = len(tokens)
        if len(scores) != n or len(types) != n:
            raise TokenizerError(f"SentencePiece vocab: {n} tokens but {len(scores)} scores and "
                                 f"{len(types)} token types")
        self.vocab_size = n
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.add_bos, self.add_space_prefix = add_bos, add_space_prefix
        self.strip_first_space = add_space_prefix
        self.chat_template = chat_template
        self._tokens = list(tokens)
        self._types = list(types)
        # Pieces text can merge into. Control/unknown/byte pieces never come from text (sentencepiece
        # keeps them out of its piece map too); unused pieces may be merged through but are never
        # emitted: they are split back into the two halves that formed them.
        self._score: dict[str, float] = {}
        self._emit: dict[str, int] = {}
        for i, (text, score, typ) in enumerate(zip(tokens, scores, types)):
            if typ in (NORMAL, USER_DEFINED, UNUSED) and text not in self._score:
                self._score[text] = float(score)
                if typ != UNUSED:
                    self._emit[text] = i
        self._byte_id = [None] * 256
        for i, (text, typ) in enumerate(zip(tokens, types)):
            m = _BYTE_PIECE.fullmatch(text)
            if typ == BYTE and m:
                self._byte_id[int(m.group(1), 16)] = i
        if None in self._byte_id:
            log.info("SentencePiece vocab has no byte tokens for %d byte values; unknown characters "
                     "map to the unknown token", self._byte_id.count(None))
        # llama.cpp splits out control/unknown tokens only when parsing specials, user-defined always
        self._special_all = special_pattern(
            t for t, typ in zip(tokens, types) if typ in (UNKNOWN, CONTROL, USER_DEFINED))
        self._special_user = special_pattern(t for t, typ in zip(tokens, types) if typ == USER_DEFINED)
        self._id_of = {t: i for i, t in enumerate(tokens)}
        self.stop_ids = stop_ids_for(((i, t) for i, (t, k) in enumerate(zip(tokens, types)) if k != NORMAL),
                                     eos_id, *extra_stop_ids)

    # --- encode --------------------------------------------------------------------------------
    def _encode(self, text: str, parse_special: bool) -> list[int]:
        out: list[int] = []
        pattern = self._special_all if parse_special else self._special_user
        for is_special, frag in split_special(text, pattern):
            if is_special:
                out.append(self._id_of[frag])
            else:
                # llama.cpp: every text fragment is first or follows a special token, and each
                # gets the dummy prefix
                out.extend(self._encode_fragment(frag))
        return out

    def _encode_fragment(self, text: str) -> list[int]:
        if self.add_space_prefix:
            text = " " + text
        return self._bpe(text.replace(" ", SPACE))

    def _bpe(self, text: str) -> list[int]:
        pieces = list(text)                       # current text of each symbol; '' once merged away
        n = len(pieces)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        score = self._score
        heap: list = []                           # (-score, left index, right index, merged text)
        unused_halves: dict[str, tuple[str, str]] = {}

        def push(left: int, right: int) -> None:
            merged = pieces[left] + pieces[right]
            s = score.get(merged)
            if s is not None:
                heapq.heappush(heap, (-s, left, right, merged))
                if merged not in self._emit:
                    unused_halves[merged] = (pieces[left], pieces[right])

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            # stale: one side was merged into something else since this pair was queued
            if nxt[left] != right or pieces[left] + pieces[right] != merged:
                continue
            pieces[left], pieces[right] = merged, ""
            nxt[left] = nxt[right]
            if nxt[right] != -1:
                prv[nxt[right]] = left
            if prv[left] != -1:
                push(prv[left], left)
            if nxt[left] != -1:
                push(left, nxt[left])

        out: list[int] = []
        i = 0
        while i != -1:
            self._emit_piece(pieces[i], unused_halves, out)
            i = nxt[i]
        return out

    def _emit_piece(self, piece: str, unused_halves: dict, out: list[int]) -> None:
        token = self._emit.get(piece)
        if token is not None:
            out.append(token)
        elif piece in unused_halves:
            for half in unused_halves[piece]:
                self._emit_piece(half, unused_halves, out)
        else:
            for b in piece.encode("utf-8"):
                token = self._byte_id[b]
                if token is None:
                    if self.unk_id is None:
                        raise TokenizerError(f"cannot encode byte 0x{b:02X}: the vocabulary has no "
                                             "byte token for it and no unknown token")
                    token = self.unk_id
                if out and out[-1] == token == self.unk_id:
                    continue                      # sentencepiece merges a run of unknowns into one
                out.append(token)

    # --- decode --------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        return self._tokens[token_id]

    def _render(self, token_id: int, skip_special: bool, first: bool) -> bytes | None:
        typ, text = self._types[token_id], self._tokens[token_id]
        if typ == CONTROL:
            return None if skip_special else text.encode("utf-8")
        if typ == BYTE:
            m = _BYTE_PIECE.fullmatch(text)
            return bytes([int(m.group(1), 16)]) if m else text.encode("utf-8")
        if typ == USER_DEFINED:
            return text.encode("utf-8")
        if typ == UNUSED:
            return b""
        if typ == UNKNOWN:
            return None if skip_special else " \u2047 ".encode("utf-8")   # sentencepiece's ' ⁇ '
        text = text.replace(SPACE, " ")
        if first and text.startswith(" "):
            text = text[1:]
        return text.encode("utf-8")
