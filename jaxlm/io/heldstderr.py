"""Holding stderr while a write runs: a write that fails for lack of space makes Orbax and TensorStore print
tracebacks from their threads; the user should get one line, and every other failure keeps them all."""

from __future__ import annotations

import gc
import io
import logging
import os
import sys
import threading
import time
import traceback

from ..errors import disk_full


class _QuietDiskFull(logging.Filter):
    """asyncio logs Orbax's failed write tasks when they are collected, possibly at exit, after
    the save has already reported the full disk in one line: drop those records only."""

    def filter(self, record):
        return not (record.exc_info and record.exc_info[1] is not None and disk_full(record.exc_info[1]))


logging.getLogger("asyncio").addFilter(_QuietDiskFull())


class _Stamped(io.StringIO):
    def __init__(self, held):
        super().__init__()
        self.held = held

    def write(self, text):
        self.held.last = time.monotonic()
        return super().write(text)


class HeldStderr:
    """Holds what is written to file descriptor 2 (Python and C++ alike) in memory while active;
    `replay()` writes it out. A pipe drained by a thread, not a file: the disk may be the thing that is full."""

    def __enter__(self):
        self.data, self.saved, self.reader = bytearray(), None, None
        self.threads = set(threading.enumerate())
        sys.stderr.flush()
        self.last = time.monotonic()
        self.py, sys.stderr = sys.stderr, _Stamped(self)  # Python's writes, also where sys.stderr is not fd 2
        self.hook, sys.unraisablehook = sys.unraisablehook, self._unraisable  # errors in TensorStore callbacks
        try:
            self.saved = os.dup(2)
        except (OSError, ValueError):  # no usable fd 2: hold nothing
            return self
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self.reader = threading.Thread(target=self._drain, args=(read_fd,), daemon=True)
        self.reader.start()
        return self

    def _unraisable(self, u):
        sys.stderr.write("".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))

    def _drain(self, fd):
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read1(65536):
                self.data += chunk
                self.last = time.monotonic()

    def settle(self, timeout: float = 5.0):
        """After a failure: let the writer's threads end (they print as they die), collect its
        failed asyncio tasks (logged when collected), all while still held."""
        deadline = time.monotonic() + timeout
        for t in set(threading.enumerate()) - self.threads - {self.reader}:
            t.join(max(0.0, deadline - time.monotonic()))
        gc.collect()
        # TensorStore's late callbacks still print into a closed event loop: wait for a quiet half second.
        while time.monotonic() - self.last < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)

    def __exit__(self, *exc):
        held_py, sys.stderr, sys.unraisablehook = sys.stderr, self.py, self.hook
        self.data += held_py.getvalue().encode()
        if self.saved is not None:
            sys.stderr.flush()
            os.dup2(self.saved, 2)  # closes the pipe's last write end: the reader sees EOF
            os.close(self.saved)
            if self.reader is not None:
                self.reader.join(timeout=5)
            self.saved = None

    def replay(self):
        if self.data:
            sys.stderr.write(self.data.decode(errors="replace"))
            sys.stderr.flush()
            self.data = bytearray()
