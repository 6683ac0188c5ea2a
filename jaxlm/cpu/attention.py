"""Causal attention by blocks of query rows: the CPU's form for long sequences (`jaxlm.kernels`: "cpu_blocked").

Each block's keys stop at its last row, so the upper triangle is neither multiplied nor exponentiated (9/16 of
the work at 1024 tokens), and each block normalises after its product (a [Q, K] division instead of a [Q, S]
one). Faster on a CPU from 256 tokens, no gain at 128 (docs/design.md); GPUs and TPUs run the one-product
form or a fused kernel instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CAUSAL_BLOCK = 128  # query rows per block
_NEG = float(jnp.finfo(jnp.float32).min)


def blocked_pays(T: int, S: int) -> bool:
    """Whether a causal T x S attention (no mask) runs faster by query blocks on a CPU."""
    return T == S and T >= 2 * CAUSAL_BLOCK


def causal_blocked(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK, block: int = CAUSAL_BLOCK):
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
