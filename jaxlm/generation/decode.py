"""GPT-2's forward pass specialised for generation, over the same params as `jaxlm.model`.

Why not `GPT.apply(..., cache=...)`: decoding reads every weight once per token, so on a CPU it is
bound by memory bandwidth, and the training-shaped model wastes it. Its `nn.scan` slices each layer
out of the stacked weights (a copy per layer per token), its stacked cache is re-stacked every step,
and XLA's matmul with a few rows against an [in, out] kernel runs several times below bandwidth.
Here `prepare` unstacks the layers and stores kernels as [out, in] once; each layer's cache is its
own [B, H, S, K] buffer, updated in place; in float32 a step of 2-32 rows multiplies and reduces in one
fused loop. On an x86-64 CPU with AVX-512 (float32; bfloat16 also needs AVX-512 BF16) the kernels are
packed instead for `jaxlm.cpu.native`'s kernels, which a step's products then take (see `_products`). The
math is GPT-2's, and tests/test_generate.py holds it to `GPT.apply` (cache vs recompute).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPTConfig
from ..cpu import native
from ..model import layers
from ..model.attention import attend
from ..model.gpt import layer_norm

_NEG = float(jnp.finfo(jnp.float32).min)  # as jaxlm.model.attention masks: finite, so nothing turns NaN
FUSED_ROWS = 32  # float32: up to this many rows, x @ W.T as a fused multiply-reduce (faster on CPU); beyond, a matmul
NATIVE_ROWS = 64  # packed weights: up to this many rows the native kernel; beyond (a long prefill), XLA's matmul


def prepare(params, c: GPTConfig) -> dict:
    """Decode-layout weights in the compute dtype: the model's own tree with its layers unstacked (a list of
    per-layer trees, named as the params are), each Dense kernel [in, *out] stored as [out, in] and each bias
    flat (one copy). The head reads wte as it is ([V, D] is already [out, in]).

    Done in numpy (zero-copy views of CPU arrays): as one XLA program, its ~100 slices and
    transposes took about 4 s to compile for the 124M model. Where `native.usable`, the kernels and
    wte are stored packed (`native.pack`, rank 3 or 4); `_linear` and `_embed` tell by their rank.
    """
    dtype = jnp.dtype(c.dtype)
    packed = native.usable(dtype)

    def put(x):
        return jax.device_put(np.ascontiguousarray(x, dtype=dtype))

    def kernel(w_OxD):
        w_OxD = np.asarray(w_OxD, dtype)
        return jax.device_put(native.pack(w_OxD) if packed else np.ascontiguousarray(w_OxD))

    def layer(i):
        def leaf(path, x_L):
            if path[-1].key == "kernel":
                return kernel(x_L[i].reshape(x_L.shape[1], -1).T)  # [in, *out] -> [out, in]
            return put(x_L[i].reshape(-1))

        return jax.tree_util.tree_map_with_path(leaf, host["h"])

    host = jax.tree.map(np.asarray, jax.device_get(params))
    return {
        "wte": kernel(host["wte"]["embedding"]),
        "wpe": put(host["wpe"]["embedding"]),
        "ln_f": jax.tree.map(put, host["ln_f"]),
        "layers": [layer(i) for i in range(c.n_layer)],
    }


def _linear(x_xD, w_OxD, b_O=None, out_dtype=None, n_out=None):
    """x @ w.T (+ b) over the last axis, accumulated in float32. A packed w (`native.pack`) has `n_out`
    (else the bias's length) outputs."""
    x_NxD = x_xD.reshape(-1, x_xD.shape[-1])
    y_NxO = _products(x_NxD, w_OxD, n_out or (None if b_O is None else b_O.shape[0]))
    y_xO = y_NxO.astype(out_dtype or x_xD.dtype).reshape(*x_xD.shape[:-1], -1)
    return y_xO if b_O is None else y_xO + b_O


def _products(x_NxD, w_OxD, n_out):
    (n, D), f32 = x_NxD.shape, w_OxD.dtype == jnp.float32
    if w_OxD.ndim > 2:
        if n <= NATIVE_ROWS:
            return native.linear(x_NxD, w_OxD, n_out)
        w_OxD = native.unpack(w_OxD, n_out, D)  # many rows: XLA's matmul is faster (bench/decode_linear.py)
    if f32 and 1 < n <= FUSED_ROWS:
        # Must be 2-D: XLA's fused loop over a [N, 1, O, D] product runs 50x slower.
        return jnp.sum(w_OxD * x_NxD[:, None, :], axis=-1, dtype=jnp.float32)
    # bfloat16 without the native kernel lands here: its fused form is the slower one beyond one row
    # (bench/decode_linear.py, and 50x inside the step at one row), and XLA:CPU's one-row bf16 matmul
    # runs ~7x slower than two rows.
    if not f32 and n == 1 and jax.default_backend() == "cpu":
        x_NxD = jnp.concatenate([x_NxD, x_NxD])
    return jnp.einsum("nd,od->no", x_NxD, w_OxD, preferred_element_type=jnp.float32)[:n]


def _ln(c: GPTConfig, p, x):
    return layer_norm(c, "ln").apply({"params": p}, x)


def _dense(p):
    """x -> x @ W + b over a decode-layout Dense's {"kernel" [out, in], "bias" [out]}."""
    return lambda x: _linear(x, p["kernel"], p["bias"])


def _block(c: GPTConfig, p, x_BxTxD, attend_fn, write_kv):
    """One layer of `jaxlm.model.layers` over decode-layout weights: (x, its cache entry)."""
    attn, mlp = p["attn"], p["mlp"]
    return layers.block(
        x_BxTxD,
        ln_1=lambda x: _ln(c, p["ln_1"], x),
        attn=lambda x: layers.self_attention(
            x, n_head=c.n_head, c_attn=_dense(attn["c_attn"]), c_proj=_dense(attn["c_proj"]), attend=attend_fn,
            write_kv=write_kv,
        ),
        ln_2=lambda x: _ln(c, p["ln_2"], x),
        mlp=lambda x: layers.mlp(x, c_fc=_dense(mlp["c_fc"]), c_proj=_dense(mlp["c_proj"])),
    )  # fmt: skip


def _head(c: GPTConfig, dp, x_BxD):
    return _linear(_ln(c, dp["ln_f"], x_BxD), dp["wte"], out_dtype=jnp.float32, n_out=c.vocab_size)


def _embed(c: GPTConfig, dp, tokens, positions):
    wte = dp["wte"]
    tok = native.rows(wte, tokens, c.n_embd) if wte.ndim > 2 else wte[tokens]
    return (tok + dp["wpe"][positions]).astype(c.dtype)


def prefill(dp, tokens_BxT, positions_BxT, valid_BxT, *, c: GPTConfig):
    """Run left-padded prompts; returns (logits of the last position [B, V], per-layer (k, v) [B, H, T, K]).

    `valid_BxT` is False at padding, which no real token attends to.
    """
    x_BxTxD, kv = prefill_hidden(dp, tokens_BxT, positions_BxT, valid_BxT, c=c)
    return _head(c, dp, x_BxTxD[:, -1]), kv


def prefill_hidden(dp, tokens_BxT, positions_BxT, valid_BxT, *, c: GPTConfig):
    """`prefill` before the LM head: (the last block's output at every position [B, T, D], per-layer (k, v)).

    For callers that need logits elsewhere than the last position: right-padded prompts (a serving
    engine's slots) or every position's log-probabilities (`head` on the rows wanted).
    """
    T = tokens_BxT.shape[1]
    x_BxTxD = _embed(c, dp, tokens_BxT, positions_BxT)
    mask_BxTxT = jnp.tril(jnp.ones((T, T), bool))[None] & valid_BxT[:, None, :]
    kv = []
    for p in dp["layers"]:
        x_BxTxD, layer_kv = _block(c, p, x_BxTxD, partial(attend, mask_BxTxS=mask_BxTxT), lambda k, v: (k, v, (k, v)))
        kv.append(layer_kv)
    return x_BxTxD, kv


def head(dp, x_BxD, *, c: GPTConfig):
    """float32 logits [B, V] of the last block's output (ln_f, then the tied LM head)."""
    return _head(c, dp, x_BxD)


def step(dp, tokens_B, positions_B, cache, slot, valid_BxS, *, c: GPTConfig):
    """One new token per row, written at cache `slot`; returns (logits [B, V], cache).

    `cache` is a list of per-layer (k, v), each [B, H, S, K]; a row attends to the slots up to
    `slot` that are valid (`valid_BxS` is False at its left padding).
    """
    S = valid_BxS.shape[1]
    mask_Bx1xS = (valid_BxS & (jnp.arange(S) <= slot))[:, None]
    zero = jnp.zeros((), jnp.int32)

    def write_at_slot(k_BxHxSxK, v_BxHxSxK):
        def write(k_BxHx1xK, v_BxHx1xK):
            k = jax.lax.dynamic_update_slice(k_BxHxSxK, k_BxHx1xK.astype(k_BxHxSxK.dtype), (zero, zero, slot, zero))
            v = jax.lax.dynamic_update_slice(v_BxHxSxK, v_BxHx1xK.astype(v_BxHxSxK.dtype), (zero, zero, slot, zero))
            return k, v, (k, v)

        return write

    return _one_token(c, dp, tokens_B, positions_B, cache, mask_Bx1xS, write_at_slot)


def step_rows(dp, tokens_B, positions_B, cache, *, c: GPTConfig, chunk: int = 64):
    """`step` with each row at its own cache slot: row b's key and value go to slot `positions_B[b]` (a
    row's sequence starts at slot 0: no padding), and it attends to its slots 0..positions_B[b].
    Returns (logits [B, V], cache).

    For a serving engine, whose rows are independent requests at different lengths. Attention runs over
    the cache `chunk` slots at a time (`attend_chunks`), only as far as the longest row reaches, and a
    row's numbers do not depend on how far that is (the cache's S must be a multiple of `chunk`).
    """
    rows_B = jnp.arange(tokens_B.shape[0])

    def write_at_rows(k_BxHxSxK, v_BxHxSxK):
        def write(k_BxHx1xK, v_BxHx1xK):
            k = k_BxHxSxK.at[rows_B, :, positions_B].set(k_BxHx1xK[:, :, 0].astype(k_BxHxSxK.dtype))
            v = v_BxHxSxK.at[rows_B, :, positions_B].set(v_BxHx1xK[:, :, 0].astype(v_BxHxSxK.dtype))
            return k, v, (k, v)

        return write

    x_Bx1xD = _embed(c, dp, tokens_B, positions_B)[:, None]
    attend_fn = partial(attend_chunks, positions_B=positions_B, chunk=chunk)
    new_cache = []
    for p, layer_kv in zip(dp["layers"], cache, strict=True):
        x_Bx1xD, layer_kv = _block(c, p, x_Bx1xD, attend_fn, write_at_rows(*layer_kv))
        new_cache.append(layer_kv)
    return _head(c, dp, x_Bx1xD[:, 0]), new_cache


def attend_chunks(q_BxHx1xK, k_BxHxSxK, v_BxHxSxK, *, positions_B, chunk: int):
    """One query per row over its cache slots 0..positions_B[b], `chunk` slots at a time (online softmax).

    The loop runs only as far as the longest row reaches, and a chunk wholly past a row's position changes
    nothing of that row's result, bit for bit (its running max stays, its weight is exactly 0): a row's
    output is the same however long the other rows are. (One product over the slots up to a window
    gives a row other bits at another window length on XLA:CPU for some shapes.)
    """
    B, H, _, K = q_BxHx1xK.shape
    scale = 1.0 / np.sqrt(K)
    q_BxHxK = q_BxHx1xK[:, :, 0]
    steps = jnp.max(positions_B) // chunk + 1

    def body(i, carry):
        m_BxH, l_BxH, acc_BxHxK = carry
        k_BxHxCxK = jax.lax.dynamic_slice_in_dim(k_BxHxSxK, i * chunk, chunk, axis=2)
        v_BxHxCxK = jax.lax.dynamic_slice_in_dim(v_BxHxSxK, i * chunk, chunk, axis=2)
        s_BxHxC = jnp.einsum("bhk,bhck->bhc", q_BxHxK, k_BxHxCxK, preferred_element_type=jnp.float32) * scale
        live_BxC = (i * chunk + jnp.arange(chunk))[None] <= positions_B[:, None]
        s_BxHxC = jnp.where(live_BxC[:, None], s_BxHxC, _NEG)
        new_m_BxH = jnp.maximum(m_BxH, s_BxHxC.max(-1))
        alpha_BxH = jnp.exp(m_BxH - new_m_BxH)
        p_BxHxC = jnp.exp(s_BxHxC - new_m_BxH[..., None])
        pv_BxHxK = jnp.einsum("bhc,bhck->bhk", p_BxHxC.astype(v_BxHxCxK.dtype), v_BxHxCxK,
                              preferred_element_type=jnp.float32)  # fmt: skip
        return new_m_BxH, l_BxH * alpha_BxH + p_BxHxC.sum(-1), acc_BxHxK * alpha_BxH[..., None] + pv_BxHxK

    init = (jnp.full((B, H), _NEG, jnp.float32), jnp.zeros((B, H), jnp.float32), jnp.zeros((B, H, K), jnp.float32))
    _, l_BxH, acc_BxHxK = jax.lax.fori_loop(0, steps, body, init)
    return (acc_BxHxK / l_BxH[..., None]).astype(v_BxHxSxK.dtype)[:, :, None]


def _one_token(c: GPTConfig, dp, tokens_B, positions_B, cache, mask_Bx1xS, writer):
    x_Bx1xD = _embed(c, dp, tokens_B, positions_B)[:, None]
    new_cache = []
    for p, layer_kv in zip(dp["layers"], cache, strict=True):
        x_Bx1xD, layer_kv = _block(c, p, x_Bx1xD, partial(attend, mask_BxTxS=mask_Bx1xS), writer(*layer_kv))
        new_cache.append(layer_kv)
    return _head(c, dp, x_Bx1xD[:, 0]), new_cache
