"""Memory per device for training under a mesh, from the model's own shapes and sharding rules.

Parameters, gradients and AdamW state are exact: every parameter's shard shape follows from
`sharding.RULES` the way the trainer places it. Activations are an estimate for one micro-batch
(Korthikanti et al. 2022, "Reducing Activation Recomputation", without sequence parallelism),
with attention scores materialised (the XLA path; cuDNN flash attention on GPU avoids them).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import flax.linen as nn
import jax

from ..config import GPTConfig
from ..model.gpt import logical_axes, param_shapes
from .sharding import MESH_AXES, RULES

GiB = 1024**3


@dataclass(frozen=True)
class Memory:
    params: float
    grads: float
    adam: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.adam + self.activations


def sharded_param_elements(config: GPTConfig, mesh: dict[str, int]) -> int:
    """Parameter elements held by one device when params are sharded by RULES over `mesh`."""
    shapes, specs = _shapes_and_axes(config)
    total = 0
    for shape, spec in zip(shapes, specs, strict=True):
        mesh_axes = nn.logical_to_mesh_axes(spec, RULES)
        n = 1
        for dim, axes in zip(shape.shape, mesh_axes, strict=False):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            n *= math.ceil(dim / math.prod(mesh[a] for a in axes))
        total += n
    return total


@functools.cache
def _shapes_and_axes(config: GPTConfig):
    shapes = jax.tree.leaves(param_shapes(config))
    specs = jax.tree.leaves(logical_axes(config), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return shapes, specs


def activation_bytes(config: GPTConfig, batch: int, seq: int, tensor: int, remat: bool, bytes_per: int) -> float:
    """Activations kept for the backward pass of one micro-batch of `batch` sequences on a device."""
    s, b, h, a, L = seq, batch, config.n_embd, config.n_head, config.n_layer
    # Per layer: 34 s b h bytes at 2 bytes/value (LN inputs, qkv, attention out, MLP 4h, dropout masks)
    # plus 5 a s^2 b for the attention scores/probabilities; tensor parallelism splits all but 10 s b h.
    per_layer_2byte = s * b * h * (10 + 24 / tensor) + 5 * a * s * s * b / tensor
    per_layer = per_layer_2byte * bytes_per / 2
    logits = s * b * config.vocab_size * 4 / tensor  # float32 logits, kept for the loss gradient
    if remat:
        # Only each block's input survives; one block's activations are rebuilt at a time.
        return L * s * b * h * bytes_per + per_layer + logits
    return L * per_layer + logits


def training_memory(
    config: GPTConfig,
    mesh: dict[str, int],
    global_batch: int,
    seq: int,
    remat: bool = False,
    compute_bytes: int = 2,
) -> Memory:
    """Bytes per device: float32 params, float32 grads, AdamW mu+nu (float32), activations."""
    mesh = {a: mesh.get(a, 1) for a in MESH_AXES}
    n = sharded_param_elements(config, mesh)
    batch_per_device = math.ceil(global_batch / (mesh["data"] * mesh["fsdp"]))
    act = activation_bytes(config, batch_per_device, seq, mesh["tensor"], remat, compute_bytes)
    return Memory(params=4 * n, grads=4 * n, adam=8 * n, activations=act)
