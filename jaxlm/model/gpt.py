"""GPT-2 as Linen modules: a pure function of (params, tokens).

Parameter names mirror Hugging Face GPT-2 (wte, wpe, h/ln_1, h/attn/c_attn, ...) so that conversion
is a name map. Layers are stacked under `h` with a leading layer axis and run by `nn.scan`.
Every parameter and the main activations carry logical axis names; `jaxlm.parallel.sharding` maps them onto
a device mesh (without a mesh they are no-ops).

The layer math is `jaxlm.model.layers`, which the decode path calls too; these modules only declare the
params (with their initialisers and axes) and pass in Dense/LoRA products, dropout and sharding constraints.
`GPT.decode` takes a KV cache: {"k", "v"} each [n_layer, B, S, n_head, head_dim] (`init_cache`).
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPTConfig
from ..kernels import PORTABLE, Kernels
from ..lora.adapters import LoraConfig
from .attention import attend
from .layers import block as residual_block
from .layers import mlp, self_attention
from .mesh import tracing_mesh

Cache = dict  # {"k": LxBxSxHxK, "v": LxBxSxHxK}


def _init(std: float, names: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(names: tuple):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def _constrain(x, names: tuple):
    # The mesh passed explicitly: without it flax 0.12 drops the constraint (jaxlm.model.mesh).
    return nn.with_logical_constraint(x, names, mesh=tracing_mesh())


class LoraDense(nn.Dense):
    """nn.Dense (same params, same math) plus s * dropout(x) A B when a "lora" collection holds this module's
    adapters; without them, or with `lora` None, it is exactly nn.Dense."""

    lora: LoraConfig | None = None
    train: bool = False

    @nn.compact
    def __call__(self, x):
        return _lora_update(self, x, super().__call__(x))


class LoraDenseGeneral(nn.DenseGeneral):
    """nn.DenseGeneral with LoRA, as LoraDense (the adapter's B has the kernel's output axes)."""

    lora: LoraConfig | None = None
    train: bool = False

    @nn.compact
    def __call__(self, x):
        return _lora_update(self, x, super().__call__(x))


def _lora_update(module, x_BxTxI, y_BxTx_O):
    """y + s * dropout(x) A B: the adapted layer without forming W + s A B (nor copying W)."""
    lora = module.lora
    if lora is None or not module.has_variable("lora", "lora_a"):
        return y_BxTx_O
    a_IxR = module.get_variable("lora", "lora_a").astype(module.dtype)
    b_Rx_O = module.get_variable("lora", "lora_b").astype(module.dtype)
    x_BxTxI = nn.Dropout(lora.dropout, deterministic=not module.train, name="lora_dropout")(x_BxTxI)
    u_BxTxR = jnp.einsum("bti,ir->btr", x_BxTxI.astype(module.dtype), a_IxR)
    return y_BxTx_O + lora.scale * jnp.tensordot(u_BxTxR, b_Rx_O, axes=1)


def layer_norm(c: GPTConfig, name: str) -> nn.LayerNorm:
    """GPT-2's LayerNorm (eps 1e-5, not Flax's 1e-6); Flax computes its statistics in float32."""
    return nn.LayerNorm(
        epsilon=c.layer_norm_epsilon,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        scale_init=_ones(("norm",)),
        bias_init=_zeros(("norm",)),
        name=name,
    )


class CausalSelfAttention(nn.Module):
    config: GPTConfig
    train: bool = False
    lora: LoraConfig | None = None
    kernels: Kernels = PORTABLE

    @nn.compact
    def __call__(self, x_BxTxD, kv=None, cache_index=None, mask_BxTxS=None):
        c = self.config
        D = c.n_embd
        # Kernel [D, 3, D]: HF's fused c_attn split into q|k|v, so "heads" shards all three alike.
        c_attn = LoraDenseGeneral(
            lora=self.lora,
            train=self.train,
            features=(3, D),
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            kernel_init=_init(0.02, ("embed", "qkv", "heads")),
            bias_init=_zeros(("qkv", "heads")),
            name="c_attn",
        )
        proj = LoraDense(
            lora=self.lora,
            train=self.train,
            features=D,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            kernel_init=_init(0.02 / np.sqrt(2 * c.n_layer), ("heads", "embed")),
            bias_init=_zeros(("embed",)),
            name="c_proj",
        )
        resid_dropout = nn.Dropout(c.dropout, deterministic=not self.train)
        dropout = c.dropout if self.train else 0.0
        rng = self.make_rng("dropout") if dropout > 0 else None
        write_kv = None if kv is None else partial(_write_kv, kv, cache_index, c.dtype)
        return self_attention(
            x_BxTxD,
            n_head=c.n_head,
            c_attn=c_attn,
            c_proj=lambda y: resid_dropout(proj(y)),
            attend=partial(attend, mask_BxTxS=mask_BxTxS, dropout=dropout, rng=rng, kernels=self.kernels),
            write_kv=write_kv,
            constrain=_constrain,
        )


def _write_kv(kv, cache_index, dtype, k_BxHxTxK, v_BxHxTxK):
    """Write this call's keys and values into the stacked-layout cache slice [B, S, H, K] at `cache_index`."""
    zero = jnp.zeros((), jnp.int32)
    start = (zero, cache_index, zero, zero)
    k_BxSxHxK = jax.lax.dynamic_update_slice(kv[0], k_BxHxTxK.transpose(0, 2, 1, 3).astype(kv[0].dtype), start)
    v_BxSxHxK = jax.lax.dynamic_update_slice(kv[1], v_BxHxTxK.transpose(0, 2, 1, 3).astype(kv[1].dtype), start)
    k_BxHxSxK, v_BxHxSxK = (x.astype(dtype).transpose(0, 2, 1, 3) for x in (k_BxSxHxK, v_BxSxHxK))
    return k_BxHxSxK, v_BxHxSxK, (k_BxSxHxK, v_BxSxHxK)


class MLP(nn.Module):
    config: GPTConfig
    train: bool = False
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.config
        dense = partial(LoraDense, lora=self.lora, train=self.train, dtype=c.dtype, param_dtype=c.param_dtype)
        c_fc = dense(
            features=4 * c.n_embd,
            kernel_init=_init(0.02, ("embed", "mlp")),
            bias_init=_zeros(("mlp",)),
            name="c_fc",
        )
        c_proj = dense(
            features=c.n_embd,
            kernel_init=_init(0.02 / np.sqrt(2 * c.n_layer), ("mlp", "embed")),
            bias_init=_zeros(("embed",)),
            name="c_proj",
        )
        dropout = nn.Dropout(c.dropout, deterministic=not self.train)
        return mlp(x_BxTxD, c_fc=c_fc, c_proj=lambda h: dropout(c_proj(h)), constrain=_constrain)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; scan-shaped: (x, layer_kv) -> (x, new_layer_kv)."""

    config: GPTConfig
    train: bool = False
    lora: LoraConfig | None = None
    kernels: Kernels = PORTABLE

    @nn.compact
    def __call__(self, x_BxTxD, kv, cache_index, mask_BxTxS):
        c = self.config
        attn = CausalSelfAttention(c, self.train, self.lora, self.kernels, name="attn")
        x_BxTxD, new_kv = residual_block(
            x_BxTxD,
            ln_1=layer_norm(c, "ln_1"),
            attn=lambda h: attn(h, kv, cache_index, mask_BxTxS),
            ln_2=layer_norm(c, "ln_2"),
            mlp=MLP(c, self.train, self.lora, name="mlp"),
        )
        return _constrain(x_BxTxD, ("batch", "seq", "embed")), new_kv


class GPT(nn.Module):
    """GPT-2 over params named as Hugging Face's. Three entry points, each with one return type:

    - `apply(variables, tokens)`: logits [B, T, V] (float32);
    - `apply(variables, tokens, method=GPT.hidden_states)`: the final LayerNorm's output [B, T, D], what the
      LM head reads (evaluation scores only the positions it needs);
    - `apply(variables, tokens, positions, cache=, cache_index=, kv_mask_BxS=, method=GPT.decode)`:
      (logits, new cache), for generation with a KV cache (`init_cache`).

    `lora`: with adapters passed as the "lora" collection (`apply({"params": base, "lora": adapters}, ...)`),
    each targeted layer adds s * dropout(x) A B; nothing changes without them. `kernels`: which attention runs
    (`jaxlm.kernels.resolve` from the mesh the program runs on; default: the reference form, which runs anywhere).
    """

    config: GPTConfig
    lora: LoraConfig | None = None
    kernels: Kernels = PORTABLE

    def __call__(self, tokens_BxT, positions_BxT=None, *, train: bool = False):
        return self.head(self.trunk(tokens_BxT, positions_BxT, train=train)[0])

    def hidden_states(self, tokens_BxT, positions_BxT=None, *, train: bool = False):
        """The final LayerNorm's output [B, T, D]: what the tied LM head multiplies by wte."""
        return self.trunk(tokens_BxT, positions_BxT, train=train)[0]

    def decode(self, tokens_BxT, positions_BxT=None, *, cache: Cache, cache_index, kv_mask_BxS=None):
        """(logits [B, T, V], cache): this call's T tokens are written at slot `cache_index` of the cache's S,
        and attend to the slots before them that `kv_mask_BxS` marks real (False: left padding)."""
        x_BxTxD, cache = self.trunk(
            tokens_BxT, positions_BxT, cache=cache, cache_index=cache_index, kv_mask_BxS=kv_mask_BxS
        )
        return self.head(x_BxTxD), cache

    def head(self, x_BxTxD):
        """Tied LM head; the product accumulates and returns float32 even under bfloat16 compute."""
        wte_VxD = nn.meta.unbox(self.variables["params"]["wte"]["embedding"])
        logits_BxTxV = jnp.einsum(
            "btd,vd->btv", x_BxTxD, wte_VxD.astype(self.config.dtype), preferred_element_type=jnp.float32
        )
        return _constrain(logits_BxTxV, ("batch", "seq", "vocab"))

    @nn.compact
    def trunk(self, tokens_BxT, positions_BxT=None, *, train=False, cache=None, cache_index=None, kv_mask_BxS=None):
        """Embeddings, the blocks and the final LayerNorm: (x [B, T, D], the new cache or None)."""
        c = self.config
        _check_tokens(tokens_BxT, c)
        B, T = tokens_BxT.shape
        if positions_BxT is None:
            start = 0 if cache_index is None else cache_index
            positions_BxT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))

        embed = partial(nn.Embed, features=c.n_embd, dtype=c.dtype, param_dtype=c.param_dtype)
        wte = embed(c.vocab_size, embedding_init=_init(0.02, ("vocab", "embed")), name="wte")
        wpe = embed(c.block_size, embedding_init=_init(0.02, ("pos", "embed")), name="wpe")
        x_BxTxD = wte(tokens_BxT) + wpe(positions_BxT)
        x_BxTxD = nn.Dropout(c.dropout, deterministic=not train)(x_BxTxD)
        x_BxTxD = _constrain(x_BxTxD, ("batch", "seq", "embed"))

        mask_BxTxS, kv, index = None, None, None
        if cache is not None:
            S = cache["k"].shape[2]
            index = jnp.asarray(cache_index, jnp.int32)
            slots_S = jnp.arange(S)
            causal_TxS = slots_S[None, :] <= index + jnp.arange(T)[:, None]
            valid_BxS = jnp.ones((B, S), bool) if kv_mask_BxS is None else kv_mask_BxS
            mask_BxTxS = causal_TxS[None] & valid_BxS[:, None, :]
            kv = (cache["k"], cache["v"])

        block = Block
        if c.remat:
            block = nn.remat(Block, prevent_cse=not c.scan_layers)
        # Same stacked params either way; scan_layers=False unrolls the loop at compile time.
        blocks = nn.scan(
            block,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0 if kv is not None else nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.n_layer,
            unroll=1 if c.scan_layers else c.n_layer,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, train, self.lora, self.kernels, name="h")
        x_BxTxD, new_kv = blocks(x_BxTxD, kv, index, mask_BxTxS)
        x_BxTxD = layer_norm(c, "ln_f")(x_BxTxD)
        return x_BxTxD, None if cache is None else {"k": new_kv[0], "v": new_kv[1]}


def _check_tokens(tokens_BxT, c: GPTConfig):
    """Shape errors always; value errors when the tokens are concrete (outside jit).

    Under jit an out-of-range id cannot raise: the embedding lookup then yields NaN logits.
    """
    if tokens_BxT.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tokens_BxT.shape}")
    if tokens_BxT.shape[1] > c.block_size:
        raise ValueError(
            f"sequence length {tokens_BxT.shape[1]} exceeds block_size {c.block_size}; "
            "crop the input or use a model with a larger block_size"
        )
    if not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens_BxT.dtype}")
    if isinstance(tokens_BxT, jax.core.Tracer):
        return
    t = np.asarray(tokens_BxT)
    if t.size and (t.min() < 0 or t.max() >= c.vocab_size):
        raise ValueError(
            f"token ids must be in [0, {c.vocab_size}), got min {t.min()} max {t.max()}; "
            "the tokenizer does not match the model's vocab_size"
        )


def init_cache(config: GPTConfig, batch: int, length: int, dtype=None) -> Cache:
    """An empty KV cache of `length` slots."""
    shape = (config.n_layer, batch, length, config.n_head, config.head_dim)
    dt = jnp.dtype(dtype or config.dtype)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


def init_params(config: GPTConfig, rng: jax.Array):
    """Random GPT-2 initialisation (normal 0.02, scaled residual projections), unboxed."""
    tokens = jnp.zeros((1, min(8, config.block_size)), jnp.int32)
    return nn.meta.unbox(GPT(config).init(rng, tokens)["params"])


def crop_context(config: GPTConfig, params, block_size: int):
    """(config, params) of the same model with a context of `block_size` <= its own: the first learned positions."""
    params = {**params, "wpe": {"embedding": params["wpe"]["embedding"][:block_size]}}
    return config.replace(block_size=block_size), params


def logical_axes(config: GPTConfig):
    """The params pytree with a PartitionSpec of logical axis names at each leaf (no compute)."""
    tokens = jnp.zeros((1, min(8, config.block_size)), jnp.int32)
    boxed = jax.eval_shape(lambda: GPT(config).init(jax.random.key(0), tokens))
    return nn.get_partition_spec(boxed)["params"]


def param_shapes(config: GPTConfig):
    """The params pytree as ShapeDtypeStructs (no compute, no memory)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
