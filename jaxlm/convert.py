"""`python -m jaxlm.convert SRC OUT [--to orbax|hf|peft]`: the command's entry point (jaxlm/io/convert.py)."""

import sys

from .io.convert import cli

if __name__ == "__main__":
    sys.exit(cli())
