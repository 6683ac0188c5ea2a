"""Rows of a prompt/completion JSONL -> (token ids, token mask), tokenised as TRL's SFTTrainer does.

Split from jaxlm.data.sft (which prepares, stores and batches) so each file holds one concept; see its docstring
for the rules. Every bad row is a JaxlmError naming the file and line.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import JaxlmError
from ..tokenizer import EOT
from .templates import Template, for_row
from .textfiles import jsonl_rows


@dataclass
class Stats:
    """What prepare did to the rows; printed as the summary and kept in meta.json."""

    rows: int = 0
    pairs: int = 0
    text_rows: int = 0
    prefix_mismatch: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    counted: int = 0
    first_mismatch_line: int | None = None
    longest: int = 0


def row_text(row: dict, where: str, template: Template | None) -> tuple[str, str | None]:
    """(prompt, completion) of a row, or (text, None) for a {"text"} row."""
    if template is not None:
        prompt, completion = for_row(template, row).render(row, where)
    elif "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                what = "has no" if value is None else f"has a non-string ({type(value).__name__})"
                raise JaxlmError(f"{where} {what} {name!r} field; a pair needs string prompt and completion")
    elif "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise JaxlmError(f"{where} has an empty or non-string 'text'; give it text or remove the line")
        return row["text"], None
    else:
        raise JaxlmError(
            f"{where} has neither 'prompt'/'completion' nor 'text' (keys: {', '.join(row) or 'none'}); "
            "rename the fields or pass --template"
        )
    if not completion.replace(EOT, "").strip():
        raise JaxlmError(f"{where} has an empty completion; fill it in or remove the line")
    return prompt, completion


def alphabet(src: Path, template) -> str:
    """Every character of every row's prompt and completion (a char tokenizer's alphabet; EOT not included)."""
    chars = set()
    for lineno, row in jsonl_rows(src):
        for text in row_text(row, f"{src} line {lineno}", template):
            chars.update((text or "").replace(EOT, ""))
    return "".join(sorted(chars))


def encode(tok, prompt: str, completion: str | None) -> tuple[list[int], list[int], bool]:
    """(ids, token mask, prompt-is-a-prefix) as TRL's SFTTrainer tokenises; `completion` None: a text row."""
    if completion is None:
        ids = tok.encode(prompt if prompt.endswith(EOT) else prompt + EOT)
        return ids, [1] * len(ids), True
    whole = tok.encode(prompt + (completion if completion.endswith(EOT) else completion + EOT))
    prompt_ids = tok.encode(prompt)
    n = min(len(prompt_ids), len(whole))
    return whole, [0] * n + [1] * (len(whole) - n), whole[: len(prompt_ids)] == prompt_ids


def fit(ids: list[int], mask: list[int], limit: int, truncate: str) -> tuple[list[int], list[int]] | None:
    """At most `limit` tokens: drop the example (None) or cut tokens from its `truncate` side."""
    if len(ids) <= limit:
        return ids, mask
    if truncate == "drop":
        return None
    keep = slice(len(ids) - limit, None) if truncate == "left" else slice(0, limit)
    return ids[keep], mask[keep]


def examples(src: Path, template, truncate: str, block_size: int, stats: Stats, tok) -> Iterator[tuple]:
    """(ids, mask) of each usable row of `src`, updating `stats`."""
    limit = block_size + 1  # inputs tokens[:-1] and targets tokens[1:] of one row
    for lineno, row in jsonl_rows(src):
        stats.rows += 1
        prompt, completion = row_text(row, f"{src} line {lineno}", template)
        ids, mask, prefix = encode(tok, prompt, completion)
        if completion is None:
            stats.text_rows += 1
        else:
            stats.pairs += 1
        if not prefix:
            stats.prefix_mismatch += 1
            stats.first_mismatch_line = stats.first_mismatch_line or lineno
        fitted = fit(ids, mask, limit, truncate)
        if fitted is None or not any(fitted[1][1:]):  # too long, or no counted target left after truncation
            stats.dropped += 1
            continue
        stats.truncated += len(fitted[0]) < len(ids)
        ids, mask = fitted
        stats.tokens += len(ids)
        stats.counted += sum(mask[1:])
        stats.longest = max(stats.longest, len(ids))
        yield ids, mask
