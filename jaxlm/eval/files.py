"""The evaluation data: bundled in jaxlm/assets (see LICENSES.md there), or a user's own copy.

Each reader checks the file's shape and raises a one-line JaxlmError naming the file, the line and
the fix, so a truncated download or the wrong file fails before any model runs.
"""

from __future__ import annotations

import bz2
import json
from importlib import resources
from pathlib import Path

from ..errors import JaxlmError

WIKITEXT2 = "wiki.test.raw"
LAMBADA = "lambada_test.jsonl"
HELLASWAG = "hellaswag_val_full.txt.bz2"


def locate(name: str, path=None, data_dir=None) -> Path:
    """`path` if given, else `data_dir/name`, else the bundled copy."""
    if path is not None:
        p = Path(path).expanduser()
    elif data_dir is not None:
        p = Path(data_dir).expanduser() / name
    else:
        p = Path(str(resources.files("jaxlm") / "assets" / name))
    if not p.is_file():
        raise JaxlmError(f"dataset file {p} not found; pass the path to a copy of {name} (or --data-dir)")
    return p


def _read_text(path: Path) -> str:
    try:
        raw = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
        return raw.decode("utf-8")
    except (OSError, EOFError, ValueError) as e:  # bz2 raises OSError/EOFError; decode ValueError
        raise JaxlmError(
            f"{path}: cannot read it as {'bzip2-compressed ' if path.suffix == '.bz2' else ''}"
            f"UTF-8 text ({e}); replace the file"
        ) from None


def read_wikitext(path: Path) -> str:
    """wiki.test.raw as it is: the WikiText-2 raw test split, one row a line, blank rows " "."""
    text = _read_text(path)
    if not text.endswith("\n") or " = " not in text[:200]:
        raise JaxlmError(
            f"{path} does not look like WikiText-2 raw (' = Title = ' lines, LF-terminated); "
            "pass wiki.test.raw from wikitext-2-raw-v1"
        )
    return text


def read_lambada(path: Path) -> list[str]:
    """OpenAI's LAMBADA test file: one {"text": ...} a line."""
    texts = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise JaxlmError(f'{path} line {n}: not JSON ({e.msg}); expected one {{"text": ...}} per line') from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise JaxlmError(f'{path} line {n}: expected an object with a non-empty string "text"')
        texts.append(row["text"])
    if not texts:
        raise JaxlmError(f'{path} holds no examples; expected one {{"text": ...}} per line')
    return texts


def read_hellaswag(path: Path) -> list[tuple[str, int, list[str]]]:
    """The text form (llama.cpp's `perplexity --hellaswag` input): per task 6 lines, the context
    "activity label: ctx", the gold label 0-3, then the four endings."""
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or len(lines) % 6:
        raise JaxlmError(
            f"{path}: {len(lines)} lines, not a multiple of 6 (context, label, 4 endings per task); "
            "pass hellaswag_val_full.txt(.bz2)"
        )
    tasks = []
    for i in range(0, len(lines), 6):
        label = lines[i + 1].strip()
        if label not in ("0", "1", "2", "3"):
            raise JaxlmError(f"{path} line {i + 2}: label {label!r} is not 0-3; the file is malformed or shifted")
        tasks.append((lines[i], int(label), lines[i + 2 : i + 6]))
    return tasks
