"""Directories that appear whole or not at all: built under a temporary name, then renamed into place."""

from __future__ import annotations

import json
import os
from pathlib import Path


def publish_dir(tmp: Path, out: Path, meta_file: str, meta: dict, *, exist_ok: bool = False) -> Path:
    """Write `meta` as JSON into `tmp`, then rename `tmp` to `out`. With `exist_ok`, a concurrent writer of the
    same content that renamed first wins (its `out` is kept)."""
    (tmp / meta_file).write_text(json.dumps(meta, indent=1) + "\n")
    tmp.chmod(0o755)
    try:
        os.rename(tmp, out)
    except OSError:
        if not (exist_ok and (out / meta_file).is_file()):
            raise
    return out
