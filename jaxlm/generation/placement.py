"""Where the generation loop's model runs: one device (`jaxlm.generation.decode`'s layout) or a mesh (`GPT.apply`).

Both expose the same few operations (prefill, grow the cache, one step, reorder cache rows for beam
search, place host arrays), so `jaxlm.generation.loops`'s loops are written once for either.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..config import GPTConfig
from ..kernels import PORTABLE, Kernels
from ..model.gpt import GPT, init_cache
from ..parallel import sharding
from . import decode


@dataclass(frozen=True)
class OneDevice:
    """`jaxlm.generation.decode`'s layout on one device: per-layer (k, v) caches [B, H, S, K]."""

    c: GPTConfig
    kernels: Kernels = PORTABLE

    def tracing(self):
        return contextlib.nullcontext()

    def rows(self, *arrays):
        return arrays

    def scalars(self, *values):
        return values

    def whole(self, *arrays):
        return arrays

    def prefill(self, dp, tokens_BxP, positions_BxP, valid_BxP):
        return decode.prefill(dp, tokens_BxP, positions_BxP, valid_BxP, c=self.c, kernels=self.kernels)

    def grow(self, kv, S):
        c = self.c
        B, _, P, _ = kv[0][0].shape
        return [
            tuple(jnp.zeros((B, c.n_head, S, c.head_dim), x.dtype).at[:, :, :P].set(x) for x in layer_kv)
            for layer_kv in kv
        ]

    def step(self, dp, tokens_B, positions_B, cache, slot, valid_BxS):
        return decode.step(dp, tokens_B, positions_B, cache, slot, valid_BxS, c=self.c, kernels=self.kernels)

    def reorder(self, cache, rows_F):
        """Cache rows picked (and repeated) by `rows_F`: beam search keeps the caches of the beams it keeps."""
        return [tuple(jnp.take(x, rows_F, axis=0) for x in layer_kv) for layer_kv in cache]


@dataclass(frozen=True)
class Sharded:
    """`GPT.apply` over sharded params, traced under the mesh; its stacked cache {"k", "v"}
    [L, B, S, H, K] split over `batch_axes` (the mesh axes that divide the batch) and tensor (heads)."""

    c: GPTConfig
    mesh: Mesh
    batch_axes: tuple[str, ...]
    kernels: Kernels = PORTABLE

    @classmethod
    def for_batch(cls, c: GPTConfig, mesh: Mesh, B: int, kernels: Kernels = PORTABLE) -> Sharded:
        """Split the batch over data and fsdp, or over the one of them (or none) that divides it."""
        for axes in (("data", "fsdp"), ("data",), ("fsdp",), ()):
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if B % math.prod(mesh.shape[a] for a in axes) == 0:
                return cls(c, mesh, axes, kernels)
        raise AssertionError("unreachable: the empty split divides every batch")

    def _sharding(self, *spec):
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def _batch(self):
        return self.batch_axes or None

    @contextlib.contextmanager
    def tracing(self):
        """The mesh and its logical-axis rules, with "batch" over the axes this batch divides."""
        rules = tuple(("batch", self._batch()) if name == "batch" else (name, v) for name, v in sharding.RULES)
        with sharding.activate(self.mesh), nn.logical_axis_rules(rules):
            yield

    def rows(self, *arrays):
        return tuple(jax.device_put(x, self._sharding(self._batch(), *[None] * (np.ndim(x) - 1))) for x in arrays)

    def scalars(self, *values):
        return tuple(jax.device_put(v, self._sharding()) for v in values)

    def whole(self, *arrays):
        """Replicated, e.g. for a host callback (which reads them from the first device)."""
        return tuple(jax.lax.with_sharding_constraint(x, self._sharding()) for x in arrays)

    def _cache(self, cache):
        s = self._sharding(None, self._batch(), None, "tensor", None)
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, s), cache)

    def _apply(self, params, tokens_BxT, positions_BxT, cache, index, valid_BxS):
        logits_BxTxV, cache = GPT(self.c, kernels=self.kernels).apply(
            {"params": params},
            tokens_BxT,
            positions_BxT,
            cache=cache,
            cache_index=index,
            kv_mask_BxS=valid_BxS,
            method=GPT.decode,
        )
        # Whole rows of logits for sampling (a gather of B x V floats): the same draws as on one device.
        logits_BxV = jax.lax.with_sharding_constraint(logits_BxTxV[:, -1], self._sharding(self._batch(), None))
        return logits_BxV, self._cache(cache)

    def prefill(self, params, tokens_BxP, positions_BxP, valid_BxP):
        """All but the last prompt slot fill the cache (their logits are never computed); the last is
        a decode step, so only one position goes through the LM head."""
        B, P = tokens_BxP.shape
        cache = self._cache(init_cache(self.c, B, P))
        if P > 1:
            _, cache = self._apply(params, tokens_BxP[:, :-1], positions_BxP[:, :-1], cache, 0, valid_BxP)
        return self._apply(params, tokens_BxP[:, -1:], positions_BxP[:, -1:], cache, P - 1, valid_BxP)

    def grow(self, kv, S):
        P = kv["k"].shape[2]
        return self._cache(
            {name: jnp.zeros(x.shape[:2] + (S,) + x.shape[3:], x.dtype).at[:, :, :P].set(x) for name, x in kv.items()}
        )

    def step(self, params, tokens_B, positions_B, cache, slot, valid_BxS):
        return self._apply(params, tokens_B[:, None], positions_B[:, None], cache, slot, valid_BxS)

    def reorder(self, cache, rows_F):
        return self._cache({name: jnp.take(x, rows_F, axis=1) for name, x in cache.items()})


def place_on(mesh: Mesh, params, shardings):
    """Params already on `mesh` as they are; others moved onto `shardings` (device to device)."""

    def place(x, s):
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        return jax.device_put(x, s)

    return jax.tree.map(place, params, shardings)
