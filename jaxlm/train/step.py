"""The train and eval steps, built around the loss function passed in (nanodo's seam; `jaxlm.model.lm_loss`).

`loss_fn(trainable, frozen, batch, rng) -> (loss, aux)` is all a step knows of the model: the plain LM loss,
one masked to completion tokens and a LoRA loss are the same function over different batches or trainable
trees, not different steps. `rng` is the dropout key, or None for evaluation (dropout off). `aux["tokens"]`
is the number of targets the loss counted; gradient accumulation weights micro-batches by it, so a masked
loss is the mean over the whole batch's counted tokens.

The state is a dict: "params" (the trainable pytree: the only part differentiated and given optimizer
state), "frozen" (held fixed; {} when everything trains), "opt_state", "step" (updates done) and "rng" (key
data; step s draws fold_in(rng, s)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ..config import GPTConfig
from ..model.loss import lm_loss
from ..parallel import sharding


class Batch(NamedTuple):
    """Token windows and an optional loss mask; a pytree, so it shards and scans like an array."""

    tokens: jax.Array  # int32 [..., B, T+1]: inputs tokens[..., :-1], targets tokens[..., 1:]
    mask: jax.Array | None = None  # float32 [..., B, T]: 1 where a target counts (None: all count)


LossFn = Callable[[Any, Any, Batch, jax.Array | None], tuple[jax.Array, dict]]


def as_batch(batch) -> Batch:
    """A Batch, from a Batch or a bare token array (the plain LM case)."""
    return batch if isinstance(batch, Batch) else Batch(batch)


def make_train_step(loss_fn: LossFn | GPTConfig, tx: optax.GradientTransformation, schedule: optax.Schedule):
    """(state, batch) -> (state, metrics): `batch` holds A micro-batches ([A, B, T+1] tokens), one update.

    A GPTConfig in place of `loss_fn` means the plain LM loss of that model.
    """
    if isinstance(loss_fn, GPTConfig):
        loss_fn = lm_loss(loss_fn)

    def grads_of(trainable, frozen, batch, key):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch, key)
        return loss, aux["tokens"], grads

    def step(state, batch):
        batch = as_batch(batch)
        trainable, frozen = state["params"], state.get("frozen", {})
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        accum = batch.tokens.shape[0]
        if accum == 1:
            loss, _, grads = grads_of(trainable, frozen, jax.tree.map(lambda x: x[0], batch), key)
        else:  # gradient accumulation: a scan over micro-batches, float32 sums
            weighted = batch.mask is not None  # masked: weight each micro-batch by the tokens it counted

            def micro(carry, xs):
                mb, i = xs
                loss, n, grads = grads_of(trainable, frozen, mb, jax.random.fold_in(key, i))
                if weighted:
                    loss, grads = jax.tree.map(lambda x: n * x, (loss, grads))
                return jax.tree.map(jnp.add, carry, (loss, grads, n)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32))
            (loss, grads, n), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(accum)))
            total = jnp.maximum(n, 1.0) if weighted else accum
            loss, grads = jax.tree.map(lambda x: x / total, (loss, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        new_state = {
            **state,
            "params": optax.apply_updates(trainable, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        return new_state, metrics

    return step


def make_eval_step(loss_fn: LossFn | GPTConfig):
    """(params, frozen, batches) -> mean loss over E batches ([E, B, T+1] tokens; dropout off). With a mask,
    the mean over all the tokens counted in the E batches (each batch weighted by its count, as in training)."""
    if isinstance(loss_fn, GPTConfig):
        loss_fn = lm_loss(loss_fn)

    def step(params, frozen, batches):
        batches = as_batch(batches)
        loss_E, aux = jax.lax.map(lambda b: loss_fn(params, frozen, b, None), batches)
        if batches.mask is None:
            return loss_E.mean()
        return (loss_E * aux["tokens"]).sum() / jnp.maximum(aux["tokens"].sum(), 1.0)

    return step


def batch_sharding(mesh) -> NamedSharding:
    """Where a step's [A, B, ...] batch arrays live: rows (axis 1) split like the model's batch axis."""
    return NamedSharding(mesh, PartitionSpec(None, *sharding.batch_sharding(mesh).spec))


def jit_train_step(loss_fn, tx, schedule, state_shardings: dict, mesh):
    """The train step jitted as the loop runs it: state donated, placed on `state_shardings`, the batch on
    `batch_sharding(mesh)`, metrics replicated."""
    return jax.jit(
        make_train_step(loss_fn, tx, schedule),
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
