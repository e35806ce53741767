"""Token ids -> text pieces with stop strings, pushed one token at a time.

pipower.generate.stream_text pulls tokens from an iterator; a server gets them pushed from the engine.
StopTextStream is the same rule turned around: every piece it returns, joined, is exactly what
stream_text yields for the same tokens, decoder and stop strings (text that may be the start of a stop
string is held back until it is clearly not one; the first stop string cuts the text, unemitted).
"""
from __future__ import annotations

from collections.abc import Iterable

from ..generate import _held_back


class StopTextStream:
    """feed(token) -> new text ('' while held back); `stopped` once a stop string appeared (then stop
    feeding); finish() -> the rest when the tokens end without a stop string."""

    def __init__(self, stream_decoder, stop: Iterable[str] = ()):
        self._decoder = stream_decoder
        self.stop = [s for s in stop if s]
        self.text = ""                # all decoded text so far (may run past a stop string)
        self.emitted = 0              # characters of `text` handed out
        self.stopped = False

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        self.text += self._decoder.feed(token)
        text, emitted = self.text, self.emitted
        if self.stop:
            hits = [i for i in (text.find(s, max(emitted - len(s) + 1, 0)) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.stopped = True
                self.emitted = max(cut, emitted)
                return text[emitted:cut] if cut > emitted else ""
            safe = len(text) - _held_back(text, self.stop)
        else:
            safe = len(text)
        if safe > emitted:
            self.emitted = safe
            return text[emitted:safe]
        return ""

    def finish(self) -> str:
        """Flush the decoder and return what is left (nothing after a stop string)."""
        if self.stopped:
            return ""
        self.text += self._decoder.flush()
        rest = self.text[self.emitted:]
        self.emitted = len(self.text)
        return rest

    @property
    def output(self) -> str:
        """The text handed out so far."""
        return self.text[:self.emitted]
