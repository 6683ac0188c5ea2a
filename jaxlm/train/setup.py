"""Setup: everything that can fail on user input happens here, before any compile.

Resolves the run directory (fresh, replaced or resumed), the data, the model (from scratch, a pretrained
source or the run's checkpoint), the mesh and the train state's layout. The resumed run's config is
merged in one place: `resume_config`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp

from ..config import ARCH_FIELDS, GPTConfig, TrainConfig
from ..data import sft
from ..data import tokens as data
from ..errors import JaxlmError
from ..io import load as loader
from ..io import runs
from ..kernels import PORTABLE, Kernels
from ..kernels import resolve as resolve_kernels
from ..lora.adapters import describe as describe_lora
from ..model.gpt import crop_context
from ..parallel import sharding
from ..parallel.memory import training_memory
from ..utils.tree import leaf_paths
from .adapters import FLAGS as LORA_FLAGS
from .adapters import (
    base_record,
    check_lora_flags,
    lora_from_meta,
    lora_layout,
    lora_run_meta,
    lora_seam,
    new_lora_state,
    own,
)
from .optimizer import make_optimizer
from .state import check_prng_impl, model_layout, new_state, restore_state

_RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "loss.png")
COMPUTE_FIELDS = ("dropout", "dtype", "remat", "scan_layers")  # how a stored model computes: flags may change
# On a GPU or TPU, how a run whose flags leave them unset computes (TrainConfig's defaults are the CPU's: layers
# unrolled, no remat). Layers scanned: XLA compiles one layer's program, 3-5x faster than the unrolled stack
# for GPT-2 124M. Remat (a second forward pass in the backward, ~1/3 more compute) only where the activations
# would not fit: parallel.memory's estimate without it above REMAT_ABOVE of the device's memory (the compiled
# peak measured up to 1.45x that estimate, so this keeps it under ~3/4 of the chip). docs/accelerators.md.
REMAT_ABOVE = 0.5


class RunComplete(Exception):
    """--init-from resume on a run that already reached --max-iters: nothing to do."""


@dataclass
class Setup:
    """Everything resolved before the first step."""

    cfg: TrainConfig
    config: GPTConfig
    data: data.TokenData | sft.SFTData
    tokenizer: dict
    start: int  # updates done (a resumed run's checkpoint step)
    mesh: jax.sharding.Mesh
    state_shardings: dict
    state_shapes: dict
    init_state: Callable[[], dict]  # fresh or restored, placed on state_shardings
    frozen_paths: tuple[str, ...] = ()  # params held fixed ("a/b/leaf"), recorded with each checkpoint
    lora: dict | None = None  # a LoRA run: {"config", "base": {"source", "fingerprint"}}, recorded likewise
    loss_fn: Callable | None = None  # None: the LM loss of `config`
    kernels: Kernels = PORTABLE  # what the steps run, resolved from the mesh (jaxlm.kernels)


def setup(cfg: TrainConfig, explicit: frozenset = frozenset(), log=print, trainable=None, mesh=None) -> Setup:
    """Resolve `cfg` into a Setup; `trainable` (a predicate on param paths, None: all) picks what trains; `mesh`
    (a jax Mesh with jaxlm's axes, in any device order) replaces the one --mesh makes."""
    out = Path(cfg.out_dir).expanduser()
    resume = cfg.init_from == "resume"
    lora_flags = None if resume else check_lora_flags(cfg, explicit)  # before anything is written
    _check_writable(out)
    previous = runs.latest_run_meta(out)
    if resume:
        if previous is None:
            raise JaxlmError(f"--init-from resume: {out} holds no checkpoint to resume; use --init-from scratch")
        cfg = resume_config(cfg.to_dict(), explicit, previous[1])
        _check_incomplete(out, previous[0], cfg)
        check_prng_impl(previous[1])

    params, tokenizer = None, None  # a pretrained source's own (None: the dataset's)
    if resume:
        config = GPTConfig.from_dict(previous[1]["model"]).replace(**compute_overrides(cfg))
        ds = open_data(cfg, config.block_size, log)
        _check_same_data(previous[1], ds)
    elif cfg.init_from == "scratch":
        ds = open_data(cfg, cfg.block_size, log)
        config = cfg.model_config(ds.vocab_size)
    else:
        log(f"initialising from {cfg.init_from}")
        config, params, tokenizer = loader.load_with_tokenizer(cfg.init_from, **compute_overrides(cfg))
        config, params = _crop_pretrained(cfg, explicit, config, params)
        ds = open_data(cfg, config.block_size, log)
        _check_tokenizer(cfg, tokenizer, ds)
    tokenizer = tokenizer or ds.tokenizer_spec
    if ds.vocab_size > config.vocab_size:
        raise JaxlmError(f"dataset vocab {ds.vocab_size} exceeds the model's vocab_size {config.vocab_size}")

    if not resume and previous is not None:
        _replace_run(out, previous, config, cfg.overwrite, log)

    mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
    if cfg.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise JaxlmError(
            f"--batch-size {cfg.batch_size} must be divisible by the data x fsdp mesh size "
            f"{mesh.shape['data'] * mesh.shape['fsdp']}"
        )
    platform = mesh.devices.flat[0].platform
    if not resume and platform != "cpu":  # a resumed run computes as it began (its config holds what was chosen)
        chosen = for_platform(cfg, explicit, config, platform, dict(mesh.shape), device_memory())
        if chosen:
            cfg, config = cfg.replace(**chosen), config.replace(**chosen)
            settings = ", ".join(f"{k}={v}" for k, v in chosen.items())
            log(f"on {platform}: {settings} (the platform's rule; --scan-layers and --remat choose)")
    kernels = resolve_kernels(mesh, dtype=config.dtype, dropout=config.dropout, attention=cfg.attention)
    tx = make_optimizer(cfg)
    start = previous[0] if resume else 0
    if (resume and "lora" in previous[1]) or lora_flags is not None:
        return _lora_setup(cfg, config, ds, tokenizer, start, mesh, tx, previous, lora_flags, params, log, kernels)
    if resume:  # the run's own split: what it froze stays frozen
        frozen = set(previous[1].get("frozen_paths", ()))
        trainable = (lambda path: path not in frozen) if frozen else None
    shapes, shardings = model_layout(config, tx, mesh, trainable)
    if resume:
        init = partial(restore_state, out, previous[0], shapes, shardings)
    else:
        init = partial(new_state, config, tx, shardings, cfg.seed, params, trainable)
    frozen_paths = tuple(leaf_paths(shapes["frozen"]))
    return Setup(cfg, config, ds, tokenizer, start, mesh, shardings, shapes, init, frozen_paths, kernels=kernels)


def for_platform(
    cfg: TrainConfig, explicit: frozenset, config: GPTConfig, platform: str, mesh: dict, device_bytes: int | None
) -> dict:
    """{field: value} the platform's rule (REMAT_ABOVE) sets for `config` trained by `cfg` on `mesh` ({axis:
    size}) of `platform` devices with `device_bytes` each (None: unknown, no remat); {} on a CPU. A field given
    by a flag or preset (`explicit`), or unlike TrainConfig's default (a library caller's choice), stays."""
    if platform == "cpu":
        return {}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    unset = [k for k in ("scan_layers", "remat") if k not in explicit and getattr(cfg, k) == defaults[k]]
    chosen = {}
    if "scan_layers" in unset:
        chosen["scan_layers"] = True
    if "remat" in unset:
        itemsize = jnp.dtype(config.dtype).itemsize
        need = training_memory(config, mesh, cfg.batch_size, config.block_size, False, itemsize).total
        chosen["remat"] = device_bytes is not None and need > REMAT_ABOVE * device_bytes
    return {k: v for k, v in chosen.items() if getattr(cfg, k) != v}


def device_memory(device=None) -> int | None:
    """Bytes of memory of `device` (default: the first local one) as its runtime reports them, or None."""
    stats = (device or jax.local_devices()[0]).memory_stats()  # None on a CPU
    return (stats or {}).get("bytes_limit")


def open_data(cfg: TrainConfig, block_size: int, log) -> data.TokenData | sft.SFTData:
    """The run's dataset, checked against the model's context; pairs files are prepared for that context."""
    ds = data.resolve_dataset(cfg.dataset, cfg.tokenizer, block_size=block_size, allow_sft=True)
    ds.check_block_size(block_size)
    if isinstance(ds, sft.SFTData):
        log(sft.summary(ds.meta))
    return ds


def check_incomplete(cfg: TrainConfig, explicit: frozenset = frozenset()):
    """Raise RunComplete when `cfg` resumes a run that already reached its --max-iters (reads, writes nothing)."""
    out = Path(cfg.out_dir).expanduser()
    previous = runs.latest_run_meta(out) if cfg.init_from == "resume" else None
    if previous is not None:
        _check_incomplete(out, previous[0], resume_config(cfg.to_dict(), explicit, previous[1]))


def _check_incomplete(out: Path, step: int, cfg: TrainConfig):
    if step >= cfg.max_iters:
        raise RunComplete(
            f"the run in {out} is complete: step {step} of --max-iters {cfg.max_iters}; to train "
            f"further, resume with a larger --max-iters (e.g. --max-iters {2 * step})"
        )


def _lora_setup(cfg, config, ds, tokenizer, start, mesh, tx, previous, lora_flags, params, log, kernels) -> Setup:
    """A LoRA run: adapters train (fresh, from --adapter, or the run's own), the base is frozen."""
    if lora_flags is None:  # resume: the run's LoRA config; the base is reloaded and checked when built
        lc, base = lora_from_meta(previous[1])
        lc = lc.replace(dropout=cfg.lora_dropout) if cfg.adapter is None else lc
    else:
        (lc, adapters), base = lora_flags, base_record(cfg.init_from, config, params)
    lc.check(config)
    shapes, shardings = lora_layout(config, lc, tx, mesh)
    if lora_flags is None:  # the base first: a changed one fails here, before any compile
        out = Path(cfg.out_dir).expanduser()
        frozen = loader.load_lora_base(base, config, shardings["frozen"], run=out)
        frozen = own(frozen, shardings["frozen"], config.param_dtype)
        init = partial(restore_state, out, start, shapes, shardings, frozen=frozen)
    else:
        held = [params]  # handed over to the state, not kept: a Setup holding it would keep a second base alive

        def init():
            return new_lora_state(config, lc, tx, shardings, cfg.seed, held.pop(), adapters)

    log(describe_lora(config, lc) + (f" (continuing {cfg.adapter})" if cfg.adapter and not start else ""))
    loss_fn = lora_seam(config, lc, kernels)
    meta = lora_run_meta(lc, base)
    return Setup(cfg, config, ds, tokenizer, start, mesh, shardings, shapes, init, (), meta, loss_fn, kernels)


def _check_writable(out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise JaxlmError(f"cannot write to --out-dir {out} ({e.strerror}); choose a writable directory") from None


def resume_config(values: dict, explicit: frozenset, meta: dict) -> TrainConfig:
    """The stored run's config with the flags given now on top (model shape flags must agree)."""
    model = meta["model"]
    for name in ARCH_FIELDS:
        if name in explicit and values[name] not in (None, model[name]):
            raise JaxlmError(
                f"--init-from resume: the run has {name}={model[name]} but --{name.replace('_', '-')} "
                f"{values[name]} was given; drop the flag (or start a new run)"
            )
    for name in LORA_FLAGS:  # the adapters' shapes and scale are the run's
        if name in explicit and name != "lora_dropout" and values[name] != meta["train"].get(name, values[name]):
            raise JaxlmError(
                f"--init-from resume: the run has {name}={meta['train'].get(name)} but --{name.replace('_', '-')} "
                f"{values[name]} was given; drop the flag (or start a new run)"
            )
    changes = {k: values[k] for k in explicit if k not in ARCH_FIELDS}
    return TrainConfig.from_dict({**meta["train"], **changes, "init_from": "resume", "out_dir": values["out_dir"]})


def run_meta(out_dir) -> tuple[int, dict] | None:
    """(latest step, meta) of the run in `out_dir`, or None when it holds no complete checkpoint."""
    return runs.latest_run_meta(Path(out_dir).expanduser())


def compute_overrides(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in COMPUTE_FIELDS}


def _check_same_data(meta: dict, ds: data.TokenData):
    was = meta.get("data", {})
    now = {"counts": ds.meta["counts"], "tokenizer": ds.tokenizer_spec}
    if {k: was.get(k) for k in now} != now:
        raise JaxlmError(
            "--init-from resume: the dataset differs from the one the run was trained on (token counts or "
            "tokenizer changed); resume with the same --dataset, or fine-tune with --init-from <run dir>"
        )


def _replace_run(out: Path, previous: tuple[int, dict], config: GPTConfig, overwrite: bool, log):
    old = GPTConfig.from_dict(previous[1]["model"])
    if old.architecture() != config.architecture() and not overwrite:
        raise JaxlmError(
            f"{out} holds a run of a different model ({old.arch_summary()}, step {previous[0]}) than this one "
            f"({config.arch_summary()}); pass --overwrite to replace it, --init-from resume to continue it, "
            "or choose another --out-dir"
        )
    log(f"replacing the run in {out} (step {previous[0]})")
    for name in _RUN_FILES:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def _crop_pretrained(cfg: TrainConfig, explicit: frozenset, config: GPTConfig, params):
    """A pretrained model as the flags may change it: a shorter context (positions cropped), nothing else."""
    for name in ("n_layer", "n_head", "n_embd", "vocab_size"):
        if name in explicit and getattr(cfg, name) not in (None, getattr(config, name)):
            raise JaxlmError(
                f"--init-from {cfg.init_from} has {name}={getattr(config, name)}; drop --{name.replace('_', '-')}"
            )
    if "block_size" in explicit and cfg.block_size != config.block_size:
        if cfg.block_size > config.block_size:
            raise JaxlmError(
                f"--block-size {cfg.block_size} exceeds {cfg.init_from}'s context of {config.block_size} tokens"
            )
        config, params = crop_context(config, params, cfg.block_size)
    return config, params


def _check_tokenizer(cfg: TrainConfig, tokenizer: dict | None, ds):
    if tokenizer is not None and tokenizer != ds.tokenizer_spec:
        raise JaxlmError(
            f"{cfg.init_from} was trained with the {tokenizer.get('kind')} tokenizer but the dataset uses "
            f"{ds.tokenizer_spec.get('kind')}; prepare the data with that tokenizer (e.g. --dataset shakespeare)"
        )
