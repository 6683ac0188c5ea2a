"""Streaming tokens out of the compiled loop: its host callback goes to the running call's `on_tokens`,
and Ctrl-C stops the loop at the next step instead of waiting for its end (the callback raises
StopRequested, which jax logs; the command line drops that record)."""

from __future__ import annotations

import threading

import jax
import numpy as np

from ..errors import StopRequested


class stream_to:
    """Routes the compiled loop's host callback to this call's `on_tokens` (the executable is shared,
    so the sink is global, and calls take turns)."""

    _lock = threading.Lock()
    current = None

    def __init__(self, sink):
        self.sink, self.stop = sink, False

    def __enter__(self):
        self._lock.acquire()
        stream_to.current = self
        return self

    def __exit__(self, *exc):
        stream_to.current = None
        self._lock.release()

    def run(self, executable, args):
        """executable(*args), ready. It runs on a worker thread: a loop with host callbacks blocks
        its caller in C++, where Ctrl-C would wait for the end; here it stops at the next step."""
        box, finished = {}, threading.Event()

        def work():
            try:
                box["out"] = jax.block_until_ready(executable(*args))
            except BaseException as e:  # handed to the caller
                box["err"] = e
            finished.set()

        threading.Thread(target=work, daemon=True).start()
        try:
            while not finished.wait(0.1):
                pass
        except KeyboardInterrupt:
            self.stop = True  # the next callback raises, which ends the loop
            finished.wait()
            raise
        if "err" in box:
            raise box["err"]
        return box["out"]


def emit(tok_B, i, done_B):
    stream = stream_to.current
    if stream is not None and stream.stop:
        raise StopRequested("interrupted")
    if stream is not None and stream.sink is not None:
        stream.sink(np.asarray(tok_B), int(i), np.asarray(done_B))
