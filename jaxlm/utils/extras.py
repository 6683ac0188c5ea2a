"""Optional features whose packages come with a pip extra (`pip install 'jaxlm[tasks]'`): imported on use, and
a missing one is a one-line error naming the extra, not an ImportError traceback."""

from __future__ import annotations

import importlib

from ..errors import JaxlmError


def require(module: str, extra: str, what: str):
    """The imported `module`, or a JaxlmError: "WHAT needs MODULE: pip install 'jaxlm[EXTRA]'"."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise JaxlmError(f"{what} needs the {module.split('.')[0]} package: pip install 'jaxlm[{extra}]'") from None
