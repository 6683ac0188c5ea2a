"""Continuous batching: a fixed number of slots, each decoding one sequence, on one device thread.

Sequences wait in a FIFO queue. Between two decode steps the engine admits waiting sequences into free
slots: each prompt is prefilled alone (its length bucket) straight into its slot's KV cache and its first
token drawn at once; then one step decodes a token for every busy slot (their count rounded up to a row
bucket of the programs). While any slot is decoding, one gap admits prompts up to `prefill_budget` tokens
(at least one prompt), so the others wait at most that long for their next token; the n choices of one
prompt share its prefill (a cache copy). Each slot's sampling settings, penalties, seed, stop ids and
length are rows of arrays handed to the step, so the programs compiled at start serve any mix of requests
(`jaxlm.serve.programs`).

A slot is freed when its sequence reaches `max_tokens`, draws a stop id, or is cancelled (its client
left, or a stop string ended it; checked before every step). The device thread does no text work: it
hands each sequence's token ids to the sequence's `sink` (the HTTP side, which detokenises on its own
thread) once per step.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..utils.buckets import bucket
from .programs import Programs

log = logging.getLogger("jaxlm.serve")


class QueueFull(Exception):
    """More sequences than the queue takes: try again later."""


@dataclass(eq=False)
class Sequence:
    """One choice of one prompt, as the engine decodes it. `sink(seq, events)` is called on the device
    thread with a list of events: ("prompt", logprobs [T-1], top [T-1, 5], top_ids [T-1, 5]) first if
    `echo`, ("token", id, logprob, top [5], top_ids [5]) per token (the log-probs None unless `logprobs`),
    and ("end", reason) last: "length", "stop" (a stop id), "cancelled" or "error"."""

    prompt: list[int]
    max_tokens: int
    sink: Callable
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    choice: int = 0  # which of the n choices: its draws differ from the others'
    logprobs: bool = False
    echo: bool = False
    stop_ids: frozenset = frozenset()
    cancelled: bool = False
    # the engine's: the slot it holds (-1: none), tokens drawn so far, the last one
    slot: int = -1
    generated: int = 0
    last: int = -1


class Engine:
    """The device loop. `submit` and `cancel` may be called from any thread."""

    def __init__(self, programs: Programs, *, max_queue: int = 256, prefill_budget: int = 256):
        self.p = programs
        self.N = programs.slots
        self.max_queue, self.prefill_budget = max_queue, prefill_budget
        self.cache, self.counts = programs.new_cache(), programs.new_counts()
        self.slots: list[Sequence | None] = [None] * self.N
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # per-slot rows handed to every step (host copies; a free slot keeps harmless values)
        N = self.N
        self.fed = np.zeros(N, np.int32)  # the token each slot is fed next (its last drawn one)
        self.pos = np.zeros(N, np.int32)  # that token's position = the cache slot it is written at
        self.fresh = np.zeros(N, bool)  # the fed token is the sequence's first: its counts start afresh
        self.seed = np.zeros((N, 2), np.uint32)
        self.choice = np.zeros(N, np.int32)
        self.temperature = np.zeros(N, np.float32)
        self.top_p = np.ones(N, np.float32)
        self.top_k = np.zeros(N, np.int32)
        self.presence = np.zeros(N, np.float32)
        self.frequency = np.zeros(N, np.float32)
        self.steps = self.prefills = 0

    # ---- any thread -------------------------------------------------------------------------------------
    def start(self):
        self._thread = threading.Thread(target=self._run, name="jaxlm-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None):
        """Finish what is queued and running, then end the device thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, seqs: list[Sequence]):
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free = sum(s is None for s in self.slots)
            if len(self.waiting) + len(seqs) - free > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting for a slot (at most {self.max_queue})")
            self.waiting.extend(seqs)
            self._cv.notify_all()

    def cancel(self, seqs: list[Sequence]):
        """Stop these sequences: a waiting one leaves the queue, a running one frees its slot before the next step."""
        with self._cv:
            for s in seqs:
                s.cancelled = True
            gone = [s for s in seqs if s.slot < 0 and s in self.waiting]
            for s in gone:
                self.waiting.remove(s)
            self._cv.notify_all()
        for s in gone:
            s.sink(s, [("end", "cancelled")])

    def stats(self) -> dict:
        busy = sum(s is not None for s in self.slots)
        return {"slots_busy": busy, "slots_free": self.N - busy, "slots": self.N, "queue": len(self.waiting)}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the device thread ------------------------------------------------------------------------------
    def _run(self):
        while True:
            with self._cv:
                while not self.waiting and not self._busy() and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self.waiting and not self._busy():
                    return
            try:
                self._admit()
                self._drop_cancelled()
                if self._busy():
                    self._step()
            except Exception as e:  # a bug, not a request's fault: fail what runs, keep serving
                log.exception("engine step failed")
                self._fail_all(e)

    def _busy(self) -> bool:
        return any(s is not None for s in self.slots)

    def _admit(self):
        decoding = self._busy()
        spent = 0
        shared: dict[tuple, tuple] = {}  # prompt -> (slot, logits, echo) prefilled in this gap
        while True:
            with self._cv:
                free = [i for i, s in enumerate(self.slots) if s is None]
                if not free or not self.waiting:
                    return
                seq = self.waiting[0]
                key = (seq.echo, *seq.prompt)
                cost = 0 if key in shared else bucket(len(seq.prompt), self.p.lengths)
                if decoding and spent and spent + cost > self.prefill_budget:
                    return
                self.waiting.popleft()
                seq.slot = free[0]
                self.slots[seq.slot] = seq
            spent += cost
            i = seq.slot
            self._prefill(seq, shared.get(key), shared, key)
            if self.slots[i] is not seq:  # it ended at its first token: its slot may be reused at once
                shared.pop(key, None)

    def _prefill(self, seq: Sequence, done, shared, key):
        i = seq.slot
        if done is None:
            logits, hidden, self.cache = self.p.prefill(self.cache, seq.prompt, i)
            self.prefills += 1
            echo = self.p.prompt_logprobs(hidden, seq.prompt) if seq.echo else None
            shared[key] = (i, logits, echo)
        else:
            src, logits, echo = done
            self.cache = self.p.copy(self.cache, src, i)
        self._set_row(seq)
        T = len(seq.prompt)
        rows = self._rows([i], position=np.array([T], np.int32))
        zeros = np.zeros((1, self.p.c.vocab_size), np.int32)
        no = np.zeros(1, bool)
        out = self.p.sample(_mode([seq]), logits, zeros, np.zeros(1, np.int32), no, no, *rows)
        if seq.logprobs:
            out = (*out, *self.p.logprobs(logits, out[0]))
        self.pos[i], self.fresh[i] = T - 1, True  # _deliver moves it on to the drawn token at T
        self._deliver([seq], out, first=[("prompt", *echo)] if seq.echo else [])

    def _set_row(self, seq: Sequence):
        i = seq.slot
        self.seed[i] = divmod(seq.seed % 2**64, 2**32)
        self.choice[i] = seq.choice
        self.temperature[i] = seq.temperature
        self.top_p[i] = seq.top_p
        self.top_k[i] = seq.top_k
        self.presence[i] = seq.presence_penalty
        self.frequency[i] = seq.frequency_penalty

    def _rows(self, idx, position):
        return (self.seed[idx], self.choice[idx], position, self.temperature[idx], self.top_p[idx], self.top_k[idx],
                self.presence[idx], self.frequency[idx])  # fmt: skip

    def _step(self):
        """One token for every busy slot: the step runs a row bucket's worth of slots, the busy ones first,
        then free ones (they draw nothing and write only into their own, unused, cache rows)."""
        busy = [i for i, s in enumerate(self.slots) if s is not None]
        R = bucket(len(busy), self.p.rows)
        idx = np.array(busy + [i for i, s in enumerate(self.slots) if s is None][: R - len(busy)], np.int32)
        live = np.arange(R) < len(busy)
        running = [self.slots[i] for i in busy]
        logits, self.cache = self.p.step(self.cache, idx, self.fed[idx], self.pos[idx])
        rows = self._rows(idx, position=self.pos[idx] + 1)
        out = self.p.draw(_mode(running), logits, self.counts, idx, self.fed[idx], self.fresh[idx] & live, live, *rows)
        self.counts = out[1]
        if any(s.logprobs for s in running):
            out = (*out, *self.p.logprobs(logits, out[0]))
        self.fresh[:] = False
        self.steps += 1
        self._deliver(running, out)

    def _deliver(self, seqs, out, first=()):
        """Hand each sequence its new token (row j of `out` for the j-th: a step runs the busy slots first, in
        order), after `first` events; move its slot on to feed it; free the slots of those that ended."""
        tokens = np.asarray(out[0])
        lp, top, top_ids = (np.asarray(x) for x in out[2:]) if len(out) > 2 else (None, None, None)
        for r, s in enumerate(seqs):
            tok = int(tokens[r])
            s.last, s.generated = tok, s.generated + 1
            self.fed[s.slot], self.pos[s.slot] = tok, self.pos[s.slot] + 1
            events = list(first)
            if s.logprobs:
                events.append(("token", tok, float(lp[r]), top[r].tolist(), top_ids[r].tolist()))
            else:
                events.append(("token", tok, None, None, None))
            end = "stop" if tok in s.stop_ids else "length" if s.generated >= s.max_tokens else None
            if end is not None:
                events.append(("end", end))
                self._free(s)
            s.sink(s, events)

    def _free(self, seq: Sequence):
        with self._cv:
            i = seq.slot
            if 0 <= i < self.N and self.slots[i] is seq:
                self.slots[i] = None
                self.pos[i] = self.fed[i] = 0
                self.temperature[i], self.top_p[i], self.top_k[i] = 0, 1, 0  # a free row draws nothing
            self._cv.notify_all()

    def _drop_cancelled(self):
        for s in list(self.slots):
            if s is not None and s.cancelled:
                self._free(s)
                s.sink(s, [("end", "cancelled")])

    def _fail_all(self, e: Exception):
        for s in list(self.slots):
            if s is not None:
                self._free(s)
                s.sink(s, [("end", "error", str(e))])
        self.cache, self.counts = self.p.new_cache(), self.p.new_counts()


def _mode(seqs) -> str:
    """The sampler program a mix of sequences needs (`jaxlm.serve.sampler.MODES`)."""
    drawing = [s for s in seqs if s.temperature > 0]
    if any(s.top_p < 1 or s.top_k > 0 for s in drawing):
        return "filter"
    return "draw" if drawing else "greedy"
