"""`python -m jaxlm.aot`: see jaxlm/aot/cli.py."""

import os
import sys

import jax

from ..cli import run_cli
from .cli import main
from .topology import compile_only_env

if __name__ == "__main__":
    # Compile-only: never open this machine's own accelerator (on a TPU VM a training job may hold it).
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
    os.environ.update(compile_only_env(os.environ))  # read by libtpu when the first topology loads it
    sys.exit(run_cli(main))
