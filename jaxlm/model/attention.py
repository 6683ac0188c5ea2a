"""Causal softmax attention in [batch, heads, time, head_dim] layout, shared by training and decoding.

Written out rather than `jax.nn.dot_product_attention`: with heads before time, XLA:CPU's batched
products run on contiguous [T, K] tiles, faster forward + backward at GPT-2 124M's shapes (docs/design.md);
and one function serves dropout (which the fused paths lack), left-padding masks and the KV cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Query rows per block for long causal sequences on the CPU: each block's keys stop at its last row, so
# the upper triangle is neither multiplied nor exponentiated (9/16 of the work at 1024 tokens): faster from
# 256 tokens, no gain at 128 (docs/design.md).
CAUSAL_BLOCK = 128
_NEG = float(jnp.finfo(jnp.float32).min)  # not -inf: a fully masked row (left padding) stays finite, not NaN


def attend(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, mask_BxTxS=None, *, dropout: float = 0.0, rng=None):
    """softmax(q k^T / sqrt(K)) v, scores in float32; `mask_BxTxS` None means causal with S == T."""
    T, S = q_BxHxTxK.shape[2], k_BxHxSxK.shape[2]
    if mask_BxTxS is None and dropout == 0 and _blocked_pays(T, S):
        return _causal_blocked(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, CAUSAL_BLOCK)
    scale = 1.0 / np.sqrt(q_BxHxTxK.shape[-1])
    s_BxHxTxS = jnp.einsum("bhtk,bhsk->bhts", q_BxHxTxK, k_BxHxSxK, preferred_element_type=jnp.float32) * scale
    if mask_BxTxS is None:
        mask_BxTxS = jnp.tril(jnp.ones((T, S), bool))[None]
    s_BxHxTxS = jnp.where(mask_BxTxS[:, None], s_BxHxTxS, _NEG)
    p_BxHxTxS = jax.nn.softmax(s_BxHxTxS, axis=-1)
    if dropout > 0:
        keep_BxHxTxS = jax.random.bernoulli(rng, 1.0 - dropout, p_BxHxTxS.shape)
        p_BxHxTxS = jnp.where(keep_BxHxTxS, p_BxHxTxS / (1.0 - dropout), 0.0)
    return jnp.einsum("bhts,bhsk->bhtk", p_BxHxTxS.astype(v_BxHxSxK.dtype), v_BxHxSxK)


def _blocked_pays(T: int, S: int) -> bool:
    # CPU only: XLA's GPU/TPU paths keep the one-product form they fuse well.
    return T == S and T >= 2 * CAUSAL_BLOCK and jax.default_backend() == "cpu"


def _causal_blocked(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK, block: int):
    """Causal attention by blocks of query rows; the same values as the one-product form up to rounding."""
    T = q_BxHxTxK.shape[2]
    scale = 1.0 / np.sqrt(q_BxHxTxK.shape[-1])
    out = []
    for start in range(0, T, block):
        end = min(start + block, T)
        s_BxHxQxS = (
            jnp.einsum(
                "bhtk,bhsk->bhts", q_BxHxTxK[:, :, start:end], k_BxHxTxK[:, :, :end], preferred_element_type=jnp.float32
            )
            * scale
        )
        causal_QxS = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None]
        s_BxHxQxS = jnp.where(causal_QxS, s_BxHxQxS, _NEG)
        # Normalise after the product: a [Q, K] division instead of a [Q, S] one.
        p_BxHxQxS = jnp.exp(s_BxHxQxS - jax.lax.stop_gradient(s_BxHxQxS.max(-1, keepdims=True)))
        y_BxHxQxK = jnp.einsum("bhts,bhsk->bhtk", p_BxHxQxS.astype(v_BxHxTxK.dtype), v_BxHxTxK[:, :, :end])
        out.append(y_BxHxQxK / p_BxHxQxS.sum(-1, keepdims=True).astype(y_BxHxQxK.dtype))
    return jnp.concatenate(out, axis=2)
