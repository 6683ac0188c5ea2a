"""Tokens per step spent on padding: length buckets vs padding every row to block_size.

    python bench/sft_padding.py [--block-size 1024] [--batch 8] [--steps 500]

Prepares each bundled task file (../shared/data) with its template (--truncate left) and draws `--steps`
train batches of [1, batch] rows with jaxlm.data.sft.get_batch, once with the default bucket ladder and once
with the single bucket block_size. No timing: the numbers are counts, the same on any machine. Writes
bench/results/sft_padding.json (a non-default --block-size or --batch adds its own suffix).
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import record  # early: the run's start time and load average

from jaxlm.data import sft

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = [
    ("summarize", "summarization/xsum_test_subset.jsonl"),
    ("summarize", "summarization/dialogsum_test.jsonl"),
    ("translate", "translation/newstest2021.en-de.jsonl"),
    ("translate", "translation/newstest2021.de-en.jsonl"),
    ("qa", "qa/xquad_en.jsonl"),
    ("qa", "qa/nq_open_dev.jsonl"),
]


def padding(ds, block_size, batch, steps, buckets):
    slots = real = 0
    for step in range(steps):
        tokens, mask = sft.get_batch(ds, "train", 0, step, (1, batch), block_size, buckets=buckets)
        lengths = [int(np.flatnonzero(m)[-1]) + 1 for m in mask[0]]  # targets up to each row's EOS
        slots += mask.size
        real += sum(lengths)
    return (slots - real) / steps, (slots - real) / slots


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--data", default=str(SHARED), help="the shared data folder")
    a = p.parse_args()
    print(f"block_size {a.block_size}, batch {a.batch}, {a.steps} steps; padding targets per step (share)")
    print(f"{'file':40s} {'template':10s} {'buckets':>16s} {'pad to block':>16s}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for template, name in FILES:
            out = sft.prepare(Path(a.data) / name, Path(tmp) / name.replace("/", "_"), template, "left", a.block_size)
            ds = sft.open_sft(out)
            b = padding(ds, a.block_size, a.batch, a.steps, None)
            f = padding(ds, a.block_size, a.batch, a.steps, [a.block_size])
            print(f"{name:40s} {template:10s} {b[0]:9,.0f} ({b[1]:4.0%}) {f[0]:9,.0f} ({f[1]:4.0%})")
            rows.append(
                {
                    "file": name,
                    "template": template,
                    "buckets_pad_targets_per_step": round(b[0]),
                    "buckets_pad_pct": round(100 * b[1], 1),
                    "pad_to_block_targets_per_step": round(f[0]),
                    "pad_to_block_pct": round(100 * f[1], 1),
                }
            )
    notes = (
        f"block_size {a.block_size}, batch {a.batch}, {a.steps} train batches per file, --truncate left; "
        "padding targets per step (and their share of the batch's target slots) with the default bucket "
        "ladder against the single bucket block_size. Counts: the same on any machine."
    )
    name = "sft_padding" + ("" if a.block_size == 1024 else f"_block{a.block_size}")
    name += "" if a.batch == 8 else f"_b{a.batch}"
    print(record.save(name, rows, notes=notes))


if __name__ == "__main__":
    main()
