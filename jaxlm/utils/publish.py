"""Files and directories that appear whole or not at all: written under a temporary name beside their final
path, then renamed into place (a rename within one directory is atomic); on any failure the temporary is
removed and whatever was at the final path is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path


@contextlib.contextmanager
def publishing(out, *, overwrite: bool = False, exist_ok: bool = False, shared: bool = False, leader: bool = True):
    """Yield an empty temporary directory beside `out`; when the block ends without an error it becomes `out`.

    `overwrite`: an existing `out` is replaced (only once the new one is complete). `exist_ok`: a concurrent
    writer of the same content that renamed first wins (its `out` is kept). `shared`: the temporary has a fixed
    name (`.NAME.partial`), so every process of a multi-process job writes into the same one; only the
    `leader` creates, renames or removes it (the caller synchronises the processes around the block).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if shared:
        tmp = out.with_name(f".{out.name}.partial")
        if leader:
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed writer's leftovers
            tmp.mkdir()
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if leader:
            tmp.chmod(0o755)  # mkdtemp makes it private; a published directory reads like any other
            _rename_into_place(tmp, out, overwrite=overwrite, exist_ok=exist_ok)
    finally:
        if leader:
            _remove(tmp)  # gone already after a successful rename


def _remove(tmp: Path, tries: int = 50):
    """Remove a temporary directory, again while it is still there: after a failed write a writer's thread
    (TensorStore's, under Orbax) can still be creating a file in it while the first removal runs."""
    for _ in range(tries):
        shutil.rmtree(tmp, ignore_errors=True)
        if not tmp.exists():
            return
        time.sleep(0.1)


def _rename_into_place(tmp: Path, out: Path, *, overwrite: bool, exist_ok: bool):
    if overwrite and out.is_dir():
        shutil.rmtree(out)
    elif overwrite and out.exists():
        out.unlink()
    elif out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty directory is no output: replace it
    try:
        os.rename(tmp, out)
    except OSError:
        if not (exist_ok and out.exists()):
            raise


def write_file(path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file beside it and a rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the file reads like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
