"""Raw text files read as the tokenizer wants them: UTF-8 checked, in pieces cut where cutting never
changes GPT-2's tokens, .jsonl lines as documents; errors name the file, line or byte offset."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import JaxlmError

_CHUNK_BYTES = 1 << 20


def pieces(files: list[Path], text_field: str, bar) -> Iterator[tuple[str, bool]]:
    """(text, ends_document): each .txt file is one document, read in pieces cut before a line that starts with
    a non-space after a non-space line end (see _last_cut); each .jsonl line is one document."""
    for f in files:
        if f.suffix in (".jsonl", ".ndjson"):
            for text in _jsonl_documents(f, text_field, bar):
                yield text, True
            continue
        prev = None
        for piece in _text_pieces(f, bar):
            if prev is not None:
                yield prev, False
            prev = piece
        yield prev, True


def _text_pieces(f: Path, bar) -> Iterator[str]:
    buffer = ""
    for chunk in _text_chunks(f, bar):
        buffer += chunk
        cut = _last_cut(buffer)
        if cut > 0:
            yield buffer[:cut]
            buffer = buffer[cut:]
    yield buffer


def _last_cut(text: str) -> int:
    """Index just after the last newline with a non-space on both sides (0: none): GPT-2's pre-tokenizer
    makes that newline a token of its own, so cutting there never changes the tokens."""
    i = len(text) - 1
    while (i := text.rfind("\n", 1, i)) >= 0:
        if not text[i + 1].isspace() and not text[i - 1].isspace():
            return i + 1
    return 0


def _text_chunks(f: Path, bar) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file handed to the decoder so far
    with open(f, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK_BYTES)
            pending = len(decoder.getstate()[0])
            try:
                yield decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise _not_utf8(f, offset - pending + e.start, e.object[e.start]) from None
            if not chunk:
                return
            offset += len(chunk)
            if bar is not None:
                bar.update(len(chunk))


def jsonl_rows(path: Path, bar=None) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-blank line; a line that is not a JSON object is an error naming it."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if bar is not None:
                bar.update(len(raw))
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise JaxlmError(f"{path} line {lineno} is not UTF-8 ({e.reason}); convert the file to UTF-8") from None
            except json.JSONDecodeError as e:
                raise JaxlmError(f"{path} line {lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise JaxlmError(f"{path} line {lineno} is a JSON {type(row).__name__}, not an object; write one")
            yield lineno, row


def _jsonl_documents(f: Path, text_field: str, bar) -> Iterator[str]:
    for lineno, record in jsonl_rows(f, bar):
        text = record.get(text_field)
        if not isinstance(text, str):
            raise JaxlmError(
                f"{f} line {lineno} has no string field {text_field!r}; pass --text-field with the right name"
            )
        yield text


def _not_utf8(f: Path, offset: int, byte: int) -> JaxlmError:
    return JaxlmError(
        f"{f} is not UTF-8 text (byte 0x{byte:02x} at offset {offset}); convert it, e.g. "
        "`iconv -f latin1 -t utf-8 IN > OUT`"
    )


# ---------------------------------------------------------------------------------------------
# Command line
