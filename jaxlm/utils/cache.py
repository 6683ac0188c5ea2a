"""Where jaxlm keeps what it makes on first use: prepared datasets, compiled XLA programs, native kernels."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """$JAXLM_CACHE, else $XDG_CACHE_HOME/jaxlm, else ~/.cache/jaxlm."""
    if os.environ.get("JAXLM_CACHE"):
        return Path(os.environ["JAXLM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxlm"
