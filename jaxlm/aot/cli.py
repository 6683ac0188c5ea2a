"""`python -m jaxlm.aot --topology v5e:2x2 --config gpt2-124m`: does this run fit that TPU slice? Asked from a CPU.

The run is given as train.py takes it (every train.py flag: --config, --batch-size, --mesh, --lora-rank,
--init-from, --remat, ...); its programs are compiled by libtpu for the slice's chips, with the mesh, shardings
and scan/remat choice train.py would make there (`jaxlm.train.setup.for_platform`), and the memory each chip
needs is printed next to what it has. A program that does not fit exits 2 with one line saying which.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import PRESETS, GPTConfig, TrainConfig
from ..data.tokens import resolve_dataset
from ..errors import JaxlmError
from ..io import load as loader
from ..parallel import sharding
from ..train.adapters import from_flags
from ..train.flags import parse_train_flags
from ..train.runtime import vocab_size_of
from ..train.setup import compute_overrides, for_platform
from ..utils.publish import write_file
from .programs import generation_programs, train_programs
from .report import compile_program, gib, summary, table
from .topology import Slice, open_slice

PROG = "python -m jaxlm.aot"
PROGRAMS = ("train", "eval", "prefill", "decode")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Compile a run's train, eval and sampling programs for a TPU slice from this machine (libtpu, no "
        "TPU needed) and print the memory each chip needs against what it has.",
        epilog="Every train.py flag sets the run as train.py takes it (python train.py --help): --batch-size, "
        "--mesh, --lora-rank, --init-from, --block-size, --remat, --scan-layers, --dtype, ...",
    )
    p.add_argument("--topology", required=True, help="the TPU slice, GENERATION:CHIPS, e.g. v5e:2x2, v5e:4x4, v6e:2x2")
    p.add_argument("--config", default=None, help="train.py's --config preset, e.g. gpt2-124m or finetune-gpt2")
    p.add_argument(
        "--num-samples",
        type=int,
        default=3,
        help="prefill and decode: the batch, as sample.py's --num-samples (one device, sample.py's default)",
    )
    p.add_argument("--json", default=None, help="also write the report here as JSON (custom calls included)")
    p.add_argument(
        "--programs",
        default=",".join(PROGRAMS),
        help="which to compile, comma-separated: train (LoRA's with --lora-rank), eval, prefill, decode",
    )
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, TrainConfig, frozenset]:
    """(this command's arguments, the run's TrainConfig, the fields its flags and preset set); nothing compiled."""
    args, rest = build_parser().parse_known_args(argv)
    values, explicit = parse_train_flags((["--config", args.config] if args.config else []) + rest, prog=PROG)
    args.programs = [p.strip() for p in args.programs.split(",") if p.strip()]
    if args.num_samples < 1:
        raise JaxlmError(f"--num-samples must be >= 1, got {args.num_samples}")
    unknown = [p for p in args.programs if p not in PROGRAMS]
    if unknown or not args.programs:
        raise JaxlmError(f"--programs takes {', '.join(PROGRAMS)} (comma-separated), got {unknown or 'none'}")
    values["dataset"] = values["dataset"] or "none"  # the data is never read: only its tokenizer's vocabulary
    if values["lora_rank"] and values["init_from"] == "scratch":
        values["init_from"] = "gpt2"  # LoRA adapts a pretrained model: GPT-2 unless --init-from says which
    if values["adapter"]:
        raise JaxlmError("--adapter is not compiled here; give its rank with --lora-rank instead")
    return args, TrainConfig(**values), explicit


def model_config(cfg: TrainConfig, explicit: frozenset) -> GPTConfig:
    """The model `cfg` trains, from its flags, or read from --init-from's config (no weights are read)."""
    overrides = compute_overrides(cfg)
    if cfg.init_from == "scratch":
        vocab = vocab_size_of(cfg.to_dict())  # char-level data: known once its text is read (bundled: prepared once)
        return cfg.model_config(vocab or resolve_dataset(cfg.dataset, cfg.tokenizer).vocab_size)
    source = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
    if source in PRESETS and source.startswith("gpt2") and not Path(source).exists():
        config = GPTConfig.preset(source, **overrides)  # OpenAI's GPT-2 sizes: known without a download
    else:
        config = loader.read_config(source, **overrides)
    if "block_size" in explicit and cfg.block_size < config.block_size:
        config = config.replace(block_size=cfg.block_size)  # train.py crops the positions to the shorter context
    return config


def resolve_run(cfg: TrainConfig, explicit: frozenset, tpu: Slice):
    """(cfg, config, mesh, LoraConfig or None) of the run on `tpu` as train.py would set it up there: the mesh
    over the slice's devices, and scan/remat chosen by the platform's rule where the flags leave them unset."""
    config = model_config(cfg, explicit)
    mesh = sharding.make_mesh(cfg.mesh, devices=list(tpu.devices))
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % rows:
        raise JaxlmError(f"--batch-size {cfg.batch_size} does not split over the mesh's {rows} data x fsdp rows")
    chosen = for_platform(cfg, explicit, config, "tpu", dict(mesh.shape), tpu.device_bytes)
    cfg, config = cfg.replace(**chosen), config.replace(**chosen)
    return cfg, config, mesh, from_flags(cfg).check(config) if cfg.lora_rank else None


def main(argv=None) -> int:
    args, cfg, explicit = parse_args(argv)
    tpu = open_slice(args.topology)
    cfg, config, mesh, lora = resolve_run(cfg, explicit, tpu)
    memory = f"{gib(tpu.device_bytes)} GiB each" if tpu.device_bytes else "memory unknown"
    print(f"model: {config.num_params() / 1e6:.2f}M params ({config.arch_summary()}), {config.dtype}")
    print(
        f"slice: {args.topology}, {len(tpu.devices)} x {tpu.kind} ({memory}); mesh "
        + ",".join(f"{a}={n}" for a, n in mesh.shape.items())
        + f"; scan_layers={config.scan_layers}, remat={config.remat}"
        + (f"; LoRA r={lora.rank} on {','.join(lora.targets)}" if lora else ""),
        flush=True,
    )
    T, asked = config.block_size, set(args.programs)
    programs = train_programs(cfg, config, mesh, lora) if asked & {"train", "eval"} else []
    if asked & {"prefill", "decode"}:  # a prompt of half the context, then decoding against a cache of all of it
        programs += generation_programs(config, tpu.devices[0], args.num_samples, max(1, T // 2), T)
    programs = [p for p in programs if p.name.split()[-1] in asked]
    results = [compile_program(p) for p in programs]
    print(table(results, tpu.device_bytes, len(tpu.devices)))
    if args.json:
        write_file(args.json, json.dumps(summary(results, tpu, mesh, config, lora), indent=1) + "\n")
    over = [r for r in results if not r.fits]
    if over:
        r = over[0]
        fixes = ([] if config.remat else ["--remat true"]) + ["a smaller --batch-size", "more chips with --mesh fsdp=N"]
        raise JaxlmError(
            f"{r.program.name} ({r.program.shapes}) does not fit a {tpu.kind}: {r.error.rstrip('.')}; try "
            + ", ".join(fixes)
        )
    peak = max(results, key=lambda r: r.memory()["peak"])
    limit = f" of {gib(tpu.device_bytes)} GiB" if tpu.device_bytes else ""
    print(f"fits: the largest, {peak.program.name}, needs {gib(peak.memory()['peak'])} GiB{limit} per device")
    return 0
