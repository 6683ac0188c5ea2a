"""Causal softmax attention in [batch, heads, time, head_dim] layout: the reference form and the kernels.

`attend` runs what the program's `jaxlm.kernels` record names for the call's phase (`Kernels.attention_for`):
- "reference": written out, not `jax.nn.dot_product_attention`: with heads before time, XLA:CPU's batched
  products run on contiguous [T, K] tiles, faster forward + backward at GPT-2 124M's shapes (docs/design.md);
  it serves dropout (which the fused kernels lack), left-padding masks and the KV cache, and takes every
  call another kernel cannot;
- "cpu_blocked": the CPU's query blocks for long causal sequences (`jaxlm.cpu.attention`);
- "xla": `jax.nn.dot_product_attention(implementation="xla")`, jax's own form;
- "cudnn": cuDNN's fused kernel through `jax.nn.dot_product_attention` (GPU, bfloat16, whole sequences: its
  causal mask is aligned top-left, right only when keys and queries are the same T tokens);
- "splash": Pallas splash attention (TPU; `jaxlm.model.splash`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..cpu.attention import blocked_pays, causal_blocked
from ..errors import JaxlmError
from ..kernels import PORTABLE, Kernels
from .mesh import tracing_mesh
from .splash import attend as splash_attend
from .splash import fits as splash_fits

_NEG = float(jnp.finfo(jnp.float32).min)  # not -inf: a fully masked row (left padding) stays finite, not NaN


def attend(
    q_BxHxTxK,
    k_BxHxSxK,
    v_BxHxSxK,
    mask_BxTxS=None,
    *,
    valid_BxS=None,
    dropout: float = 0.0,
    rng=None,
    kernels: Kernels = PORTABLE,
):
    """softmax(q k^T / sqrt(K)) v with float32 scores. Which keys each query sees: `mask_BxTxS` when given
    (decoding against a KV cache); else causal with S == T, and with `valid_BxS` (False: left padding) only
    valid keys (a prefill); neither: a whole causal sequence (training, eval)."""
    T, S = q_BxHxTxK.shape[2], k_BxHxSxK.shape[2]
    phase = "decode" if mask_BxTxS is not None else "prefill" if valid_BxS is not None else "train"
    kind = kernels.attention_for(phase)
    if dropout > 0 and kind not in ("reference", "cpu_blocked"):
        raise JaxlmError(
            f"attention {kind} has no dropout; resolve the kernels with the model's dropout "
            "(jaxlm.kernels.resolve(..., dropout=config.dropout))"
        )
    if kind == "splash" and splash_fits(q_BxHxTxK, k_BxHxSxK, tracing_mesh()):
        return splash_attend(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, valid_BxS, mesh=tracing_mesh())
    if kind == "cudnn" and _cudnn_takes(q_BxHxTxK, S):
        return _jax_attention(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, None, "cudnn")
    if valid_BxS is not None:
        mask_BxTxS = jnp.tril(jnp.ones((T, S), bool))[None] & valid_BxS[:, None, :]
    if kind == "xla":
        return _jax_attention(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, mask_BxTxS, "xla")
    if kind == "cpu_blocked" and mask_BxTxS is None and dropout == 0 and blocked_pays(T, S):
        return causal_blocked(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK)
    return reference(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, mask_BxTxS, dropout=dropout, rng=rng)


def reference(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, mask_BxTxS=None, *, dropout: float = 0.0, rng=None):
    """The one-product form: [B, H, T, S] float32 scores, masked (None: causal with S == T), softmax, dropout."""
    T, S = q_BxHxTxK.shape[2], k_BxHxSxK.shape[2]
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


def _cudnn_takes(q_BxHxTxK, S: int) -> bool:
    """cuDNN's flash attention: whole sequences (T == S), 16-bit inputs, a head size that is a multiple of 8 up
    to 128 (the limit before Hopper)."""
    T, K = q_BxHxTxK.shape[2:]
    return T == S and q_BxHxTxK.dtype in (jnp.bfloat16, jnp.float16) and K % 8 == 0 and K <= 128


def _jax_attention(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, mask_BxTxS, implementation: str):
    """`jax.nn.dot_product_attention` (its layout is [B, T, H, K]); causal unless a mask says otherwise."""
    q_BxTxHxK, k_BxSxHxK, v_BxSxHxK = (x.transpose(0, 2, 1, 3) for x in (q_BxHxTxK, k_BxHxSxK, v_BxHxSxK))
    y_BxTxHxK = jax.nn.dot_product_attention(
        q_BxTxHxK,
        k_BxSxHxK,
        v_BxSxHxK,
        mask=None if mask_BxTxS is None else mask_BxTxS[:, None],
        is_causal=mask_BxTxS is None,
        implementation=implementation,
    )
    return y_BxTxHxK.transpose(0, 2, 1, 3)
