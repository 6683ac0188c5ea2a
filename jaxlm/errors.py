"""User-facing errors: scripts print these as one line and exit non-zero, without a traceback."""


class JaxlmError(ValueError):
    """A mistake in what the user asked for or handed in (a path, a flag, a file), not a bug."""
