"""`python -m jaxlm.serve` as a subprocess for the serve tests: a free port on 127.0.0.1, ready or not.

The session's servers share one XLA compilation cache (every program cached, however fast it compiled),
so only the first server of a test session compiles; the others load their programs in a few seconds.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import ROOT, save_random_hf

KEY = "test-key-123"
# A tiny GPT-2 with GPT-2's vocabulary (the server tokenises text); initializer_range 0.5 keeps its greedy
# text from collapsing into one repeated token, as in tests/test_generate.py.
TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257, initializer_range=0.5)
_LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")


class Server:
    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc, self.log = proc, log
        self.url = None
        self.statuses: list[int] = []  # /health answers seen while waiting for it to be ready

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_listening(self, timeout: float):
        deadline = time.monotonic() + timeout
        while self.url is None:
            m = _LISTENING.search(self.text())
            if m:
                self.url = f"http://{m.group(1)}:{m.group(2)}"
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start (exit {self.proc.poll()}):\n{self.text()[-3000:]}")
            else:
                time.sleep(0.05)

    def wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                self.statuses.append(r.status_code)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not get ready (exit {self.proc.poll()}):\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start(model, *args, cache: Path, log: Path, ready: bool = True, timeout: float = 300, env=None) -> Server:
    full_env = {**os.environ, "JAXLM_CACHE": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                **(env or {})}  # fmt: skip
    cmd = [sys.executable, "-m", "jaxlm.serve", str(model), "--port", "0", *map(str, args)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    server = Server(proc, log)
    try:
        server.wait_listening(timeout)
        if ready:
            server.wait_ready(timeout)
    except BaseException:
        server.stop(5)
        raise
    return server


@pytest.fixture(scope="session")
def serve_cache(tmp_path_factory) -> Path:
    """One compilation cache for every serve test of the session (across xdist workers too)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's directory, shared by the workers
    path = base / "serve-xla-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gpt2")
    save_random_hf(path, seed=0, **TINY)
    return path
