"""Tokenizers: GPT-2 BPE from the bundled ranks (offline, tiktoken) and character level.

Both serialise to a small JSON-able spec (`to_spec` / `from_spec`) that datasets and checkpoints
carry, so a run always decodes with the tokenizer it was trained with.
"""

from __future__ import annotations

from importlib import resources

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from .errors import JaxlmError

EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class GPT2Tokenizer:
    """OpenAI's GPT-2 BPE (r50k_base), built from the ranks shipped in jaxlm/assets."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = GPT2_EOT_ID

    def __init__(self):
        path = resources.files("jaxlm") / "assets" / "gpt2.tiktoken"
        ranks = load_tiktoken_bpe(str(path))
        self._enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT: GPT2_EOT_ID},
        )

    def encode(self, text: str, allow_eot: bool = True) -> list[int]:
        """Text to ids; the literal `<|endoftext|>` becomes id 50256 unless allow_eot is False."""
        return self._enc.encode(text, allowed_special={EOT} if allow_eot else set(), disallowed_special=())

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def decode_bytes(self, ids) -> bytes:
        """Raw bytes: streaming decoders use this to avoid splitting a multi-byte character."""
        return self._enc.decode_bytes([int(i) for i in ids])

    def to_spec(self) -> dict:
        return {"kind": "gpt2"}


class CharTokenizer:
    """One id per character of a fixed alphabet (sorted unique characters of the training text).

    With `eot=True` (prompt/completion data: a completion must be able to end) the id after the alphabet is
    `<|endoftext|>`, written as that literal in text, as GPT-2's tokenizer does; raw text has no such id.
    """

    name = "char"

    def __init__(self, chars: str, eot: bool = False):
        if not chars:
            raise JaxlmError("a char tokenizer needs a non-empty alphabet (the training text was empty)")
        self.chars = "".join(sorted(set(chars)))
        self._stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.eot_id = len(self.chars) if eot else None
        self.vocab_size = len(self.chars) + eot

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(text)

    def encode(self, text: str, allow_eot: bool = True) -> list[int]:
        if self.eot_id is not None and allow_eot and EOT in text:
            pieces = [self.encode(piece, allow_eot=False) for piece in text.split(EOT)]
            return [i for k, piece in enumerate(pieces) for i in ([self.eot_id] if k else []) + piece]
        try:
            return [self._stoi[ch] for ch in text]
        except KeyError:
            bad = sorted({ch for ch in text if ch not in self._stoi})
            raise JaxlmError(
                f"characters {''.join(bad)!r} are not in this char-level model's alphabet "
                f"({self.vocab_size} characters); remove them from the prompt"
            ) from None

    def decode(self, ids) -> str:
        return "".join(EOT if int(i) == self.eot_id else self.chars[int(i)] for i in ids)

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")

    def to_spec(self) -> dict:
        return {"kind": "char", "chars": self.chars, **({"eot": True} if self.eot_id is not None else {})}


def get_tokenizer(name: str = "gpt2", text: str | None = None):
    """`get_tokenizer("gpt2")`, or `get_tokenizer("char", text=...)` for a character-level one."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if text is None:
            raise JaxlmError('get_tokenizer("char") needs text=... to build its alphabet')
        return CharTokenizer.from_text(text)
    raise JaxlmError(f"unknown tokenizer {name!r}; use 'gpt2' or 'char'")


def from_spec(spec: dict):
    """Rebuild a tokenizer from `tokenizer.to_spec()`."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        return CharTokenizer(spec["chars"], eot=spec.get("eot", False))
    raise JaxlmError(f"unknown tokenizer spec {spec!r}; expected kind 'gpt2' or 'char'")
