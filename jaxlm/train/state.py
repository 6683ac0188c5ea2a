"""The train state: its shapes and shardings (no memory), a fresh one born sharded, a restored one.

What trains is a predicate over param paths ("h/ln_1/scale", ...; None: everything): the trainable part
gets gradients and optimizer state, the frozen part is placed once and passed through every step.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from ..config import GPTConfig
from ..errors import JaxlmError
from ..io import runs
from ..model.gpt import init_params, param_shapes
from ..parallel import sharding
from ..parallel.sharding import placed_shapes
from ..utils.tree import combine, partition


def layout(trainable_shapes, trainable_shardings, tx, mesh, frozen_shapes=None, frozen_shardings=None):
    """(shapes, shardings) of a train state over the given trainable and frozen trees."""
    rep = sharding.replicated(mesh)
    opt_shapes = jax.eval_shape(tx.init, trainable_shapes)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, opt_shapes, trainable_shardings, transform_non_params=lambda _: rep
    )
    shapes = {
        "params": trainable_shapes,
        "frozen": frozen_shapes or {},
        "opt_state": opt_shapes,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": key_data_shape(),
    }
    shardings = {
        "params": trainable_shardings,
        "frozen": frozen_shardings or {},
        "opt_state": opt_shardings,
        "step": rep,
        "rng": rep,
    }
    return shapes, shardings


def key_data_shape() -> jax.ShapeDtypeStruct:
    """The shape of the state's dropout key data under this process's PRNG (`jax_default_prng_impl`):
    threefry's is (2,) uint32, rbg's (a TPU setting) (4,) uint32."""
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))


def prng_impl() -> str:
    """The name of this process's PRNG implementation, recorded with each checkpoint."""
    return jax.config.jax_default_prng_impl


def check_prng_impl(meta: dict):
    """A run resumes only under the PRNG it was trained with: another one's keys have another shape, or draw
    other dropout masks. Runs saved before the impl was recorded used the default, threefry2x32."""
    saved, now = meta.get("prng_impl", "threefry2x32"), prng_impl()
    if saved != now:
        raise JaxlmError(
            f"the run was trained with jax_default_prng_impl={saved}, this process uses {now}; resume with the "
            f"environment variable JAX_DEFAULT_PRNG_IMPL={saved}"
        )


def model_layout(config: GPTConfig, tx, mesh, trainable=None):
    """(shapes, shardings) of the train state of GPT(config), the params split by `trainable`."""
    p_shapes, f_shapes = partition(param_shapes(config), trainable)
    p_shardings, f_shardings = partition(sharding.param_shardings(config, mesh), trainable)
    return layout(p_shapes, p_shardings, tx, mesh, f_shapes, f_shardings)


def fresh_state(tx, shardings: dict, seed: int, make) -> dict:
    """A step-0 train state on `shardings`: `make(init_key)` gives (trainable, frozen) placed on their
    shardings; the optimizer state is born sharded and the dropout key is the seed's."""
    init_key, rng = jax.random.split(jax.random.key(seed))
    trainable, frozen = make(init_key)
    return {
        "params": trainable,
        "frozen": frozen,
        "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(trainable),
        "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
        "rng": jax.device_put(jax.random.key_data(rng), shardings["rng"]),
    }


def new_state(config: GPTConfig, tx, shardings: dict, seed: int, params=None, trainable=None) -> dict:
    """A fresh train state of GPT(config): random params (a jitted init, born sharded) unless given, split by
    `trainable` (a predicate on param paths; None: everything trains)."""
    full = combine(shardings["params"], shardings["frozen"])

    def make(init_key):
        if params is None:
            placed = jax.jit(partial(init_params, config), out_shardings=full)(init_key)
        else:
            placed = jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x, config.param_dtype), s), params, full)
        return partition(placed, trainable)

    return fresh_state(tx, shardings, seed, make)


def checkpoint_items(state: dict, with_frozen: bool = True) -> dict:
    """The pytrees a run checkpoint holds (the frozen part only when there is one and `with_frozen`: a LoRA
    run records where its base came from instead of copying it into every checkpoint)."""
    items = {"params": state["params"], "opt_state": state["opt_state"]}
    items["progress"] = {"step": state["step"], "rng": state["rng"]}
    if with_frozen and state.get("frozen"):
        items["frozen"] = state["frozen"]
    return items


def restore_state(run_dir: Path, step: int, shapes: dict, shardings: dict, frozen=None) -> dict:
    """The train state saved at `step` in `run_dir`, restored straight onto `shardings`; `frozen` (already
    placed) stands in for a frozen part the checkpoint does not hold."""
    items = {
        "params": placed_shapes(shapes["params"], shardings["params"]),
        "opt_state": placed_shapes(shapes["opt_state"], shardings["opt_state"]),
        "progress": {k: placed_shapes(shapes[k], shardings[k]) for k in ("step", "rng")},
    }
    if shapes["frozen"] and frozen is None:
        items["frozen"] = placed_shapes(shapes["frozen"], shardings["frozen"])
    r = runs.restore_run(run_dir, step, items)
    frozen = r.get("frozen", {}) if frozen is None else frozen
    return {"params": r["params"], "frozen": frozen, "opt_state": r["opt_state"], **r["progress"]}
