"""User-facing errors: scripts print these as one line and exit non-zero, without a traceback."""

import errno
import re

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # how TensorStore names the errno in its messages


class JaxlmError(ValueError):
    """A mistake in what the user asked for or handed in (a path, a flag, a file), not a bug."""


class StopRequested(Exception):
    """A stop the user asked for (Ctrl-C during a streaming decode loop): not an error to report."""


def disk_full(e: BaseException) -> str | None:
    """ "no space left on device" or "file too large" when `e`, or what caused it, is that; else None.

    Orbax writes through TensorStore, which reports a full disk as a ValueError (or a bare Exception
    wrapping one) whose text carries the errno's words or its code; safetensors raises a SafetensorError
    likewise. A disk quota counts as a full disk.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        codes = {getattr(e, "errno", None)} | {int(c) for c in _OS_ERROR_CODE.findall(text)}
        if codes & {errno.ENOSPC, errno.EDQUOT} or "no space left" in text or "quota exceeded" in text:
            return "no space left on device"
        if errno.EFBIG in codes or "file too large" in text:
            return "file too large (the file size limit was reached)"
        e = e.__cause__ or e.__context__
    return None
