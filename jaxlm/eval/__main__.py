"""`python -m jaxlm.eval`: see jaxlm/eval/cli.py."""

import sys

from ..cli import run_cli
from .cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
