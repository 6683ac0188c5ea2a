"""Train a GPT: `python train.py` (char-level Tiny Shakespeare, CPU, minutes); `--help` lists every flag."""

import sys

from jaxlm.cli import run_cli
from jaxlm.train import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
