"""Fault injection for tests: a disk that fills up for real, a file-size limit, damaged files, and a
check that a command failed the way a user should see it (one `error:` line, exit 2, no traceback).

Two ways to run out of space, both real kernel errors, not mocks:
- `small_disk()`: a tmpfs mounted at a fresh directory (root only; it skips the test elsewhere).
  Writes there fail with ENOSPC, "No space left on device", in this process or any subprocess.
- `run_limited()`: a subprocess with RLIMIT_FSIZE set and SIGXFSZ ignored, so a write past the limit
  fails with EFBIG, "File too large", instead of killing the process. Works for any user.
`snapshot()` records a directory's files and bytes, to check that a failed write left the previous
state exactly as it was; `truncate()`, `flip_byte()` and `largest_file()` damage files on purpose.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import ROOT


@functools.cache
def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN, as in a privileged container)."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return False
    with tempfile.TemporaryDirectory() as d:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True)
        if ok.returncode != 0:
            return False
        subprocess.run(["umount", d], check=True)
    return True


class SmallDisk:
    """A mounted tmpfs; `shrink(free)` remounts it so that only `free` more bytes fit."""

    def __init__(self, path: Path):
        self.path = path

    def used(self) -> int:
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def shrink(self, free: int):
        size = -(-(self.used() + free) // 4096) * 4096  # tmpfs sizes are whole pages
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)


@contextlib.contextmanager
def small_disk(size: int = 1 << 20):
    """A tmpfs of `size` bytes at a new directory, unmounted afterwards; skips the test without root."""
    if not can_mount():
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); run_limited covers the file-size limit")
    d = Path(tempfile.mkdtemp(prefix="jaxlm-small-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=True, capture_output=True)
    try:
        yield SmallDisk(d)
    finally:
        subprocess.run(["umount", str(d)], check=True)
        d.rmdir()


# Set the limit, ignore SIGXFSZ (a write past the limit then fails with EFBIG instead of killing the
# process), then exec the real command: both survive exec, and no preexec_fn forks a threaded parent.
_LIMITED = (
    "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


def run_limited(*args, max_file_bytes: int, timeout: float = 300, env=None, cwd=None) -> subprocess.CompletedProcess:
    """`python *args` in a subprocess that cannot write any file past `max_file_bytes`."""
    return subprocess.run(
        [sys.executable, "-c", _LIMITED, str(max_file_bytes), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        cwd=cwd or ROOT,
    )


def assert_user_error(returncode: int, stderr: str, *needles: str):
    """Exit 2; stderr ends with one `error: ...` line holding each needle (status lines such as
    "loading ..." may precede it, nothing else mentions an error); never a traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, f"exit {returncode}, stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum("error" in line.lower() for line in lines) == 1, stderr
    for needle in needles:
        assert needle.lower() in lines[-1].lower(), f"{needle!r} not in {lines[-1]!r}"
    return lines[-1]


def snapshot(path) -> dict[str, str]:
    """{relative path: sha256} of every file under `path` ({} when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def largest_file(path) -> Path:
    """The biggest file under `path`: in an Orbax checkpoint, the one holding the array data."""
    return max((f for f in Path(path).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def truncate(path, keep: float | int = 0.5):
    """Cut `path` to `keep` bytes (an int) or that fraction of its size (a float)."""
    size = Path(path).stat().st_size
    os.truncate(path, int(size * keep) if isinstance(keep, float) else keep)


def flip_byte(path, offset: int):
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))
