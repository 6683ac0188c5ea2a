"""What every jaxlm command line shares: user mistakes become one line on stderr and exit 2, and failures that
libraries report many times over are reported once.

Only the commands change the process's logging, warnings and hooks; library calls leave them as they found
them. When Orbax fails to write (a full disk) it logs the error's traceback from each of its background
threads, asyncio logs the abandoned tasks, and Python reports the coroutines it collects as unraisable, all
before or after the one `error:` line the command prints; a Ctrl-C that stops a streaming decode loop is
logged by jax as a failed callback. `run_cli` drops exactly those records.
"""

from __future__ import annotations

import logging
import sys
import warnings

from .errors import JaxlmError, StopRequested, disk_full

# Loggers whose records repeat a failure the command reports itself: Orbax logs through absl; asyncio logs
# the tasks a failed write abandoned; jax logs an exception raised in a host callback.
_ECHOING_LOGGERS = ("absl", "asyncio", "jax._src.callback")


class _DropEchoes(logging.Filter):
    """A record whose exception is a full disk (reported as one `error:` line) or a requested stop (Ctrl-C)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not (isinstance(exc, StopRequested) or disk_full(exc))


def _is_orbax_echo(u) -> bool:
    """An unraisable error that only repeats a failed Orbax read or write already raised to us.

    When one of Orbax's concurrent TensorStore reads or writes fails (a corrupt checkpoint, a full disk), its
    asyncio loop closes with that error while the other reads and writes are still in flight; as each one
    finishes, TensorStore's callback finds the loop closed ("Event loop is closed") and the abandoned Orbax
    coroutines are collected with their own copies of the error. Python reports both as unraisable.
    """
    if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
        return True
    code = getattr(u.object, "cr_code", None)  # a coroutine
    return code is not None and "/orbax/" in code.co_filename.replace("\\", "/")


def quiet_library_echoes() -> None:
    """Install, once per process, the filters and hook above, and no warning for the writes Orbax never started
    ("coroutine ... was never awaited": jaxlm itself has no coroutines). They stay for the process's life: the
    echoes can arrive after the command returned (abandoned coroutines are collected at exit)."""
    if getattr(sys.unraisablehook, "_jaxlm", False):
        return
    drop = _DropEchoes()
    for name in _ECHOING_LOGGERS:
        logging.getLogger(name).addFilter(drop)
    previous = sys.unraisablehook

    def hook(u):
        if not _is_orbax_echo(u):
            previous(u)

    hook._jaxlm = True
    sys.unraisablehook = hook
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)


def run_cli(main, argv=None) -> int:
    """Call `main(argv)`; a JaxlmError or OSError (bad path, no permission) prints `error: ...`."""
    quiet_library_echoes()
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
