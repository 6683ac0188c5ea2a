"""GPT-2 as Linen modules: a pure function of (params, tokens).

Parameter names mirror Hugging Face GPT-2 (wte, wpe, h/ln_1, h/attn/c_attn, ...) so that conversion
is a name map. Layers are stacked under `h` with a leading layer axis and run by `nn.scan`.
Every parameter and the main activations carry logical axis names; `jaxlm.parallel.sharding` maps them onto
a device mesh (without a mesh they are no-ops).

Generation passes a KV cache: {"k", "v"} each [n_layer, B, S, n_head, head_dim], plus the slot
where this call's T tokens are written (`cache_index`) and which cache slots hold real tokens
(`kv_mask_BxS`, False for left padding). It returns (logits, new_cache).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPTConfig
from ..lora.adapters import LoraConfig
from .attention import attend

Cache = dict  # {"k": LxBxSxHxK, "v": LxBxSxHxK}


def _init(std: float, names: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(names: tuple):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def _constrain(x, names: tuple):
    return nn.with_logical_constraint(x, names)


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

    @nn.compact
    def __call__(self, x_BxTxD, kv=None, cache_index=None, mask_BxTxS=None):
        c = self.config
        B, T, D = x_BxTxD.shape
        H, K = c.n_head, c.head_dim
        # Kernel [D, 3, D]: HF's fused c_attn split into q|k|v, so "heads" shards all three alike.
        qkv_Bx3xTxD = LoraDenseGeneral(
            lora=self.lora,
            train=self.train,
            features=(3, D),
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            kernel_init=_init(0.02, ("embed", "qkv", "heads")),
            bias_init=_zeros(("qkv", "heads")),
            name="c_attn",
        )(x_BxTxD)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (
            _constrain(qkv_Bx3xTxD[:, :, i].reshape(B, T, H, K), ("batch", "seq", "heads", "kv")) for i in range(3)
        )

        new_kv = None
        if kv is None:
            k_BxSxHxK, v_BxSxHxK = k_BxTxHxK, v_BxTxHxK
        else:
            zero = jnp.zeros((), jnp.int32)
            start = (zero, cache_index, zero, zero)
            k_BxSxHxK = jax.lax.dynamic_update_slice(kv[0], k_BxTxHxK.astype(kv[0].dtype), start)
            v_BxSxHxK = jax.lax.dynamic_update_slice(kv[1], v_BxTxHxK.astype(kv[1].dtype), start)
            new_kv = (k_BxSxHxK, v_BxSxHxK)
            k_BxSxHxK, v_BxSxHxK = k_BxSxHxK.astype(c.dtype), v_BxSxHxK.astype(c.dtype)

        dropout = c.dropout if self.train else 0.0
        rng = self.make_rng("dropout") if dropout > 0 else None
        q_BxHxTxK, k_BxHxSxK, v_BxHxSxK = (x.transpose(0, 2, 1, 3) for x in (q_BxTxHxK, k_BxSxHxK, v_BxSxHxK))
        y_BxHxTxK = attend(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, mask_BxTxS, dropout=dropout, rng=rng)
        y_BxTxHxK = y_BxHxTxK.transpose(0, 2, 1, 3)
        y_BxTxD = _constrain(y_BxTxHxK.reshape(B, T, D), ("batch", "seq", "heads"))
        y_BxTxD = LoraDense(
            lora=self.lora,
            train=self.train,
            features=D,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            kernel_init=_init(0.02 / np.sqrt(2 * c.n_layer), ("heads", "embed")),
            bias_init=_zeros(("embed",)),
            name="c_proj",
        )(y_BxTxD)
        y_BxTxD = nn.Dropout(c.dropout, deterministic=not self.train)(y_BxTxD)
        return y_BxTxD, new_kv


class MLP(nn.Module):
    config: GPTConfig
    train: bool = False
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.config
        h_BxTxF = LoraDense(
            lora=self.lora,
            train=self.train,
            features=4 * c.n_embd,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            kernel_init=_init(0.02, ("embed", "mlp")),
            bias_init=_zeros(("mlp",)),
            name="c_fc",
        )(x_BxTxD)
        h_BxTxF = _constrain(jax.nn.gelu(h_BxTxF, approximate=True), ("batch", "seq", "mlp"))
        y_BxTxD = LoraDense(
            lora=self.lora,
            train=self.train,
            features=c.n_embd,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            kernel_init=_init(0.02 / np.sqrt(2 * c.n_layer), ("mlp", "embed")),
            bias_init=_zeros(("embed",)),
            name="c_proj",
        )(h_BxTxF)
        return nn.Dropout(c.dropout, deterministic=not self.train)(y_BxTxD)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; scan-shaped: (x, layer_kv) -> (x, new_layer_kv)."""

    config: GPTConfig
    train: bool = False
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x_BxTxD, kv, cache_index, mask_BxTxS):
        c = self.config
        a_BxTxD, new_kv = CausalSelfAttention(c, self.train, self.lora, name="attn")(
            layer_norm(c, "ln_1")(x_BxTxD), kv, cache_index, mask_BxTxS
        )
        x_BxTxD = x_BxTxD + a_BxTxD
        x_BxTxD = x_BxTxD + MLP(c, self.train, self.lora, name="mlp")(layer_norm(c, "ln_2")(x_BxTxD))
        return _constrain(x_BxTxD, ("batch", "seq", "embed")), new_kv


class GPT(nn.Module):
    """`lora`: with adapters passed as the "lora" collection (`apply({"params": base, "lora": adapters}, ...)`),
    each targeted layer adds s * dropout(x) A B; nothing changes without them."""

    config: GPTConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(
        self,
        tokens_BxT,
        positions_BxT=None,
        *,
        train: bool = False,
        cache: Cache | None = None,
        cache_index=None,
        kv_mask_BxS=None,
    ):
        c = self.config
        _check_tokens(tokens_BxT, c)
        B, T = tokens_BxT.shape
        if positions_BxT is None:
            start = 0 if cache_index is None else cache_index
            positions_BxT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))

        wte = nn.Embed(
            c.vocab_size,
            c.n_embd,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=_init(0.02, ("vocab", "embed")),
            name="wte",
        )
        wpe = nn.Embed(
            c.block_size,
            c.n_embd,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=_init(0.02, ("pos", "embed")),
            name="wpe",
        )
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
        layers = nn.scan(
            block,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0 if kv is not None else nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.n_layer,
            unroll=1 if c.scan_layers else c.n_layer,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, train, self.lora, name="h")
        x_BxTxD, new_kv = layers(x_BxTxD, kv, index, mask_BxTxS)

        x_BxTxD = layer_norm(c, "ln_f")(x_BxTxD)
        # Tied LM head; the matmul accumulates and returns float32 even under bfloat16 compute.
        logits_BxTxV = jnp.einsum(
            "btd,vd->btv",
            x_BxTxD,
            wte.embedding.astype(c.dtype),
            preferred_element_type=jnp.float32,
        )
        logits_BxTxV = _constrain(logits_BxTxV, ("batch", "seq", "vocab"))
        if cache is None:
            return logits_BxTxV
        return logits_BxTxV, {"k": new_kv[0], "v": new_kv[1]}


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


def logical_axes(config: GPTConfig):
    """The params pytree with a PartitionSpec of logical axis names at each leaf (no compute)."""
    tokens = jnp.zeros((1, min(8, config.block_size)), jnp.int32)
    boxed = jax.eval_shape(lambda: GPT(config).init(jax.random.key(0), tokens))
    return nn.get_partition_spec(boxed)["params"]


def param_shapes(config: GPTConfig):
    """The params pytree as ShapeDtypeStructs (no compute, no memory)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def cross_entropy(logits_BxTxV, targets_BxT, mask_BxT=None):
    """Mean token cross-entropy in float32; `mask_BxT` excludes positions (e.g. padding)."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    picked_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    nll_BxT = logz_BxT - picked_BxT
    if mask_BxT is None:
        return nll_BxT.mean()
    mask_BxT = mask_BxT.astype(jnp.float32)
    return (nll_BxT * mask_BxT).sum() / jnp.maximum(mask_BxT.sum(), 1.0)
