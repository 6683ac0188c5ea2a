"""Causal softmax attention in [batch, heads, time, head_dim] layout, shared by training and decoding.

Written out rather than `jax.nn.dot_product_attention`: with heads before time, XLA:CPU's batched
products run on contiguous [T, K] tiles, 1.5x faster forward + backward at GPT-2 124M's shapes (82 against
122 ms per layer for 4 x 256 tokens); and one function serves dropout (which the fused paths lack),
left-padding masks and the KV cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def attend(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, mask_BxTxS=None, *, dropout: float = 0.0, rng=None):
    """softmax(q k^T / sqrt(K)) v, scores in float32; `mask_BxTxS` None means causal with S == T."""
    T, S = q_BxHxTxK.shape[2], k_BxHxSxK.shape[2]
    scale = 1.0 / np.sqrt(q_BxHxTxK.shape[-1])
    s_BxHxTxS = jnp.einsum("bhtk,bhsk->bhts", q_BxHxTxK, k_BxHxSxK, preferred_element_type=jnp.float32) * scale
    if mask_BxTxS is None:
        mask_BxTxS = jnp.tril(jnp.ones((T, S), bool))[None]
    # finfo.min, not -inf: a fully masked row (left padding) stays finite instead of NaN.
    s_BxHxTxS = jnp.where(mask_BxTxS[:, None], s_BxHxTxS, jnp.finfo(jnp.float32).min)
    p_BxHxTxS = jax.nn.softmax(s_BxHxTxS, axis=-1)
    if dropout > 0:
        keep_BxHxTxS = jax.random.bernoulli(rng, 1.0 - dropout, p_BxHxTxS.shape)
        p_BxHxTxS = jnp.where(keep_BxHxTxS, p_BxHxTxS / (1.0 - dropout), 0.0)
    return jnp.einsum("bhts,bhsk->bhtk", p_BxHxTxS.astype(v_BxHxSxK.dtype), v_BxHxSxK)
