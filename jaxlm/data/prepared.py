"""What both kinds of prepared dataset share: the directory's meta.json, its two splits, reading it back.

A text dataset (`jaxlm.data.tokens`, format "jaxlm-data") holds token streams, a prompt/completion dataset
(`jaxlm.data.sft`, format "jaxlm-sft") whole examples with loss masks; both are directories written whole or
not at all (`jaxlm.utils.publish`), described by META_FILE.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..utils.files import read_json_object

META_FILE = "meta.json"
SPLITS = {"train": 0, "val": 1}  # the split's number seeds its batches apart from the other's


def read_meta(path) -> dict:
    """The meta.json of a prepared dataset directory (a JaxlmError naming the fix if it is missing or corrupt)."""
    return read_json_object(
        Path(path) / META_FILE,
        missing=f"{path} is not a prepared dataset ({META_FILE} missing); run python -m jaxlm.data prepare",
        fix="prepare the dataset again",
    )


def write_meta(directory: Path, meta: dict):
    (directory / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


@dataclass(frozen=True)
class Prepared:
    """A prepared dataset: its train and val splits (a token stream or examples) and its meta.json."""

    train: object
    val: object
    meta: dict
    path: Path | None = None

    @property
    def tokenizer_spec(self) -> dict:
        return self.meta["tokenizer"]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def split(self, name: str):
        return self.train if name == "train" else self.val
