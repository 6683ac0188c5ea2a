"""`python -m jaxlm.serve MODEL`: see jaxlm.serve.cli."""

import sys

from .cli import cli

sys.exit(cli())
