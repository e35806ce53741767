"""Multi-turn chat that keeps the conversation in one KV cache: each turn prefills only its new tokens.

    session = pipower.chat.ChatSession(model, system="You are terse.")
    for piece in session.send("Hi"): print(piece, end="")
    for piece in session.send("And again?"): ...      # prefills only the new message, not the history

What the cache holds. Turn 1 feeds the chat template's rendering of [system, user] with the generation
prompt. After a reply the session renders the conversation again with the reply closed (the template's
end-of-turn text, e.g. "<|im_end|>\\n"), and the next turn feeds only what that rendering adds: the rest
of the closed turn plus the new user message and the generation prompt. The reply itself stays in the
cache as the model generated it, token for token, so the session's context is

    template(turn 1) + reply tokens + end of turn + template(turn 2 delta) + ...

That equals the template's rendering of the whole conversation as text whenever the template prints a
message's content unchanged (Qwen2.5, ChatML, the test models). Two known differences, both also in
llama.cpp's server: (1) the reply keeps the token split the model generated, which may differ from
encoding its text afresh (BPE prefers merged tokens; a model rarely generates unmerged ones); (2) a
template that trims content (Llama 3's `| trim`) renders the reply without its outer whitespace, while
the cache keeps it. A template that renders earlier turns differently once a message is added (one that
drops earlier reasoning, or moves the system prompt) no longer extends what was fed: the session then
re-reads the whole conversation from a fresh cache (logged at INFO), which is correct, only slower.

A turn interrupted part-way (the stream closed, Ctrl-C) keeps what was generated as the reply; the next
turn closes it and goes on. Everything is greedy-deterministic: the reply of a turn is token for token
what `generate_ids(session.ids)` gives from scratch (tests/test_chat.py).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

from .api import TextStream
from .errors import ContextLengthError, InvalidArgumentError, TokenizerError
from .generate import GenerationStats, generate_ids, stream_text
from .sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)


class ChatTurn(TextStream):
    """The text pieces of one reply, as they are generated (a Model.stream TextStream). `.stats` is
    complete once the iterator is exhausted or closed; `.reply_ids` are the token ids generated so far."""

    def __init__(self, pieces: Iterator[str], stats: GenerationStats, reply_ids: list[int], on_close=None):
        super().__init__(pieces, stats)
        self.reply_ids = reply_ids
        self._on_close = on_close

    def close(self) -> None:
        """Stop generating; the reply so far stays in the conversation."""
        super().close()
        if self._on_close is not None:          # a turn never iterated: its generator had no finally to run
            self._on_close()

    @property
    def text(self) -> str:
        """Exhaust the turn and return its whole reply text (what the pieces join to)."""
        return "".join(self)


class ChatSession:
    """A conversation with `model` (a pipower.Model with a tokenizer and a chat template).

    system: the system message (None: the template's default). max_tokens, temperature, top_k, top_p,
    seed: as in Model.generate; one sampler serves the whole session, so a seeded conversation repeats.
    """

    def __init__(self, model, system: str | None = None, *, max_tokens: int = 512, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        tok = model._require_tokenizer("chat needs one for its template and its text")
        if not tok.chat_template:
            raise TokenizerError(f"{model.source} has no chat template (tokenizer.chat_template / "
                                 f"tokenizer_config.json): chat needs one; use generate() with a raw prompt")
        if max_tokens < 0:
            raise InvalidArgumentError(f"max_tokens must be >= 0, got {max_tokens}")
        self.model, self.tokenizer = model, tok
        self.max_tokens = max_tokens
        self.sampler = Sampler(SamplingParams(temperature, top_k, top_p, seed))
        self.cache = model.transformer.new_cache()
        self.system = system
        self.last_stats: GenerationStats | None = None
        self._turn: ChatTurn | None = None
        self._open = None                   # (user message, reply ids, prompt text) of the turn under way
        self.reset()

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation (the system message stays); the cache is emptied, not reallocated."""
        self._close_open_turn()
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self._ids: list[int] = []           # every token of the conversation, fed or about to be
        self._rendered = ""                 # the template's rendering of self.messages (closed turns)
        self._pending_text = ""             # end of the last closed turn, not fed yet
        self._resync = False                # the next turn re-reads everything from a fresh cache
        self.cache.reset()

    def set_system(self, system: str | None) -> None:
        """Replace the system message (None or "": the template's default) and start over: the system
        message comes first in the context, so nothing cached can be kept."""
        self.system = system or None
        self.reset()

    @property
    def ids(self) -> list[int]:
        """The conversation's token ids so far, as the session fed them (a copy). After a turn, the last
        reply token may not be in the cache yet: the next turn feeds it first."""
        return list(self._ids)

    @property
    def context_length(self) -> int:
        return self.cache.max_len

    # -- a turn ---------------------------------------------------------------------------------
    def send(self, text: str) -> ChatTurn:
        """Add a user message and start the reply: a ChatTurn (iterator of text pieces). Only the
        tokens the cache lacks are prefilled. ContextLengthError when the conversation would not leave
        room for a reply token (nothing changes then: reset() and go on)."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"a chat message is str, got {type(text).__name__}")
        self._close_open_turn()
        tok = self.tokenizer
        user = {"role": "user", "content": text}
        prompt_text = tok.apply_chat_template(self.messages + [user], add_generation_prompt=True)
        fresh = self._resync or not self._ids or not prompt_text.startswith(self._rendered)
        if fresh:
            if self._ids:
                log.info("chat: the template renders the earlier turns differently now; re-reading the whole "
                         "conversation (%d tokens were cached)", len(self._ids))
            new_ids = tok.encode(prompt_text, add_bos=None, parse_special=True)
            base = []
        else:
            delta = self._pending_text + prompt_text[len(self._rendered):]
            new_ids = tok.encode(delta, add_bos=False, parse_special=True)
            base = self._ids
        total = len(base) + len(new_ids)
        if total >= self.cache.max_len:
            raise ContextLengthError(f"the conversation would be {total} tokens, past the context of "
                                     f"{self.cache.max_len} (one position is needed for the reply): start over "
                                     f"with reset()")
        if fresh:
            self.cache.reset()
        self._ids = base + new_ids
        feed = self._ids[self.cache.length:]          # the new tokens, after a reply token not fed yet
        stats = GenerationStats()
        self.last_stats = self.model.last_stats = stats
        transformer = self.model.transformer
        gen = generate_ids(transformer, feed, self.sampler, self.max_tokens, self.model._stop_ids(), stats,
                           cache=self.cache)
        from .api import _count_sparsity
        gen = _count_sparsity(gen, transformer.ffn_neurons, stats)
        reply: list[int] = []
        self._open = (user, reply, prompt_text)
        turn = ChatTurn(self._pieces(gen, reply, stats), stats, reply,
                        on_close=lambda: self._turn is turn and self._close_turn())
        self._turn = turn
        return turn

    def _pieces(self, gen, reply: list[int], stats) -> Iterator[str]:
        def tokens():
            for t in gen:
                reply.append(t)
                self._ids.append(t)
                yield t
        decoder = self.tokenizer.stream_decoder(strip_first_space=True)
        try:
            yield from stream_text(tokens(), decoder, (), stats)
        finally:
            gen.close()
            self._close_turn()

    def _close_open_turn(self) -> None:
        if self._turn is not None:
            self._turn.close()
        self._close_turn()

    def _close_turn(self) -> None:
        """Record the open turn's reply (once) and work out the end-of-turn text the next turn feeds first."""
        self._turn = None
        if self._open is None:
            return
        (user, reply, prompt_text), self._open = self._open, None
        dec = self.tokenizer.stream_decoder(strip_first_space=True)
        content = "".join(dec.feed(t) for t in reply) + dec.flush()
        messages = self.messages + [user, {"role": "assistant", "content": content}]
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        tail = _tail_after(rendered, prompt_text, content)
        self.messages, self._rendered = messages, rendered
        if tail is None:
            log.info("chat: cannot find the reply in the template's rendering of the conversation; the next "
                     "turn re-reads the whole conversation")
            self._pending_text, self._resync = "", True
        else:
            self._pending_text, self._resync = tail, False

    def rendered_context(self) -> str:
        """The text the session has fed so far (control tokens included), decoded from `ids`."""
        return b"".join(self.tokenizer.token_bytes(t) for t in self._ids).decode("utf-8", "replace")


def _tail_after(rendered: str, prompt_text: str, content: str) -> str | None:
    """The text `rendered` (the closed conversation) has after the reply, given that it starts with
    `prompt_text` (the conversation up to the generation prompt) followed by the reply as the template
    prints it: unchanged, or trimmed. None when it does not."""
    if not rendered.startswith(prompt_text):
        return None
    rest = rendered[len(prompt_text):]
    for shown in (content, content.strip(), content.rstrip(), content.lstrip()):
        if rest.startswith(shown):
            return rest[len(shown):]
    return None
