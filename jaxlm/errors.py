"""User-facing errors: scripts print these as one line and exit non-zero, without a traceback."""

import errno


class JaxlmError(ValueError):
    """A mistake in what the user asked for or handed in (a path, a flag, a file), not a bug."""


def disk_full(e: BaseException) -> str | None:
    """ "no space left on device" or "file too large" when `e`, or what caused it, is that; else None.

    Orbax writes through TensorStore, which reports a full disk as a ValueError (or a bare Exception
    wrapping one) whose text carries the errno's words; safetensors raises a SafetensorError likewise.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "errno", None)
        text = str(e).lower()
        if code == errno.ENOSPC or "no space left" in text:
            return "no space left on device"
        if code == errno.EFBIG or "file too large" in text:
            return "file too large (the file size limit was reached)"
        e = e.__cause__ or e.__context__
    return None
