"""What every jaxlm command line shares: user mistakes become one line on stderr and exit 2."""

from __future__ import annotations

import sys

from .errors import JaxlmError


def run_cli(main, argv=None) -> int:
    """Call `main(argv)`; a JaxlmError or OSError (bad path, no permission) prints `error: ...`."""
    try:
        return main(argv) or 0
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
