"""`python -m jaxlm.data`: see jaxlm/data/cli.py."""

import sys

from ..cli import run_cli
from .cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
