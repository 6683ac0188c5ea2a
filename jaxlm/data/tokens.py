"""Text -> token files, and training batches as a pure function of (seed, step, rows).

A prepared dataset is a directory (nanoGPT's layout plus metadata):
    train.bin, val.bin   uint16 token ids, one flat stream each (the val split is the stream's tail)
    meta.json            {"format": "jaxlm-data", "tokenizer": spec, "vocab_size", "counts", "val_fraction", ...}

    python -m jaxlm.data prepare SRC OUT [--tokenizer gpt2|char] [--val-fraction 0.1] [--text-field text]
    python -m jaxlm.data prepare PAIRS.jsonl OUT [--template T] [--truncate drop|left|right] [--block-size N]

SRC is a text file, a folder of .txt files (each one document) or a .jsonl file (one document per line,
its text under --text-field). GPT-2 BPE ends every document with <|endoftext|>.

Batches: the start offsets of a step's sequences come from a counter-based generator seeded with
(seed, split, step), so a resumed run draws exactly the batches the uninterrupted run drew, and a
process reads only its rows of the global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import JaxlmError
from ..tokenizer import CharTokenizer, get_tokenizer
from ..utils.cache import cache_dir
from ..utils.publish import publishing
from .prepared import META_FILE, SPLITS, Prepared, read_meta, write_meta
from .sft import FORMAT as SFT_FORMAT
from .sft import SFTData, is_pairs_file, open_sft
from .sft import prepare as prepare_sft
from .textfiles import pieces

FORMAT = "jaxlm-data"
BUILTIN = {"shakespeare_char": "char", "shakespeare": "gpt2"}  # bundled Tiny Shakespeare, by tokenizer
IN_MEMORY_BYTES = 256 << 20  # smaller token files are read into RAM: faster sampling than a memmap


class TokenData(Prepared):
    """A prepared text dataset: two flat uint16 token streams (`train`, `val`) plus its metadata."""

    def check_block_size(self, block_size: int):
        for name in SPLITS:
            n = len(self.split(name))
            if n < block_size + 1:
                raise JaxlmError(
                    f"dataset {self.path or ''} has {n:,} {name} tokens, fewer than block_size + 1 = "
                    f"{block_size + 1}; use a smaller --block-size or more text"
                )


# ---------------------------------------------------------------------------------------------
# Batches


def batch_offsets(seed: int, split: str, step: int, n_rows: int, n_tokens: int, block_size: int) -> np.ndarray:
    """Start offsets of the `n_rows` sequences of `step`'s global batch: a pure function of its arguments."""
    # Seeded by the whole (seed, split, step) tuple: independent streams per step. (A Philox counter set to
    # `step` would not do: step s+1's draws would start inside step s's, repeating a third of its windows.)
    rng = np.random.default_rng([seed & (2**64 - 1), SPLITS[split], step])
    return rng.integers(0, n_tokens - block_size, size=n_rows)


def gather(tokens: np.ndarray, offsets: np.ndarray, block_size: int) -> np.ndarray:
    """[..., block_size + 1] int32 windows: inputs are [..., :-1], targets [..., 1:]."""
    return tokens[offsets[..., None] + np.arange(block_size + 1)].astype(np.int32)


def get_batch(data: TokenData, split: str, seed: int, step: int, shape: tuple[int, int], block_size: int, rows=None):
    """This process's rows of the global [accum, batch] batch of `step`: int32 [accum, len(rows), block_size + 1].

    `rows` (a slice of the batch axis, default all) is the share this process feeds its devices.
    """
    tokens = data.split(split)
    offsets_AxB = batch_offsets(seed, split, step, shape[0] * shape[1], len(tokens), block_size).reshape(shape)
    return gather(tokens, offsets_AxB[:, rows if rows is not None else slice(None)], block_size)


# ---------------------------------------------------------------------------------------------
# Opening datasets


def open_dataset(path) -> TokenData:
    """A prepared dataset directory; small ones are loaded into memory, large ones memory-mapped."""
    path = Path(path).expanduser()
    meta = read_meta(path)
    if meta.get("format") == SFT_FORMAT:
        return open_sft(path, meta)
    if meta.get("format") != FORMAT:
        raise JaxlmError(f"{path / META_FILE} is not a jaxlm dataset description; prepare the dataset again")
    arrays = {}
    for split in SPLITS:
        f = path / f"{split}.bin"
        expected = meta["counts"][split]
        if not f.is_file() or f.stat().st_size != 2 * expected:
            raise JaxlmError(f"{f} is missing or truncated (expected {expected:,} tokens); prepare the dataset again")
        arr = np.memmap(f, dtype=np.uint16, mode="r") if expected else np.zeros(0, np.uint16)
        arrays[split] = np.array(arr) if f.stat().st_size <= IN_MEMORY_BYTES else arr
    return TokenData(arrays["train"], arrays["val"], meta, path)


def bundled_shakespeare() -> Path:
    return Path(str(resources.files("jaxlm") / "assets" / "tinyshakespeare.txt"))


def resolve_dataset(
    source: str, tokenizer: str = "gpt2", val_fraction: float = 0.1, *, block_size: int = 1024, allow_sft: bool = False
) -> TokenData | SFTData:
    """A dataset name (shakespeare_char, shakespeare), a prepared dir, or raw text prepared into the cache.

    Prompt/completion data (a prepared jaxlm-sft dir, or a .jsonl of pairs, prepared with `block_size`)
    opens as `SFTData` when `allow_sft`: only a trainer with a masked loss may take it.
    """
    ds = _resolve(source, tokenizer, val_fraction, block_size)
    if isinstance(ds, SFTData) and not allow_sft:
        raise JaxlmError(
            f"--dataset {source} holds prompt/completion examples; this trainer's loss has no mask to train on "
            "them, so use a text dataset"
        )
    return ds


def _resolve(source: str, tokenizer: str, val_fraction: float, block_size: int):
    if source in BUILTIN:
        src, tokenizer = bundled_shakespeare(), BUILTIN[source]
    else:
        src = Path(source).expanduser()
        if (src / META_FILE).is_file():
            return open_dataset(src)
        if not src.exists():
            raise JaxlmError(
                f"--dataset {source}: no such file or directory; use shakespeare_char, shakespeare, a prepared "
                "dataset dir, or a .txt/.jsonl file or folder"
            )
    files = _source_files(src)
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    pairs = is_pairs_file(src)
    how = [tokenizer, val_fraction] + (["sft", block_size] if pairs else [])
    key = hashlib.sha256(json.dumps([stamp, *how]).encode()).hexdigest()[:16]
    name = f"{src.stem}-{'sft' if pairs else tokenizer}-{key}"
    for root in (cache_dir() / "data", Path(tempfile.gettempdir()) / "jaxlm-data"):
        out = root / name
        if (out / META_FILE).is_file():
            return open_dataset(out)
        try:
            root.mkdir(parents=True, exist_ok=True)
            if pairs:
                made = prepare_sft(
                    src, out, block_size=block_size, val_fraction=val_fraction, tokenizer=tokenizer, exist_ok=True
                )
            else:
                made = prepare(src, out, tokenizer, val_fraction, exist_ok=True)
            return open_dataset(made)
        except PermissionError:
            continue  # read-only cache (e.g. a locked-down home): fall back to the temp dir
    raise JaxlmError(f"cannot write a dataset cache under {cache_dir()}; set JAXLM_CACHE to a writable directory")


# ---------------------------------------------------------------------------------------------
# Preparing datasets


def prepare(
    src,
    out,
    tokenizer: str = "gpt2",
    val_fraction: float = 0.1,
    text_field: str = "text",
    *,
    exist_ok: bool = False,
    progress: bool | None = None,
) -> Path:
    """Tokenize `src` into `out` (train.bin, val.bin, meta.json); written under a temp name, then renamed."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not 0 < val_fraction < 1:
        raise JaxlmError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if tokenizer not in ("gpt2", "char"):
        raise JaxlmError(f"unknown tokenizer {tokenizer!r}; use gpt2 or char")
    if out.exists() and not exist_ok:
        raise JaxlmError(f"{out} already exists; choose a new output directory")
    from tqdm import tqdm  # only when preparing: `import jaxlm` stays light

    files = _source_files(src)
    total_bytes = sum(f.stat().st_size for f in files)
    with publishing(out, exist_ok=exist_ok) as tmp:
        tok = _tokenizer_for(src, files, tokenizer, text_field)
        if tok.vocab_size > 2**16:
            raise JaxlmError(f"{src} has {tok.vocab_size:,} distinct characters; uint16 tokens hold at most 65,536")
        desc = f"tokenizing {src.name}"
        with (
            open(tmp / "train.bin", "wb") as f,
            tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=False if progress else None) as bar,
        ):
            n_docs = 0
            for ids, ends_doc in _encode(pieces(files, text_field, bar), tok):
                np.asarray(ids, np.uint16).tofile(f)
                n_docs += ends_doc
        n = (tmp / "train.bin").stat().st_size // 2
        n_train = int(n * (1 - val_fraction))  # nanoGPT's split: the first 90% trains
        if n_train < 1 or n - n_train < 1:
            raise JaxlmError(f"{src} is too small to split into train and val ({n} tokens); give it more text")
        all_N = np.memmap(tmp / "train.bin", dtype=np.uint16, mode="r")
        np.asarray(all_N[n_train:]).tofile(tmp / "val.bin")
        del all_N
        os.truncate(tmp / "train.bin", 2 * n_train)
        meta = {
            "format": FORMAT,
            "version": 1,
            "tokenizer": tok.to_spec(),
            "vocab_size": tok.vocab_size,
            "dtype": "uint16",
            "counts": {"train": n_train, "val": n - n_train},
            "val_fraction": val_fraction,
            "documents": n_docs,
            "source": str(src),
        }
        write_meta(tmp, meta)
    return out


def _source_files(src: Path) -> list[Path]:
    if not src.exists():
        raise JaxlmError(f"{src}: no such file or directory")
    if src.is_dir():
        files = sorted(p for p in src.rglob("*.txt") if p.is_file())
        if not files:
            raise JaxlmError(f"{src} is a folder without .txt files; pass a text file, a .jsonl file or such a folder")
        return files
    return [src]


def _tokenizer_for(src: Path, files: list[Path], tokenizer: str, text_field: str):
    if tokenizer == "gpt2":
        tok = get_tokenizer("gpt2")
        if not any(f.stat().st_size for f in files):
            raise JaxlmError(f"{src} holds no text; a dataset needs at least one block of tokens")
        return tok
    alphabet = set()
    for piece, _ in pieces(files, text_field, None):
        alphabet.update(piece)
    if not alphabet:
        raise JaxlmError(f"{src} holds no text; a dataset needs at least one block of tokens")
    return CharTokenizer("".join(alphabet | {"\n"}))  # "\n" separates documents


def _encode(pieces: Iterator[tuple[str, bool]], tok, batch_chars: int = 4 << 20) -> Iterator[tuple[list[int], bool]]:
    """(ids, ends_document) in order; GPT-2 ends each document with <|endoftext|>, chars separate them by a blank
    line. Pieces are encoded in batches (tiktoken encodes a batch on several threads)."""
    batch, size, doc_start, first_doc = [], 0, True, True
    for piece, ends_doc in pieces:
        if doc_start and not first_doc and tok.eot_id is None:
            piece = "\n\n" + piece
        batch.append((piece, ends_doc))
        size += len(piece)
        doc_start, first_doc = ends_doc, first_doc and not ends_doc
        if size >= batch_chars or len(batch) >= 1024:
            yield from _encode_batch(batch, tok)
            batch, size = [], 0
    yield from _encode_batch(batch, tok)


def _encode_batch(batch: list[tuple[str, bool]], tok) -> Iterator[tuple[list[int], bool]]:
    texts = [t for t, _ in batch]
    encoded = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    for ids, (_, ends_doc) in zip(encoded, batch, strict=True):
        if ends_doc and tok.eot_id is not None:
            ids.append(tok.eot_id)
        yield ids, ends_doc
