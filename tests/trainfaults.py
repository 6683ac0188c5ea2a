"""A seeded fault injector for `python train.py`: start a real run, freeze it at a chosen moment, look, kill it.

Every kill is SIGSTOP first, then SIGKILL: while the process is frozen the harness records exactly where it
was (compiling or not, the last logged step, which checkpoints are complete, which save is still being
written under Orbax's temporary name), so what a kill interrupted is observed, not guessed from timing.
"During a save" is certain, not likely: the harness polls the checkpoints directory and freezes the
process as soon as a temporary step directory appears (Orbax's own atomic-save mechanism: a step is
written as `N.orbax-checkpoint-tmp` and renamed when complete), and retries at the next save when the
rename won the race.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax.checkpoint.utils.TMP_DIR_SUFFIX (kept literal: no orbax import here)
# The tiny run every fault test trains (same shapes everywhere, so processes share compiled steps on disk).
FLAGS = [
    "--n-layer=2",
    "--n-head=2",
    "--n-embd=32",
    "--block-size=32",
    "--batch-size=4",
    "--warmup-iters=2",
    "--lr-decay-iters=1000",
    "--eval-iters=2",
    "--log-interval=1",
    "--tensorboard=false",
]


def launch(out, *flags, logs: Path, preexec_fn=None) -> subprocess.Popen:
    """`python train.py FLAGS --out-dir OUT *flags`, output unbuffered into files under `logs` (pipes could fill)."""
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.out")))
    stdout, stderr = open(logs / f"{n}.out", "w"), open(logs / f"{n}.err", "w")
    cmd = [sys.executable, str(ROOT / "train.py"), *FLAGS, f"--out-dir={out}", *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, cwd=ROOT, env=env, preexec_fn=preexec_fn)
    proc.stdout_path, proc.stderr_path = Path(stdout.name), Path(stderr.name)
    stdout.close(), stderr.close()
    return proc


def run(out, *flags, preexec_fn=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train.py FLAGS --out-dir OUT *flags` to its end, output captured through pipes (a file-size limit
    in `preexec_fn` applies to files, not to pipes)."""
    cmd = [sys.executable, str(ROOT / "train.py"), *FLAGS, f"--out-dir={out}", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, preexec_fn=preexec_fn, timeout=timeout)


def without_closed_loop_noise(stderr: str) -> str:
    """`stderr` less the 'Event loop is closed' tracebacks tensorstore's C++ callbacks may print (from several
    threads, interleaved) when Orbax abandons a failed write's other pending writes: library noise, not raised
    to jaxlm (see the README). Removed line by line, so any other traceback keeps its frames and message."""
    noise = re.compile(
        r"Traceback \(most recent call last\):|File \"[^\"]*/asyncio/base_events\.py\", line \d+, in \w+|"
        r"self\._check_closed\(\)|raise RuntimeError\('Event loop is closed'\)|RuntimeError: Event loop is closed"
    )
    # Threads print at once, so fragments may share a line: a line is noise when nothing else is left on it.
    return "".join(line for line in stderr.splitlines(keepends=True) if noise.sub("", line).strip() or not line.strip())


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    """Wait for `proc`; (returncode, stdout, stderr)."""
    proc.wait(timeout=timeout)
    return proc.returncode, proc.stdout_path.read_text(), proc.stderr_path.read_text()


def complete_steps(out) -> list[int]:
    d = Path(out) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def partial_steps(out) -> list[int]:
    """Steps being written (or left half-written): Orbax's temporary step directories."""
    d = Path(out) / "checkpoints"
    return sorted(int(p.name.split(".")[0]) for p in d.glob(f"*{TMP_SUFFIX}*")) if d.is_dir() else []


def _partial_dirs(out) -> set[tuple[str, int]]:
    """(name, inode) of the temporary step directories: a step written again is a new directory."""
    found = set()
    for p in (Path(out) / "checkpoints").glob(f"*{TMP_SUFFIX}*"):
        try:
            found.add((p.name, p.stat().st_ino))
        except FileNotFoundError:  # renamed or removed meanwhile
            pass
    return found


def logged(out, key="loss") -> list[tuple[int, float]]:
    """(step, value) rows of metrics.jsonl holding `key` (skipping a line torn by a kill)."""
    path = Path(out) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if key in row:
            rows.append((row["step"], row[key]))
    return rows


@dataclass
class Kill:
    phase: str  # what it interrupted, as observed while frozen: compile, step or save
    logged_step: int  # the last train step in metrics.jsonl (0 when this launch trained none yet)
    complete: list[int]  # complete checkpoints
    writing: list[int]  # checkpoints still under their temporary name
    pid: int


def _wait(predicate, proc, timeout, poll=0.002) -> bool:
    """True once `predicate()` holds; False if the process exited first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise TimeoutError("the run made no progress")
        time.sleep(poll)
    return True


def kill_at(proc, out, phase: str, rng, on_frozen=None, timeout: float = 300) -> Kill | None:
    """Freeze `proc` at `phase` (compile | step | save, with a seeded random delay), call `on_frozen(proc)`,
    SIGKILL it. None when the run ended before that moment came."""
    start = max([s for s, _ in logged(out)] + [0])
    stale = _partial_dirs(out)  # left by a killed run until this one opens its checkpoint manager
    if phase == "compile":  # after the model line, before or while the steps compile (or load from cache)
        if not _wait(lambda: "model:" in proc.stdout_path.read_text(), proc, timeout, poll=0.01):
            return None
        time.sleep(rng.uniform(0.0, 1.0))
        os.kill(proc.pid, signal.SIGSTOP)
    elif phase == "step":
        if not _wait(lambda: any(s > start for s, _ in logged(out)), proc, timeout, poll=0.01):
            return None
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGSTOP)
    elif phase == "save":  # caught inside the write for certain: frozen while its temporary directory exists
        # First a step of this run: by then it has removed any temporary directory a killed run left behind.
        if not _wait(lambda: any(s > start for s, _ in logged(out)), proc, timeout, poll=0.01):
            return None
        seen = set(complete_steps(out))
        while True:
            if not _wait(lambda seen=seen: set(partial_steps(out)) - seen, proc, timeout):
                return None
            os.kill(proc.pid, signal.SIGSTOP)
            if set(partial_steps(out)) - seen:
                break
            seen |= set(complete_steps(out))  # renamed before the stop landed: wait for the next save
            os.kill(proc.pid, signal.SIGCONT)
    else:
        raise ValueError(phase)
    if proc.poll() is not None:  # it ended just before the stop
        return None
    writing = sorted(int(name.split(".")[0]) for name, _ in _partial_dirs(out) - stale)
    compiled = re.search(r"^compiled .* in [\d.]+ s$", proc.stdout_path.read_text(), re.M) is not None
    observed = "save" if writing else "step" if compiled else "compile"
    last = max([s for s, _ in logged(out)] + [0])
    # Rows up to `start` may be a killed run's, not yet dropped by this one: only newer rows are its progress.
    kill = Kill(observed, last if last > start else 0, complete_steps(out), writing, proc.pid)
    try:
        if on_frozen is not None:
            on_frozen(proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return kill
