"""GPT-2's layer math, written once: a block, its self-attention and its MLP as functions of the products.

The training forward (`jaxlm.model.gpt`: Linen modules over layer-stacked params) and the decode path
(`jaxlm.generation.decode`: per-layer weights in decode layout) both call these. They differ only in the
weight layout and in what they pass in: each product (`c_attn`, `c_proj`, `c_fc`, named as the params are)
is a function x -> x @ W + b (with its dropout, in training), `ln_1`/`ln_2` are GPT-2's LayerNorm over that
layer's scale and bias, `attend` is the attention kernel chosen for the run, `constrain` names an
activation's logical axes for sharding (nothing without a mesh), and `write_kv` (generation only) stores
this call's keys and values in a KV cache and returns what to attend over.
"""

from __future__ import annotations

from collections.abc import Callable

import jax


def _unconstrained(x, _names):
    return x


def block(x_BxTxD, *, ln_1, attn, ln_2, mlp):
    """Pre-LayerNorm residual block: x + attn(ln_1(x)), then + mlp(ln_2(x)); returns (x, attn's cache entry)."""
    a_BxTxD, kv = attn(ln_1(x_BxTxD))
    x_BxTxD = x_BxTxD + a_BxTxD
    return x_BxTxD + mlp(ln_2(x_BxTxD)), kv


def mlp(x_BxTxD, *, c_fc, c_proj, constrain: Callable = _unconstrained):
    """c_proj(gelu(c_fc(x))), GPT-2's tanh GELU."""
    h_BxTxF = constrain(jax.nn.gelu(c_fc(x_BxTxD), approximate=True), ("batch", "seq", "mlp"))
    return c_proj(h_BxTxF)


def self_attention(
    x_BxTxD, *, n_head: int, c_attn, c_proj, attend, write_kv=None, constrain: Callable = _unconstrained
):
    """Causal multi-head self-attention; returns (y [B, T, D], the cache entry `write_kv` returned or None).

    `c_attn(x)` holds q|k|v along its last axes ([B, T, 3, D] or [B, T, 3D]: the same numbers);
    `attend(q, k, v)` takes [B, H, T|S, K]; `write_kv(k, v) -> (k_all, v_all, entry)` with [B, H, T, K] in.
    """
    B, T, D = x_BxTxD.shape
    qkv_BxTx3xHxK = c_attn(x_BxTxD).reshape(B, T, 3, n_head, D // n_head)
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (
        constrain(qkv_BxTx3xHxK[:, :, i], ("batch", "seq", "heads", "kv")) for i in range(3)
    )
    q_BxHxTxK, k_BxHxSxK, v_BxHxSxK = (x.transpose(0, 2, 1, 3) for x in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK))
    entry = None
    if write_kv is not None:
        k_BxHxSxK, v_BxHxSxK, entry = write_kv(k_BxHxSxK, v_BxHxSxK)
    y_BxHxTxK = attend(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK)
    y_BxTxD = constrain(y_BxHxTxK.transpose(0, 2, 1, 3).reshape(B, T, D), ("batch", "seq", "heads"))
    return c_proj(y_BxTxD), entry
