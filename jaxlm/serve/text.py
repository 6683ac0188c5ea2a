"""A choice's token ids to text as they arrive: whole characters only, cut before the first stop string.

Streaming must not show text that a stop string will remove: what could still be the start of a stop
string is held back until the next tokens settle it (vLLM #3574, TGI #1039). Streamed and non-streamed
responses run the same code, so their texts are equal by construction.
"""

from __future__ import annotations

import codecs


class TextOut:
    """Feed token ids with `add`; each call returns the text now safe to show. `stopped` once a stop
    string appeared (the text ends before it); `finish()` returns what was held back at the end."""

    def __init__(self, tokenizer, stops: list[str] = ()):
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # decoded so far (up to the stop string, once stopped)
        self.sent = 0  # characters of `text` handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.text += self._utf8.decode(self.tok.decode_bytes([token_id]))
        if self.stops:
            hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
                return self._release(len(self.text))
            return self._release(len(self.text) - self._held())
        return self._release(len(self.text))

    def finish(self) -> str:
        """The rest, at the end of the choice (nothing can start a stop string any more)."""
        if not self.stopped:
            self.text += self._utf8.decode(b"", final=True)
        return self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest tail of the unsent text that begins some stop string."""
        tail = self.text[max(self.sent, len(self.text) - self.longest + 1) :]
        for k in range(len(tail), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.stops):
                return k
        return 0

    def _release(self, upto: int) -> str:
        out = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return out
