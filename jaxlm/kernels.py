"""The kernel record: which implementation each hot spot uses, decided once per program from where it runs.

jaxlm's hot spots have several implementations. Attention: jaxlm's reference form, the CPU's query blocks,
XLA's `jax.nn.dot_product_attention`, cuDNN's fused kernel (GPU) and Pallas splash attention (TPU). A decode
step's products: jaxlm's native CPU kernels, the CPU's fused multiply-reduce, or plain products. A serving
step's attention (rows at their own lengths in their own cache slots): jaxlm's native CPU kernel or XLA's
chunks. The eval head: the CPU's vocabulary chunks or one piece. Which one runs is data: a `Kernels`
record, resolved once by `resolve` from the platform of the devices the program runs on (a mesh, a device,
an array, or a platform name for a program compiled elsewhere, e.g. for a TPU topology from a CPU host),
and passed down:
`GPT(config, kernels=k)`, `lm_loss(config, kernels=k)`, `jaxlm.generation.decode`, the eval head. Nothing
inside an op asks `jax.default_backend()`, so a GPU or TPU program never contains CPU code.

`expected_platform()` answers the one question asked before JAX starts (the allocator setting and CPU cores
as devices): which platform the command will run on.

May import: jaxlm.errors, jaxlm.config, jaxlm.utils, jaxlm.cpu.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import pkgutil
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from .config import check_attention, check_dtype
from .cpu import native
from .cpu.eval_head import CPU_BATCH_TOKENS
from .errors import JaxlmError

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}
PHASES = ("train", "eval", "prefill", "decode")  # the model's uses, each with its own attention (`attention_for`)
SPOTS = ("attention", "decode_products", "slot_attention", "eval_head", "eval_batch_tokens")


@dataclass(frozen=True)
class Kernels:
    """Which implementation each hot spot uses; hashable (a Linen attribute, a jit static argument).

    attention        training, eval and prefill (decode is always "reference"; see `attention_for`):
                     "reference" | "cpu_blocked" | "xla" | "cudnn" | "splash"
    decode_products  a decode step's x @ W.T: "native" | "cpu_fused" | "plain"; None: not chosen (the
                     program does not decode: `resolve(decode=False)`)
    slot_attention   a serving step's attention (`jaxlm.generation.decode.step_rows`): "native" (a CPU kernel,
                     float32) | "chunks" (XLA, any platform); None: not chosen (`resolve(decode=False)`)
    eval_head        scored rows against the tied LM head: "cpu_chunked" | "plain"
    eval_batch_tokens  padded tokens per scoring batch at most (None: no limit)
    why              (spot, reason) pairs, for logs and runtime.json; not part of equality
    """

    platform: str = "any"
    attention: str = "reference"
    decode_products: str | None = "plain"
    slot_attention: str | None = "chunks"
    eval_head: str = "plain"
    eval_batch_tokens: int | None = None
    why: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def attention_for(self, phase: str) -> str:
        """The attention `phase` runs: "decode" (new tokens against a KV cache) the reference form; "prefill"
        (left-padded prompts) the record's where its kernel takes the padding (splash by segment ids, xla by
        a mask), else the reference form; "train" and "eval" the record's."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if phase == "decode" or (phase == "prefill" and self.attention not in ("splash", "xla")):
            return "reference"
        return self.attention

    def describe(self, *spots: str) -> str:
        """`attention: splash (tpu, bfloat16); ...` for `spots` (default: every spot that was chosen)."""
        reasons = dict(self.why)
        parts = []
        for spot in spots or SPOTS:
            value = getattr(self, spot)
            if value is not None:
                reason = f" ({reasons[spot]})" if spot in reasons else ""
                parts.append(f"{spot.replace('_', ' ')}: {value}{reason}")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"platform": self.platform, **{s: getattr(self, s) for s in SPOTS}, "why": dict(self.why)}


PORTABLE = Kernels()  # what runs anywhere: GPT's default when no record is passed


def platform_of(where=None) -> str:
    """ "cpu", "gpu" or "tpu" for a platform name ("cuda" and "rocm" are "gpu"), a Mesh, a device, a sequence of
    devices or a jax.Array (its devices); None: the first default device, where arrays not yet placed go."""
    if where is None:
        where = jax.devices()[0]
    if isinstance(where, str):
        name = where.lower()
    elif isinstance(where, jax.sharding.Mesh):
        name = where.devices.flat[0].platform
    elif isinstance(where, jax.Array):
        name = next(iter(where.devices())).platform
    elif hasattr(where, "platform"):
        name = where.platform
    else:
        name = np.asarray(where, dtype=object).flat[0].platform
    name = _ALIASES.get(name, name)
    if name not in PLATFORMS:
        raise JaxlmError(f"unknown platform {name!r}; jaxlm runs on {', '.join(PLATFORMS)}")
    return name


def placed_on(tree):
    """The first jax.Array in `tree` (where a program over it runs), or None for host arrays (the default
    device, where they will be placed): what `resolve` takes for a model's params."""
    return next((x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)), None)


def resolve(where=None, *, dtype="float32", dropout: float = 0.0, attention: str = "auto", decode: bool = False):
    """The record for a program on `where` (see `platform_of`) computing in `dtype` with attention `dropout`.

    `attention`: "auto" or an explicit choice (`jaxlm.config.ATTENTIONS`); a choice the platform cannot run
    (cudnn off a GPU, splash on a GPU, a fused kernel with dropout) is a one-line JaxlmError. `decode`: the
    program decodes, so choose its products too (on a CPU this builds or loads the native kernels once).
    """
    platform = platform_of(where)
    dtype = check_dtype(jnp.dtype(dtype).name)
    check_attention(attention, dropout)
    att, att_why = _attention(platform, dtype, dropout, attention)
    why = [("attention", att_why)]
    if platform == "cpu":
        products = slots = None
        if decode:
            missing = native.unavailable(dtype)
            products = "native" if missing is None else "cpu_fused"
            why.append(("decode_products", "cpu: jaxlm's native kernels" if missing is None else f"cpu: {missing}"))
            missing = native.attention_unavailable(dtype)
            slots = "native" if missing is None else "chunks"
            why.append(("slot_attention", "cpu: jaxlm's native kernel" if missing is None else f"cpu: {missing}"))
        why += [("eval_head", "cpu: vocabulary chunks"), ("eval_batch_tokens", "cpu: batches that stay in cache")]
        return Kernels(platform, att, products, slots, "cpu_chunked", CPU_BATCH_TOKENS, tuple(why))
    if decode:
        why.append(("decode_products", f"{platform}: the platform's matmul whatever the batch"))
        why.append(("slot_attention", f"{platform}: XLA's products, a chunk of the cache at a time"))
    plain, chunks = ("plain", "chunks") if decode else (None, None)
    return Kernels(platform, att, plain, chunks, "plain", None, tuple(why))


def _attention(platform: str, dtype: str, dropout: float, asked: str) -> tuple[str, str]:
    """(attention, why) on `platform`; `asked` has passed `check_attention`."""
    if asked == "auto":
        if platform == "cpu":
            return "cpu_blocked", "cpu: query blocks from 256 tokens" + (", one product with dropout" * (dropout > 0))
        if dropout > 0:
            return "reference", f"{platform}, attention dropout {dropout}: the fused kernels have none"
        if platform == "tpu":
            return "splash", f"tpu, {dtype}"
        if dtype == "float32":
            return "reference", "gpu, float32: cuDNN's fused attention takes bfloat16"
        if cudnn_missing():
            return "reference", f"gpu: {cudnn_missing()}"
        return "cudnn", f"gpu, {dtype}"
    if asked == "cudnn":
        if platform != "gpu":
            raise JaxlmError(f"--attention cudnn runs on an NVIDIA GPU, not on {platform}; use --attention auto")
        if dtype == "float32":
            raise JaxlmError("--attention cudnn needs --dtype bfloat16 (cuDNN's fused attention takes no float32)")
        if cudnn_missing():
            raise JaxlmError(f"--attention cudnn: {cudnn_missing()}; use --attention auto")
    if asked == "splash":
        if platform == "gpu":
            raise JaxlmError("--attention splash is a TPU kernel (interpreted on a CPU); on a GPU use cudnn or auto")
        if platform == "cpu":
            return "splash", "asked for; cpu: interpret mode, slow (for tests)"
    return asked, "asked for"


@functools.cache
def cudnn_missing() -> str | None:
    """Why this process cannot run cuDNN's flash attention, or None when it can: it needs CUDA's cuDNN (without
    it `jax.nn.dot_product_attention(implementation="cudnn")` raises "cuDNN is not detected." as it traces,
    e.g. on a CPU host exporting for a GPU) and a GPU of compute capability 8.0 or newer (Ampere on)."""
    x = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
    try:
        jax.eval_shape(lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn"), x)
    except (RuntimeError, ValueError, NotImplementedError) as e:
        return f"cuDNN's attention does not load here ({str(e).strip().splitlines()[0]})"
    capability = getattr(jax.devices("gpu")[0], "compute_capability", "0")
    if tuple(int(p) for p in str(capability).split(".")) < (8, 0):
        return f"cuDNN's flash attention needs compute capability 8.0, this GPU has {capability}"
    return None


def expected_platform() -> str | None:
    """The platform this process's JAX will run on, learned without starting JAX: the first of JAX_PLATFORMS
    when set; else "cpu" when no accelerator plugin is installed (libtpu, a `jax_plugins` plugin such as
    CUDA's); None when one is, since only starting JAX can tell whether its device is there."""
    chosen = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS")
    if chosen:
        first = chosen.split(",")[0].strip().lower()
        return _ALIASES.get(first, first)
    return None if _accelerator_plugins() else "cpu"


def _accelerator_plugins() -> list[str]:
    """The accelerator plugins JAX would try to load (the names it discovers them by)."""
    found = []
    if importlib.util.find_spec("libtpu") is not None or os.environ.get("TPU_LIBRARY_PATH"):
        found.append("libtpu")
    found += [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        found += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    if os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
        found.append("PJRT_NAMES_AND_LIBRARY_PATHS")
    return found
