"""python -m jaxlm.convert SRC OUT [--to orbax|hf|peft]: HF GPT-2 <-> jaxlm (Orbax) checkpoints, and the
LoRA adapters a jaxlm checkpoint carries -> a PEFT adapter directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
from tqdm import tqdm

from ..cli import run_cli
from ..errors import JaxlmError
from ..lora import peft as peft_io
from ..utils.tree import count
from . import hf
from . import load as loader


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxlm.convert",
        description="Convert a GPT-2 between Hugging Face format and a jaxlm (Orbax) checkpoint (a source with LoRA "
        "adapters is written merged), or export its LoRA adapters as a Hugging Face PEFT adapter (--to peft).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("src", help="HF hub id (gpt2, gpt2-medium, ...), HF directory, jaxlm checkpoint or run dir")
    p.add_argument("out", help="output directory (must not exist, or be empty for --to hf)")
    p.add_argument(
        "--to",
        choices=["orbax", "hf", "peft"],
        default="orbax",
        help="output format; peft: adapter_config.json + adapter_model.safetensors of SRC's LoRA adapters",
    )
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to merge into SRC first")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and (args.to == "orbax" or any(out.iterdir())):
        raise JaxlmError(f"{out} already exists; choose a new output directory")
    if args.to == "peft":
        if args.adapter:
            raise JaxlmError(
                "--adapter is already a PEFT adapter; --to peft exports the adapters a jaxlm checkpoint holds"
            )
        config, _, lora, adapters, base = loader.load_lora(args.src)
        peft_io.save_adapter(out, config, lora, adapters, base_source=base.get("source"))
        n = count(adapters)
        where = ",".join(lora.targets)
        print(f"converted {args.src} -> {out} as PEFT LoRA adapter (r={lora.rank} on {where}): {n:,} parameters")
        return 0
    with tqdm(desc="reading", unit="tensor", disable=None) as bar:
        config, params, tok = loader.load_with_tokenizer(args.src, adapter=args.adapter, progress=bar.update)
    n = count(params)
    nbytes = sum(int(x.nbytes) for x in jax.tree.leaves(params))
    if args.to == "orbax":
        from ..tokenizer import from_spec

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
