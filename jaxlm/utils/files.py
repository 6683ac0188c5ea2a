"""Reading the small JSON files that describe a directory (config.json, adapter_config.json, meta.json, ...)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import JaxlmError


def read_json_object(file, *, missing: str, fix: str, error: type[JaxlmError] = JaxlmError) -> dict:
    """The JSON object in `file`. `error(missing)` when there is no such file; `error("FILE is corrupt (why); fix")`
    when it is not JSON, not UTF-8 or not an object."""
    file = Path(file)
    try:
        value = json.loads(file.read_text())
    except FileNotFoundError:
        raise error(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{file} is corrupt ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise error(f"{file} is corrupt (a JSON {type(value).__name__}, not an object); {fix}")
    return value
