"""The programs a run compiles, built by the library that runs them, from shapes alone (no weights, no data).

train: `jaxlm.train.step.jit_train_step` over the train state's layout (`model_layout`, or `lora_layout` for a
LoRA run), as `jaxlm.train.loop` lowers it; eval: the loop's eval step over its `eval_iters` batches;
prefill and decode: one prefill and one decode step of `jaxlm.generation` as `python sample.py` runs them.
Each is a jitted function with abstract arguments that carry their shardings, so the same Program lowers and
compiles for whatever devices the mesh holds: a TPU topology's compile-only devices, or exported for CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from ..config import GPTConfig, TrainConfig
from ..generation.decode import prepare
from ..generation.placement import OneDevice
from ..kernels import Kernels, resolve
from ..lora.adapters import LoraConfig
from ..model.gpt import param_shapes
from ..parallel import sharding
from ..parallel.sharding import placed_shapes
from ..train.adapters import lora_layout, lora_seam
from ..train.optimizer import lr_schedule, make_optimizer
from ..train.state import model_layout
from ..train.step import Batch, batch_sharding, jit_train_step, lm_loss, make_eval_step


@dataclass
class Program:
    name: str  # train | eval | prefill | decode
    jitted: Callable  # a jax.jit-wrapped function
    args: tuple  # jax.ShapeDtypeStructs carrying their shardings
    shapes: str  # what one call computes, e.g. "40 x 12 x 1024 tokens"
    flops: float  # model FLOPs of one call, all devices together (GPTConfig.flops_per_token)
    tracing: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)

    def lower(self):
        with self.tracing():
            return self.jitted.lower(*self.args)


def _abstract_state(shapes: dict, shardings: dict) -> dict:
    return {k: placed_shapes(shapes[k], shardings[k]) for k in shapes}


def train_programs(
    cfg: TrainConfig, config: GPTConfig, mesh, lora: LoraConfig | None = None, kernels: Kernels | None = None
) -> list[Program]:
    """The train step and the eval step of `cfg`'s run of `config` on `mesh` (LoRA adapters when `lora`), with
    the kernels train.py resolves from the mesh (default), or `kernels` for another platform (an export)."""
    tx = make_optimizer(cfg)
    kernels = kernels or resolve(mesh, dtype=config.dtype, dropout=config.dropout, attention=cfg.attention)
    if lora is None:
        shapes, shardings = model_layout(config, tx, mesh)
        loss_fn = lm_loss(config, kernels=kernels)
    else:
        shapes, shardings = lora_layout(config, lora, tx, mesh)
        loss_fn = lora_seam(config, lora, kernels)
    state = _abstract_state(shapes, shardings)
    A, B, T, E = cfg.gradient_accumulation_steps, cfg.batch_size, config.block_size, cfg.eval_iters
    rows = batch_sharding(mesh)  # the loop's: rows (axis 1) split over data and fsdp
    step = jit_train_step(loss_fn, tx, lr_schedule(cfg), shardings, mesh)
    per_token = config.flops_per_token(T)
    tracing = lambda: sharding.activate(mesh)  # noqa: E731  (the loop traces its steps under the mesh)
    train = Program(
        "lora train" if lora else "train",
        step,
        (state, Batch(jax.ShapeDtypeStruct((A, B, T + 1), jnp.int32, sharding=rows))),
        f"{A} x {B} x {T} tokens",
        per_token * A * B * T,
        tracing,
    )
    evaluate = Program(
        "eval",
        jax.jit(make_eval_step(loss_fn)),
        (state["params"], state["frozen"], Batch(jax.ShapeDtypeStruct((E, B, T + 1), jnp.int32, sharding=rows))),
        f"{E} x {B} x {T} tokens",
        per_token / 3 * E * B * T,  # forward only: 2N + 4LTD of 6N + 12LTD
        tracing,
    )
    return [train, evaluate]


def generation_programs(
    config: GPTConfig, device, batch: int, prompt: int, slots: int, kernels: Kernels | None = None
) -> list[Program]:
    """What `python sample.py` compiles on one `device` (its default: no --mesh), in `config.dtype`: the prefill of
    `batch` prompts left-padded to `prompt` slots, and one decode step against a KV cache of `slots` slots.
    `kernels`: the record `Generator` resolves there (default), or one for another platform (an export)."""
    c = config.replace(param_dtype=config.dtype)  # Generator(dtype=...) holds weights and cache in it
    kernels = kernels or resolve(device, dtype=c.dtype, decode=True)
    path = OneDevice(c, kernels)
    at = SingleDeviceSharding(device)

    def arg(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=at)

    B, P, S = batch, prompt, slots
    weights = jax.tree.map(lambda x: arg(x.shape, x.dtype), _decode_layout(c, kernels))
    rows = (arg((B, P), jnp.int32), arg((B, P), jnp.int32), arg((B, P), jnp.bool_))
    cache = [tuple(arg((B, c.n_head, S, c.head_dim), c.dtype) for _ in "kv") for _ in range(c.n_layer)]
    step_args = (arg((B,), jnp.int32), arg((B,), jnp.int32), cache, arg((), jnp.int32), arg((B, S), jnp.bool_))

    def forward(T):  # 2N + 4LTD FLOPs per token: training's 6N + 12LTD without the backward pass
        return config.flops_per_token(T) / 3

    return [
        Program("prefill", jax.jit(path.prefill), (weights, *rows), f"{B} x {P} tokens", forward(P) * B * P),
        Program("decode", jax.jit(path.step), (weights, *step_args), f"{B} x 1, {S} slots", forward(S) * B),
    ]


def _decode_layout(c: GPTConfig, kernels):
    """The decode-layout weights `prepare` builds, from zero-strided zeros (only their shapes are used)."""
    zeros = jax.tree.map(lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape), param_shapes(c))
    return prepare(zeros, c, kernels)
