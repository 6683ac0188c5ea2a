"""LoRA runs on the training library: the adapters are the trainable state, the pretrained base the frozen part.

state["params"] = adapters (`lora.init`, or a PEFT adapter's from --adapter), state["frozen"] = the base
params, the loss `lm_loss(config, lora)`: the step itself is the library's, so only the adapters get
gradients and Adam moments, and the base is donated through each step unchanged (not copied).
A run checkpoint holds the adapters and their optimizer state only; the base (hundreds of MB that never
change) is recorded by source and fingerprint, reloaded on resume or load, and refused if its weights changed.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from ..config import GPTConfig, TrainConfig
from ..errors import JaxlmError
from ..io import load as loader
from ..kernels import PORTABLE, Kernels
from ..lora import adapters as lora_lib
from ..lora import peft as peft_io
from ..model.gpt import param_shapes
from ..model.loss import lm_loss
from ..parallel import sharding
from .state import fresh_state
from .state import layout as state_layout

FLAGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_rslora", "adapter")
_SET_BY_ADAPTER = ("lora_alpha", "lora_targets", "lora_rslora")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_lora_flags(cfg: TrainConfig, explicit: frozenset):
    """(LoraConfig, adapters from --adapter or None), or None without LoRA; every LoRA flag error is raised
    here, before anything is written (the base's config is read, not its weights)."""
    if not cfg.lora:
        given = [_flag(f) for f in FLAGS if f in explicit and f != "lora_rank"]
        if given:
            raise JaxlmError(f"{given[0]} needs --lora-rank > 0 (or --adapter); LoRA is off")
        return None
    base_config = loader.read_config(cfg.init_from)
    if cfg.adapter is None:
        return from_flags(cfg).check(base_config), None
    given = [_flag(f) for f in _SET_BY_ADAPTER if f in explicit]
    if given:
        raise JaxlmError(f"--adapter {cfg.adapter} sets the LoRA rank, alpha and targets; drop {given[0]}")
    lc, adapters = peft_io.load_adapter(cfg.adapter, base_config)
    if "lora_dropout" in explicit:
        lc = lc.replace(dropout=cfg.lora_dropout)
    return lc, adapters


def from_flags(cfg: TrainConfig) -> lora_lib.LoraConfig:
    return lora_lib.LoraConfig(
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        targets=cfg.lora_targets,
        rslora=cfg.lora_rslora,
    )


def lora_from_meta(meta: dict) -> tuple[lora_lib.LoraConfig, dict]:
    """(LoraConfig, base record) a LoRA run's checkpoint meta holds."""
    try:
        return lora_lib.LoraConfig.from_dict(meta["lora"]["config"]), dict(meta["lora"]["base"])
    except (JaxlmError, KeyError, TypeError) as e:
        raise JaxlmError(f"the run's checkpoint records an invalid LoRA config ({e}); start a new run") from None


def lora_run_meta(lc: lora_lib.LoraConfig, base: dict) -> dict:
    """What each checkpoint's meta records: {"config": LoraConfig fields, "base": {"source", "fingerprint"}}."""
    return {"config": lc.to_dict(), "base": base}


def base_record(source: str, config: GPTConfig, params) -> dict:
    return loader.lora_base_record(source, jax.tree.map(lambda x: jnp.asarray(x, config.param_dtype), params))


def lora_layout(config: GPTConfig, lc: lora_lib.LoraConfig, tx, mesh):
    """(shapes, shardings) of a LoRA train state: adapters by the rules table, the base as the model's params."""
    return state_layout(
        lora_lib.shapes(config, lc),
        sharding.lora_shardings(config, lc, mesh),
        tx,
        mesh,
        param_shapes(config),
        sharding.param_shardings(config, mesh),
    )


def own(tree, shardings, dtype):
    """`tree` on `shardings` in buffers XLA owns, so the step can donate them through (its output aliases
    its input; nothing is copied per step). On CPU a loaded array may be a zero-copy view of host memory,
    which cannot be donated: the jitted copy below makes it XLA's once. It donates its input, so on an
    accelerator (or when the input is already XLA's) it is a move, not a second copy."""
    placed = jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x, dtype), s), tree, shardings)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings, donate_argnums=0)(placed)


def new_lora_state(config: GPTConfig, lc, tx, shardings: dict, seed: int, base, adapters=None) -> dict:
    """A fresh LoRA train state: PEFT-initialised adapters (B = 0) unless given, the base placed once."""

    def make(init_key):
        if adapters is None:
            fresh = jax.jit(lambda k: lora_lib.init(k, config, lc), out_shardings=shardings["params"])(init_key)
        else:
            fresh = own(adapters, shardings["params"], config.param_dtype)
        return fresh, own(base, shardings["frozen"], config.param_dtype)

    return fresh_state(tx, shardings, seed, make)


def lora_seam(config: GPTConfig, lc: lora_lib.LoraConfig, kernels: Kernels = PORTABLE):
    """The loss the step is built with: the LM loss with the adapters as its trainable tree."""
    return lm_loss(config, lc, kernels)
