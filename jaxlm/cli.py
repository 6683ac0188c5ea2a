"""What every jaxlm command line shares: user mistakes become one line on stderr and exit 2."""

from __future__ import annotations

import sys
import warnings

from .errors import JaxlmError


def _is_orbax_echo(u) -> bool:
    """An unraisable error that only repeats a failed Orbax read or write already raised to us.

    When one of Orbax's concurrent TensorStore reads or writes fails (a corrupt checkpoint, a full disk), its
    asyncio loop closes with that error while the other reads and writes are still in flight; as each one
    finishes, TensorStore's callback finds the loop closed ("Event loop is closed") and the abandoned Orbax
    coroutines are collected with their own copies of the error. Python reports both as unraisable, dozens
    of tracebacks on stderr after (or before) the one `error:` line the user should see; the writes Orbax
    never started warn "coroutine ... was never awaited" at exit.
    """
    if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
        return True
    code = getattr(u.object, "cr_code", None)  # a coroutine
    return code is not None and "/orbax/" in code.co_filename.replace("\\", "/")


def _quiet_orbax_echoes() -> None:
    previous = sys.unraisablehook
    if getattr(previous, "_jaxlm", False):
        return

    def hook(u):
        if not _is_orbax_echo(u):
            previous(u)

    hook._jaxlm = True
    sys.unraisablehook = hook
    # jaxlm itself has no coroutines: an unawaited one is Orbax's, left behind by a failed save.
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)


def run_cli(main, argv=None) -> int:
    """Call `main(argv)`; a JaxlmError or OSError (bad path, no permission) prints `error: ...`."""
    _quiet_orbax_echoes()
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
