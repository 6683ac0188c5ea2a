"""LoRA adapters for GPT-2: W + s * A @ B with A, B of rank r and W frozen (s = alpha/r, rsLoRA alpha/sqrt(r)).

Adapters are a second pytree shaped like the params they adapt, stacked over layers the same way
(`h/attn/c_attn/lora_a` is [L, D, r], `lora_b` [L, r, 3, D]), so they scan, shard and checkpoint like
params. `merge` turns (base, adapters) into ordinary params for everything downstream (decode, export);
training skips the merge and adds s * (x A) B inside the model (GPT(config, lora=...)), as PEFT does.
Target names are PEFT's for GPT-2, so a config round-trips through `adapter_config.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from ..config import GPTConfig
from ..errors import JaxlmError
from ..utils.tree import count

# PEFT target name -> jaxlm params path of the module (under "h", stacked over layers).
MODULES = {
    "c_attn": ("attn", "c_attn"),
    "attn.c_proj": ("attn", "c_proj"),
    "c_fc": ("mlp", "c_fc"),
    "mlp.c_proj": ("mlp", "c_proj"),
}
ALIASES = {"c_proj": ("attn.c_proj", "mlp.c_proj"), "attn.c_attn": ("c_attn",), "mlp.c_fc": ("c_fc",)}


@dataclass(frozen=True)
class LoraConfig:
    """Which modules get adapters and how they scale; `targets` accepts PEFT's names (`c_proj` = both)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input only, in training (PEFT's lora_dropout)
    targets: tuple[str, ...] = ("c_attn",)
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise JaxlmError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, int | float) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise JaxlmError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise JaxlmError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", normalize_targets(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def check(self, config: GPTConfig) -> LoraConfig:
        """Raise if the rank does not fit the model's smallest adapted matrix; returns self."""
        limit = min(min(in_out(config, t)) for t in self.targets)
        if self.rank > limit:
            raise JaxlmError(
                f"LoRA rank {self.rank} exceeds min(in, out) = {limit} of the targeted matrices; choose rank <= {limit}"
            )
        return self

    def replace(self, **changes) -> LoraConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - known:
            raise JaxlmError(f"bad LoRA config {d!r}: expected the fields {sorted(known)}")
        return cls(**{**d, "targets": tuple(d.get("targets", cls.targets))})


def normalize_targets(targets) -> tuple[str, ...]:
    """ "c_attn,c_proj" or a sequence of PEFT names -> canonical names in a fixed order."""
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t.strip()]
    chosen = set()
    for t in targets:
        t = str(t).strip()
        if t in MODULES:
            chosen.add(t)
        elif t in ALIASES:
            chosen.update(ALIASES[t])
        else:
            names = ", ".join([*MODULES, "c_proj"])
            raise JaxlmError(f"unknown LoRA target {t!r}; GPT-2 modules are {names} (c_proj means both)")
    if not chosen:
        raise JaxlmError("LoRA needs at least one target module, e.g. c_attn")
    return tuple(t for t in MODULES if t in chosen)


def in_out(config: GPTConfig, target: str) -> tuple[int, int]:
    D = config.n_embd
    return {"c_attn": (D, 3 * D), "attn.c_proj": (D, D), "c_fc": (D, 4 * D), "mlp.c_proj": (4 * D, D)}[target]


def out_shape(config: GPTConfig, target: str) -> tuple[int, ...]:
    D = config.n_embd
    return (3, D) if target == "c_attn" else (in_out(config, target)[1],)


# Logical axes of each module's (lora_a, lora_b), matching its kernel's axes in jaxlm.model.
_AXES = {
    "c_attn": (("embed", "lora_rank"), ("lora_rank", "qkv", "heads")),
    "attn.c_proj": (("heads", "lora_rank"), ("lora_rank", "embed")),
    "c_fc": (("embed", "lora_rank"), ("lora_rank", "mlp")),
    "mlp.c_proj": (("mlp", "lora_rank"), ("lora_rank", "embed")),
}


def _tree(lora: LoraConfig, leaf) -> dict:
    """{"h": {"attn": {"c_attn": {"lora_a": leaf(t, 0), "lora_b": leaf(t, 1)}}, ...}} for the targets."""
    h: dict = {}
    for t in lora.targets:
        block, name = MODULES[t]
        h.setdefault(block, {})[name] = {"lora_a": leaf(t, 0), "lora_b": leaf(t, 1)}
    return {"h": h}


def shapes(config: GPTConfig, lora: LoraConfig, dtype=None):
    """The adapters pytree as ShapeDtypeStructs (float32 unless `dtype`; adapters train in param_dtype)."""
    dt = jnp.dtype(dtype or config.param_dtype)
    L, r = config.n_layer, lora.rank

    def leaf(t, which):
        shape = (L, in_out(config, t)[0], r) if which == 0 else (L, r, *out_shape(config, t))
        return jax.ShapeDtypeStruct(shape, dt)

    return _tree(lora, leaf)


def logical_axes(lora: LoraConfig):
    """The adapters pytree with a PartitionSpec of logical axis names at each leaf (as model.logical_axes)."""
    return _tree(lora, lambda t, which: PartitionSpec("layers", *_AXES[t][which]))


def init(key: jax.Array, config: GPTConfig, lora: LoraConfig):
    """Fresh adapters as PEFT makes them: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0.

    PEFT draws lora_A [r, in] with torch's kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound
    gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in), fan_in = in. B = 0 makes step 0 the base model exactly.
    """
    lora.check(config)
    abstract = shapes(config, lora)
    keys = iter(jax.random.split(key, len(lora.targets)))

    def leaf(t, which):
        s = _get(abstract, t)["lora_a" if which == 0 else "lora_b"]
        if which == 1:
            return jnp.zeros(s.shape, s.dtype)
        bound = 1.0 / math.sqrt(in_out(config, t)[0])
        return jax.random.uniform(next(keys), s.shape, s.dtype, -bound, bound)

    return _tree(lora, leaf)


def delta(lora_a, lora_b, scale: float):
    """s * A @ B for stacked adapters: [L, in, r] x [L, r, *out] -> [L, in, *out], accumulated in float32."""
    d = jnp.einsum("lir,lr...->li...", lora_a, lora_b, preferred_element_type=jnp.float32)
    return d * scale


def merge(base, adapters, lora: LoraConfig):
    """Ordinary params: each targeted kernel W becomes W + s * A @ B (pure; jit it for speed)."""
    h = dict(base["h"])
    for t in lora.targets:
        block, name = MODULES[t]
        ab = adapters["h"][block][name]
        module = dict(h[block][name])
        w = module["kernel"]
        module["kernel"] = (w.astype(jnp.float32) + delta(ab["lora_a"], ab["lora_b"], lora.scale)).astype(w.dtype)
        h[block] = {**h[block], name: module}
    return {**base, "h": h}


def describe(config: GPTConfig, lora: LoraConfig) -> str:
    """One line for a training log: `LoRA r=8 on c_attn: 294,912 trainable of 124.4M (0.24%)`."""
    n = count(shapes(config, lora))
    total = config.num_params()
    where = ",".join(lora.targets)
    return f"LoRA r={lora.rank} on {where}: {n:,} trainable of {total / 1e6:.1f}M ({100 * n / total:.2f}%)"


def fingerprint(params) -> str | None:
    """sha256 of weights (names, dtypes, shapes, bytes): which base adapters belong to. None for arrays
    this process cannot read whole (multi-process sharded)."""
    h = hashlib.sha256()
    leaves = sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda t: jax.tree_util.keystr(t[0]))
    for path, x in leaves:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return None
        # read a copy: device_get caches a host view on the array it reads, and an array with a host view
        # cannot be donated (a train step would then copy the frozen base instead of passing it through)
        a = np.ascontiguousarray(jax.device_get(x.copy() if isinstance(x, jax.Array) else x))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _get(adapters, target: str):
    block, name = MODULES[target]
    return adapters["h"][block][name]
