"""python -m jaxlm.convert SRC OUT [--to orbax|hf]: HF GPT-2 <-> jaxlm (Orbax) checkpoints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from . import hf, loader
from .cli import run_cli
from .errors import JaxlmError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxlm.convert",
        description="Convert a GPT-2 between Hugging Face format and a jaxlm (Orbax) checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("src", help="HF hub id (gpt2, gpt2-medium, ...), HF directory, jaxlm checkpoint or run dir")
    p.add_argument("out", help="output directory (must not exist, or be empty for --to hf)")
    p.add_argument("--to", choices=["orbax", "hf"], default="orbax", help="output format")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and (args.to == "orbax" or any(out.iterdir())):
        raise JaxlmError(f"{out} already exists; choose a new output directory")
    with tqdm(desc="reading", unit="tensor", disable=None) as bar:
        config, params, tok = loader.load_with_tokenizer(args.src, progress=bar.update)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    nbytes = sum(int(x.nbytes) for x in jax.tree.leaves(params))
    if args.to == "orbax":
        from .tokenizer import from_spec

        loader.save(out, config, params, from_spec(tok) if tok else None)
        kind = "jaxlm checkpoint (Orbax)"
    else:
        with tqdm(desc="writing", unit="tensor", disable=None) as bar:
            hf.to_hf(config, params, out, progress=bar.update)
        kind = "HF GPT-2 directory (config.json + model.safetensors)"
    print(f"converted {args.src} -> {out} as {kind}: {n:,} parameters, {nbytes / 1e6:,.1f} MB")
    return 0


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
