"""One writer per run directory: an advisory lock (`flock`) on OUT_DIR/train.lock, held for the whole run.

Two trainers on one --out-dir would interleave checkpoints and metrics rows and corrupt both runs. `flock`
belongs to the open file: the kernel drops it when the process dies, however it dies, so a lock left by a
SIGKILLed run never blocks its resume and there is no stale-pid guessing. The file records who holds it
(pid, host) only to name them in the refusal. In a multi-process job process 0 takes it for the job.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

import jax

from ..errors import JaxlmError

LOCK_FILE = "train.lock"


class RunLocked(JaxlmError):
    """Another live process is training in this run directory."""


class RunLock:
    """`with RunLock(out_dir):` holds OUT_DIR/train.lock (process 0 only) or raises RunLocked."""

    def __init__(self, out_dir):
        self.out = Path(out_dir).expanduser()
        self.fd = None
        self.created = False  # the lock made the run directory: a run that fails before writing removes it

    def __enter__(self):
        if jax.process_index() != 0:
            return self
        path = self.out / LOCK_FILE
        try:
            self.created = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise JaxlmError(
                f"cannot write to --out-dir {self.out} ({e.strerror}); choose a writable directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(
                f"{self.out} is in use by another training run ({holder}); wait for it to finish, stop it "
                "(SIGTERM saves and exits), or choose another --out-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n", 0)
        self.fd = fd
        return self

    def __exit__(self, exc_type, *exc):
        if self.fd is None:
            return
        os.close(self.fd)  # releases the lock; the file stays (unlinking it would race a newcomer)
        self.fd = None
        if exc_type is not None and self.created and [p.name for p in self.out.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(self.out, ignore_errors=True)  # bad input found before anything was written


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {int(holder['pid'])} on host {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"
