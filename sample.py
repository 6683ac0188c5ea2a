"""Sample from a GPT: `python sample.py` (the run `python train.py` wrote); `--help` lists every flag."""

import sys

from jaxlm.cli import run_cli
from jaxlm.generation.cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
