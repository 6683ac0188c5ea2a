"""Prompt/completion data -> tokens + a per-token loss mask, and padded training batches.

Rows (JSONL, as TRL users write them): {"prompt", "completion"} pairs and {"text"} rows, or any rows through
a `--template` (jaxlm.data.templates). Tokenising follows TRL's SFTTrainer (trl/trainer/sft_trainer.py): append
<|endoftext|> to the completion unless it ends with one; tokenise the prompt and prompt+completion separately;
the first len(prompt_ids) tokens of the whole are the prompt (mask 0), the rest count (mask 1), EOS included.
BPE can merge across the boundary, so the prompt's tokens are not always a prefix of the whole's: TRL warns and
masks by length all the same; so do we, and count those examples. {"text"} rows count every token.
Examples longer than block_size + 1 tokens are dropped or truncated (`--truncate`), counted in the summary.

A prepared directory (written under a temp name, then renamed):
    meta.json                 {"format": "jaxlm-sft", "tokenizer", "vocab_size", "counts", "stats", ...}
    {train,val}.tokens.bin    uint16, all examples' tokens back to back
    {train,val}.mask.bin      uint8, 1 where the token is a counted target (completion and EOS)
    {train,val}.offsets.bin   int64 [n + 1]: example i is tokens[offsets[i]:offsets[i + 1]]
The val split is the file's last val_fraction of examples (jaxlm.data holds out the stream's tail).

Batches pad instead of packing (no model change: right padding is invisible to causal attention) and group
examples by length: each step draws one bucket of the ladder 32, 64, ... block_size (chance proportional to
its examples, so every example is equally likely) and its rows from that bucket. On the bundled task files
this spends far fewer tokens on padding than padding every row to block_size (docs/benchmarks.md, bench/sft_padding.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import JaxlmError
from ..tokenizer import GPT2_EOT_ID, CharTokenizer, GPT2Tokenizer
from ..utils.publish import publishing
from .prepared import META_FILE, SPLITS, Prepared, read_meta, write_meta
from .sft_rows import Stats, alphabet, examples
from .templates import parse as parse_template
from .textfiles import jsonl_rows

FORMAT = "jaxlm-sft"
TRUNCATE = ("drop", "left", "right")
MIN_BUCKET = 32


@dataclass(frozen=True)
class Examples:
    """One split: examples' tokens back to back, their token mask, and where each example starts."""

    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = slice(self.offsets[i], self.offsets[i + 1])
        return self.tokens[s], self.mask[s]


class SFTData(Prepared):
    """A prepared prompt/completion dataset (`train`, `val`: Examples); batches come from `get_batch`."""

    @property
    def eot_id(self) -> int:
        """<|endoftext|>: ends every completion and pads batch rows."""
        return self.meta.get("eot_id", GPT2_EOT_ID)

    def check_block_size(self, block_size: int):
        longest = max(int(self.split(s).lengths.max()) for s in SPLITS)
        if longest > block_size + 1:
            raise JaxlmError(
                f"dataset {self.path or ''} has an example of {longest} tokens, more than block_size + 1 = "
                f"{block_size + 1}; prepare it again with --block-size {block_size}"
            )


# ---------------------------------------------------------------------------------------------
# Preparing and opening


def is_pairs_file(src) -> bool:
    """A .jsonl file whose first row is a prompt/completion pair (a {"text"} file stays jaxlm.data's)."""
    src = Path(src)
    if not src.is_file() or src.suffix not in (".jsonl", ".ndjson"):
        return False
    try:
        _, row = next(jsonl_rows(src))
    except (StopIteration, JaxlmError):
        return False  # empty or broken: the caller's reader reports it
    return "prompt" in row or "completion" in row


def prepare(
    src,
    out,
    template: str | None = None,
    truncate: str = "drop",
    block_size: int = 1024,
    val_fraction: float = 0.1,
    *,
    tokenizer: str = "gpt2",
    exist_ok: bool = False,
) -> Path:
    """Tokenise the rows of `src` into the prepared directory `out` (see the module docstring).

    `tokenizer` "char": the alphabet of every prompt and completion character, plus <|endoftext|>.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if truncate not in TRUNCATE:
        raise JaxlmError(f"--truncate must be one of {', '.join(TRUNCATE)}, got {truncate!r}")
    if not 0 < val_fraction < 1:
        raise JaxlmError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise JaxlmError(f"--block-size must be a positive integer, got {block_size!r}")
    if not src.is_file():
        raise JaxlmError(f"{src}: not a file; prompt/completion data is one .jsonl file")
    if out.exists() and not exist_ok:
        raise JaxlmError(f"{out} already exists; choose a new output directory")
    tpl = parse_template(template) if template else None
    if tokenizer not in ("gpt2", "char"):
        raise JaxlmError(f"--tokenizer must be gpt2 or char, got {tokenizer!r}")
    tok = GPT2Tokenizer() if tokenizer == "gpt2" else CharTokenizer(alphabet(src, tpl), eot=True)
    stats = Stats()
    rows = list(examples(src, tpl, truncate, block_size, stats, tok))  # reads everything before writing anything
    if not rows:
        raise JaxlmError(
            f"{src} has no usable examples ({stats.rows} rows, {stats.dropped} longer than block_size + 1 = "
            f"{block_size + 1} tokens); raise --block-size or use --truncate left|right"
        )
    n_val = max(1, int(round(len(rows) * val_fraction)))
    if len(rows) - n_val < 1:
        raise JaxlmError(f"{src} has {len(rows)} usable example(s), too few to split into train and val; add more")
    splits = {"train": rows[:-n_val], "val": rows[-n_val:]}
    with publishing(out, exist_ok=exist_ok) as tmp:
        for name, part in splits.items():
            lengths = [len(ids) for ids, _ in part]
            np.concatenate([ids for ids, _ in part]).astype(np.uint16).tofile(tmp / f"{name}.tokens.bin")
            np.concatenate([m for _, m in part]).astype(np.uint8).tofile(tmp / f"{name}.mask.bin")
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tofile(tmp / f"{name}.offsets.bin")
        meta = {
            "format": FORMAT,
            "version": 1,
            "tokenizer": tok.to_spec(),
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "counts": {name: len(part) for name, part in splits.items()},
            "tokens": {name: sum(len(ids) for ids, _ in part) for name, part in splits.items()},
            "val_fraction": val_fraction,
            "block_size": block_size,
            "truncate": truncate,
            "template": template,
            "stats": vars(stats),
            "source": str(src),
        }
        write_meta(tmp, meta)
    return out


def open_sft(path, meta: dict | None = None) -> SFTData:
    """A prepared prompt/completion directory (`meta`: its meta.json, when already read)."""
    path = Path(path).expanduser()
    meta = read_meta(path) if meta is None else meta
    splits = {}
    for name in SPLITS:
        n, t = meta["counts"][name], meta["tokens"][name]
        arrays = []
        for part, dtype, size in (("tokens", np.uint16, t), ("mask", np.uint8, t), ("offsets", np.int64, n + 1)):
            f = path / f"{name}.{part}.bin"
            if not f.is_file() or f.stat().st_size != size * np.dtype(dtype).itemsize:
                raise JaxlmError(f"{f} is missing or truncated; prepare the dataset again")
            arrays.append(np.fromfile(f, dtype=dtype))
        splits[name] = Examples(*arrays)
    return SFTData(splits["train"], splits["val"], meta, path)


def summary(meta: dict) -> str:
    """The prepare summary: what was kept, truncated, dropped and mismatched; never silent."""
    s, c = meta["stats"], meta["counts"]
    limit = meta["block_size"] + 1
    lines = [
        f"{s['rows']:,} rows ({s['pairs']:,} prompt/completion, {s['text_rows']:,} text) -> "
        f"{c['train']:,} train + {c['val']:,} val examples, {s['tokens']:,} tokens, {s['counted']:,} counted "
        f"in the loss; longest {s['longest']:,} tokens",
        f"longer than block_size + 1 = {limit:,} tokens: {s['truncated']:,} truncated ({meta['truncate']}), "
        f"{s['dropped']:,} dropped",
    ]
    if s["prefix_mismatch"]:
        lines.append(
            f"prompt tokens not a prefix of prompt+completion tokens: {s['prefix_mismatch']:,} examples (first at "
            f"line {s['first_mismatch_line']}); masked by the prompt's token count, as TRL does"
        )
    else:
        lines.append("prompt tokens a prefix of prompt+completion tokens in every example")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Batches


def bucket_lengths(block_size: int) -> list[int]:
    """Row lengths T a batch may have: 32, 64, ... below block_size, then block_size (one compile each)."""
    ladder, t = [], MIN_BUCKET
    while t < block_size:
        ladder.append(t)
        t *= 2
    return [*ladder, block_size]


def get_batch(data: SFTData, split: str, seed: int, step: int, shape, block_size: int, rows=None, buckets=None):
    """This process's rows of `step`'s global [A, B] batch: (tokens int32 [A, b, T + 1], mask float32 [A, b, T]).

    T is one of `buckets` (default `bucket_lengths(block_size)`), the same for every process and micro-batch
    of a step; the batch is a pure function of (data, seed, split, step, shape) and `rows` (a slice of B).
    mask[..., t] is 1 where target tokens[..., t + 1] counts; padding (EOS ids) never counts.
    """
    ex = data.split(split)
    ladder = np.asarray(sorted(buckets) if buckets is not None else bucket_lengths(block_size))
    if ladder.max() > block_size:
        raise JaxlmError(f"bucket {ladder.max()} exceeds block_size {block_size}")
    lengths = ex.lengths
    which = np.searchsorted(ladder + 1, lengths)  # smallest bucket whose T + 1 tokens hold the example
    if which.max() == len(ladder):
        data.check_block_size(int(ladder.max()))
    counts = np.bincount(which, minlength=len(ladder))
    rng = np.random.default_rng([seed & (2**64 - 1), SPLITS[split], step])
    k = rng.choice(len(ladder), p=counts / counts.sum())
    members = np.flatnonzero(which == k)
    picks_AxB = members[rng.integers(0, len(members), size=shape[0] * shape[1])].reshape(shape)
    picks_Axb = picks_AxB[:, rows if rows is not None else slice(None)]
    T = int(ladder[k])
    tokens = np.full((*picks_Axb.shape, T + 1), data.eot_id, np.int32)
    mask = np.zeros((*picks_Axb.shape, T), np.float32)
    for (a, b), i in np.ndenumerate(picks_Axb):
        ids, m = ex.example(i)
        tokens[a, b, : len(ids)] = ids
        mask[a, b, : len(ids) - 1] = m[1:]
    return tokens, mask


# ---------------------------------------------------------------------------------------------
# Command line (wired into `python -m jaxlm.data prepare`)


def add_prepare_arguments(parser):
    parser.add_argument(
        "--template",
        default=None,
        help="turn rows into pairs: summarize, translate, qa, or 'PROMPT=>COMPLETION' with {field} names "
        "(\\n = newline); default: the rows' own prompt/completion (or text) fields",
    )
    parser.add_argument(
        "--truncate", choices=TRUNCATE, default="drop", help="examples over block_size + 1 tokens: drop or cut a side"
    )
    parser.add_argument(
        "--block-size",
        "--block_size",
        type=int,
        default=1024,
        help="model context; an example may have block_size + 1 tokens",
    )


def main_prepare(args) -> int:
    out = prepare(
        args.src, args.out, args.template, args.truncate, args.block_size, args.val_fraction, tokenizer=args.tokenizer
    )
    meta = json.loads((out / META_FILE).read_text())
    print(f"wrote {out} (prompt/completion, tokenizer {meta['tokenizer']['kind']}, vocab {meta['vocab_size']:,})")
    print(summary(meta))
    return 0
