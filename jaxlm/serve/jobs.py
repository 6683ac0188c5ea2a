"""One HTTP request's work: its sequences in the engine, and their events turned into OpenAI choices.

The engine's device thread hands each sequence's events to `Job.sink`, which only queues them onto the
request's event loop; everything textual (detokenising, stop strings, log-prob tables) happens here, on
the HTTP side. `Job.updates()` yields, per batch of events, the choices that moved: the text they may now
show, their new log-probs, and their finish reason once they end. Streamed and whole responses are both
built from these updates, so they cannot disagree.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .engine import Sequence
from .text import TextOut


class EngineError(Exception):
    """The engine failed a sequence (a server fault, answered 500)."""


@dataclass
class Choice:
    index: int
    seq: Sequence
    text: TextOut
    prompt_ids: list[int]
    want: int | None  # top log-probs per token (None: no log-probs)
    tokens: list[int] = field(default_factory=list)  # counted in usage: up to where the choice ended
    entries: list[tuple] = field(default_factory=list)  # (id, logprob | None, {id: logprob} | None) per token
    sent_entries: int = 0
    finish: str | None = None
    started: float | None = None  # first token's time
    ended: float | None = None


@dataclass
class Update:
    """What one choice gained in one batch of events."""

    choice: Choice
    text: str
    entries: list[tuple]
    finish: str | None


class Job:
    def __init__(self, engine, tokenizer, seqs: list[Sequence], prompts: list[list[int]], stops: list[str],
                 want: int | None, loop: asyncio.AbstractEventLoop, metrics=None):  # fmt: skip
        self.engine, self.tok, self.metrics = engine, tokenizer, metrics
        self.arrived = time.perf_counter()
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list[Choice] = []
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.first_token_at: float | None = None
        for i, s in enumerate(seqs):
            s.sink = self.sink
            self.choices.append(Choice(i, s, TextOut(tokenizer, stops), s.prompt, want))
        self._index = {id(c.seq): c for c in self.choices}

    # ---- the engine's thread ----------------------------------------------------------------------------
    def sink(self, seq: Sequence, events: list):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (seq, events))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # ---- the request's event loop -----------------------------------------------------------------------
    def submit(self):
        self.engine.submit([c.seq for c in self.choices])

    def cancel(self):
        """Free the engine of whatever has not finished (the client left, or the job is over)."""
        left = [c for c in self.choices if c.finish is None]
        for c in left:
            c.finish = "cancelled"
            if self.metrics is not None:
                self.metrics.choices.labels("cancelled").inc()
        self.engine.cancel([c.seq for c in left if not c.seq.cancelled])

    @property
    def done(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    async def updates(self):
        """Yield lists of `Update`s until every choice has finished."""
        while not self.done:
            seq, events = await self.queue.get()
            choice = self._index[id(seq)]
            if choice.finish is not None:
                continue
            update = self._apply(choice, events)
            if update is not None:
                yield [update]

    def _apply(self, c: Choice, events) -> Update | None:
        text, finish = "", None
        for ev in events:
            kind = ev[0]
            if kind == "prompt":
                _, lps, tops, top_ids = ev
                c.entries.append((c.prompt_ids[0], None, None))
                for i, tok in enumerate(c.prompt_ids[1:]):
                    c.entries.append((tok, float(lps[i]), self._top(tops[i], top_ids[i], tok, float(lps[i]), c.want)))
            elif kind == "token":
                _, tok, lp, top, top_ids = ev
                now = time.perf_counter()
                if c.started is None:
                    c.started = now
                    if self.first_token_at is None:
                        self.first_token_at = now
                        if self.metrics is not None:
                            self.metrics.ttft.observe(now - self.arrived)
                c.ended = now
                c.tokens.append(tok)
                if c.want is not None:
                    c.entries.append((tok, lp, self._top(top, top_ids, tok, lp, c.want)))
                if tok in c.seq.stop_ids:
                    finish = "stop"  # the stop id itself is not text
                else:
                    text += c.text.add(tok)
                    if c.text.stopped:
                        finish = "stop"
                        self.engine.cancel([c.seq])
                        break
            elif kind == "end":
                if ev[1] == "error":
                    raise EngineError(ev[2] if len(ev) > 2 else "the engine failed")
                if ev[1] == "cancelled":
                    finish = finish or "stop"
                else:
                    finish = finish or ev[1]
        if finish is not None:
            text += c.text.finish()
            c.finish = finish
            self._finished(c)
        new_entries = c.entries[c.sent_entries :]
        c.sent_entries = len(c.entries)
        if not text and not new_entries and finish is None:
            return None
        return Update(c, text, new_entries, finish)

    @staticmethod
    def _top(top, top_ids, tok, lp, want):
        if want is None:
            return None
        out = {int(i): float(v) for i, v in zip(top_ids[:want], top[:want], strict=True)}
        out.setdefault(int(tok), lp)  # the chosen token is always listed
        return out

    def _finished(self, c: Choice):
        if self.metrics is None:
            return
        self.metrics.choices.labels(c.finish).inc()
        self.metrics.completion_tokens.inc(len(c.tokens))
        if c.started is not None and len(c.tokens) > 1:
            self.metrics.tpot.observe((c.ended - c.started) / (len(c.tokens) - 1))

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    def usage(self) -> dict:
        p, n = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
