"""`python -m jaxlm.data prepare SRC OUT`: tokenize text (or prompt/completion rows) into a prepared dataset."""

from __future__ import annotations

import argparse
import json

from .sft import add_prepare_arguments, is_pairs_file, main_prepare
from .tokens import META_FILE, prepare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxlm.data", description="Prepare text for training.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser(
        "prepare",
        help="tokenize text into train.bin / val.bin / meta.json",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    q.add_argument("src", help="a text file, a folder of .txt files, or a .jsonl file")
    q.add_argument("out", help="output directory (must not exist)")
    q.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2", help="GPT-2 BPE or characters")
    q.add_argument("--val-fraction", "--val_fraction", type=float, default=0.1, help="tail of the tokens held out")
    q.add_argument("--text-field", "--text_field", default="text", help="JSONL field holding the text")
    add_prepare_arguments(q)  # prompt/completion JSONL (or --template): prepared by jaxlm.data.sft
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.template or is_pairs_file(args.src):
        return main_prepare(args)
    out = prepare(args.src, args.out, args.tokenizer, args.val_fraction, args.text_field)
    meta = json.loads((out / META_FILE).read_text())
    c = meta["counts"]
    print(
        f"wrote {out}: {c['train']:,} train + {c['val']:,} val tokens, {meta['documents']:,} documents, "
        f"tokenizer {meta['tokenizer']['kind']} (vocab {meta['vocab_size']:,})"
    )
    print(f"train on it: python train.py --dataset {out}")
    return 0
