"""Sharding as data: one table maps the model's logical axis names onto mesh axes.

Mesh axes: `data` (replicas; batch split), `fsdp` (batch split and parameters sharded, gathered
per layer by XLA), `tensor` (heads / MLP / vocab split inside each layer). Rules are matched in
order and a mesh axis is used once per array, so activations ("batch" first) take data+fsdp for
the batch and leave "embed" whole, while parameters (no batch axis) shard "embed" over fsdp.
The vocab axis is split over `tensor` only when the tensor size divides it.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ..config import GPTConfig
from ..errors import JaxlmError
from ..lora import adapters as lora_lib
from ..model.gpt import logical_axes, param_shapes
from ..model.mesh import tracing_over

MESH_AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("qkv", None),
    ("kv", None),
    ("pos", None),
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),  # LoRA adapters' rank axis: small, kept whole on every device
)


def parse_mesh(spec: str | dict | None, n_devices: int | None = None, *, fewer: bool = False) -> dict[str, int]:
    """ "data=2,fsdp=2,tensor=2" (one axis may be -1: the remaining devices) -> {axis: size}.

    Axes left out are 1; no spec puts every device on `data`. The sizes must multiply to the device
    count, or with `fewer` to at most it (a mesh over the first devices).
    """
    n = n_devices or jax.device_count()
    if spec is None or spec == "":
        return {"data": n, "fsdp": 1, "tensor": 1}
    if isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            name, eq, value = part.partition("=")
            name = name.strip()
            if not eq or name not in MESH_AXES:
                raise JaxlmError(f"bad mesh {spec!r}: write axis=size pairs with axes {MESH_AXES}, e.g. data=2,fsdp=4")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise JaxlmError(f"bad mesh {spec!r}: size of {name!r} must be an integer or -1") from None
    else:
        sizes = dict(spec)
    sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
    wild = [a for a, s in sizes.items() if s == -1]
    if len(wild) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise JaxlmError(f"bad mesh {spec!r}: sizes must be positive, and at most one may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if wild:
        if n % known:
            raise JaxlmError(f"mesh {spec!r}: {n} devices are not divisible by {known}")
        sizes[wild[0]] = n // known
    if fewer and math.prod(sizes.values()) > n:
        raise JaxlmError(
            f"mesh {spec!r} needs {math.prod(sizes.values())} devices but only {n} are available; "
            "make the sizes multiply to at most the device count"
        )
    if not fewer and math.prod(sizes.values()) != n:
        raise JaxlmError(
            f"mesh {spec!r} has {math.prod(sizes.values())} devices but {n} are available; "
            "make the sizes multiply to the device count or use -1 for one axis"
        )
    return sizes


def make_mesh(spec: str | dict | None = None, devices=None, *, fewer: bool = False) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices (of all processes), Auto axis types.

    `fewer`: the sizes may multiply to less than the device count; the mesh then takes the first devices.
    """
    devices = devices if devices is not None else jax.devices()
    sizes = parse_mesh(spec, len(devices), fewer=fewer)
    devices = devices[: math.prod(sizes.values())]
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_sharding(spec_tree, mesh: Mesh):
    return nn.logical_to_mesh_sharding(spec_tree, mesh, RULES)


def param_shardings(config: GPTConfig, mesh: Mesh):
    """NamedSharding for every parameter; a dimension its mesh axes do not divide is an error."""
    tensor = mesh.shape["tensor"]
    if config.n_head % tensor:
        raise JaxlmError(
            f"n_head={config.n_head} cannot be split over mesh axis tensor of size {tensor}; "
            "choose a tensor size that divides the number of heads"
        )
    specs = logical_axes(config)
    if config.vocab_size % tensor:
        # GPT-2's vocab (50257) splits over no tensor size: keep the vocab axis whole (the embedding is still
        # split over fsdp by its embed axis) rather than refuse tensor parallelism for every GPT-2.
        specs = jax.tree.map(
            lambda spec: PartitionSpec(*(None if a == "vocab" else a for a in spec)),
            specs,
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )
    shardings = logical_to_sharding(specs, mesh)
    check_divisible(param_shapes(config), shardings)
    return shardings


def lora_shardings(config: GPTConfig, lora: lora_lib.LoraConfig, mesh: Mesh):
    """NamedSharding for every LoRA adapter leaf, from the same RULES as the params they adapt."""
    shardings = logical_to_sharding(lora_lib.logical_axes(lora), mesh)
    check_divisible(lora_lib.shapes(config, lora), shardings)
    return shardings


def check_divisible(shapes_tree, shardings_tree):
    def check(path, shape, sharding):
        for dim, axes in zip(shape.shape, sharding.spec, strict=False):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            size = math.prod(sharding.mesh.shape[a] for a in axes)
            if dim % size:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise JaxlmError(
                    f"parameter {name} with shape {tuple(shape.shape)} cannot be split over mesh axis "
                    f"{'+'.join(axes)} of size {size} ({dim} is not divisible by {size}); choose a mesh "
                    "whose axis sizes divide the model dimensions"
                )

    jax.tree_util.tree_map_with_path(check, shapes_tree, shardings_tree)


def placed_shapes(shapes, shardings=None):
    """ShapeDtypeStructs that carry where each array goes (default: the first local device): what jit lowers
    against and Orbax restores onto."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, time] arrays: batch split over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Inside: the model's activation constraints and sharded kernels use `mesh` and RULES (trace jitted code here)."""
    # The legacy `with mesh:` context, not jax.set_mesh: under set_mesh Flax 0.12 applies the scanned
    # layers' param axis metadata to per-layer slices and fails; revisit when Flax follows. The legacy context
    # sets no abstract mesh, so the model gets the mesh itself (`tracing_over`), or flax drops every constraint.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`with mesh:` context manager has been deprecated")
        mesh.__enter__()
    try:
        with nn.logical_axis_rules(RULES), tracing_over(mesh):
            yield
    finally:
        mesh.__exit__(None, None, None)


def shard_summary(params) -> dict[str, tuple]:
    """{param name: shape of the shard on the first device}: to check that params really split."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        out[name] = tuple(np.shape(x.addressable_shards[0].data)) if hasattr(x, "addressable_shards") else x.shape
    return out
