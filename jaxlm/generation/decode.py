"""GPT-2's forward pass specialised for generation, over the same params as `jaxlm.model`.

Why not `GPT.apply(..., cache=...)`: decoding reads every weight once per token, so on a CPU it is
bound by memory bandwidth, and the training-shaped model wastes it. Its `nn.scan` slices each layer
out of the stacked weights (a copy per layer per token), its stacked cache is re-stacked every step,
and XLA's matmul with a few rows against an [in, out] kernel runs several times below bandwidth.
Here `prepare` unstacks the layers and stores kernels as [out, in] once; each layer's cache is its
own [B, H, S, K] buffer, updated in place. A step's products are the program's `jaxlm.kernels` record's
"decode_products": on a CPU its few-row forms (`jaxlm.cpu.products`: jaxlm's native kernels over packed
weights where the CPU has AVX-512, else a fused multiply-reduce for float32), on a GPU or TPU plain products
at the platform's default precision, so a row's logits do not depend on its batch. The prefill's attention is
the record's too; a step's is always the reference form. The math is GPT-2's, and tests/test_generate.py
holds it to `GPT.apply` (cache vs recompute).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPTConfig
from ..cpu import native
from ..cpu.products import products as cpu_products
from ..kernels import PORTABLE, Kernels
from ..model import layers
from ..model.attention import attend
from ..model.gpt import layer_norm

_NEG = float(jnp.finfo(jnp.float32).min)  # as jaxlm.model.attention masks: finite, so nothing turns NaN


def prepare(params, c: GPTConfig, kernels: Kernels = PORTABLE) -> dict:
    """Decode-layout weights in the compute dtype: the model's own tree with its layers unstacked (a list of
    per-layer trees, named as the params are), each Dense kernel [in, *out] stored as [out, in] and each bias
    flat (one copy). The head reads wte as it is ([V, D] is already [out, in]).

    Done in numpy (zero-copy views of CPU arrays): as one XLA program, its ~100 slices and
    transposes compiled slowly for the 124M model (docs/design.md). Where `kernels` says "native", the kernels
    and wte are stored packed (`native.pack`, rank 3 or 4); `_linear` and `_embed` tell by their rank.
    """
    if kernels.decode_products is None:
        raise ValueError("these kernels were resolved without decode=True: jaxlm.kernels.resolve(..., decode=True)")
    dtype = jnp.dtype(c.dtype)
    packed = kernels.decode_products == "native"

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


def _linear(x_xD, w_OxD, b_O=None, out_dtype=None, n_out=None, products: str | None = "plain"):
    """x @ w.T (+ b) over the last axis, accumulated in float32, in the form `products` names (a kernels
    record's decode_products). A packed w (`native.pack`) has `n_out` (else the bias's length) outputs."""
    x_NxD = x_xD.reshape(-1, x_xD.shape[-1])
    y_NxO = _products(x_NxD, w_OxD, n_out or (None if b_O is None else b_O.shape[0]), products)
    y_xO = y_NxO.astype(out_dtype or x_xD.dtype).reshape(*x_xD.shape[:-1], -1)
    return y_xO if b_O is None else y_xO + b_O


def _products(x_NxD, w_OxD, n_out, products: str | None):
    if w_OxD.ndim > 2 or products in ("native", "cpu_fused"):  # a CPU program's forms (packed: native)
        return cpu_products(x_NxD, w_OxD, n_out)
    # plain: the platform's matmul at its default precision, the same for any number of rows
    return jnp.einsum("nd,od->no", x_NxD, w_OxD, preferred_element_type=jnp.float32)


def _ln(c: GPTConfig, p, x):
    return layer_norm(c, "ln").apply({"params": p}, x)


def _ln_rows(c: GPTConfig, p, x_BxD):
    """`_ln` one row of the leading axis at a time: XLA:CPU sums a [B, 768] layer norm's rows in another order
    from 8 rows on than below, so a serving step's row would change its bits with the step's row count."""
    return jax.lax.map(partial(_ln, c, p), x_BxD)


def _dense(p, products: str | None = "plain"):
    """x -> x @ W + b over a decode-layout Dense's {"kernel" [out, in], "bias" [out]}."""
    return lambda x: _linear(x, p["kernel"], p["bias"], products=products)


def _block(c: GPTConfig, p, x_BxTxD, attend_fn, write_kv, products: str | None = "plain", ln=_ln):
    """One layer of `jaxlm.model.layers` over decode-layout weights: (x, its cache entry)."""
    attn, mlp = p["attn"], p["mlp"]
    return layers.block(
        x_BxTxD,
        ln_1=lambda x: ln(c, p["ln_1"], x),
        attn=lambda x: layers.self_attention(
            x, n_head=c.n_head, c_attn=_dense(attn["c_attn"], products), c_proj=_dense(attn["c_proj"], products),
            attend=attend_fn, write_kv=write_kv,
        ),
        ln_2=lambda x: ln(c, p["ln_2"], x),
        mlp=lambda x: layers.mlp(x, c_fc=_dense(mlp["c_fc"], products), c_proj=_dense(mlp["c_proj"], products)),
    )  # fmt: skip


def _head(c: GPTConfig, dp, x_BxD, products: str | None = "plain", ln=_ln):
    x_BxD = ln(c, dp["ln_f"], x_BxD)
    return _linear(x_BxD, dp["wte"], out_dtype=jnp.float32, n_out=c.vocab_size, products=products)


def _embed(c: GPTConfig, dp, tokens, positions):
    wte = dp["wte"]
    tok = native.rows(wte, tokens, c.n_embd) if wte.ndim > 2 else wte[tokens]
    return (tok + dp["wpe"][positions]).astype(c.dtype)


def prefill(dp, tokens_BxT, positions_BxT, valid_BxT, *, c: GPTConfig, kernels: Kernels = PORTABLE):
    """Run left-padded prompts; returns (logits of the last position [B, V], per-layer (k, v) [B, H, T, K]).

    `valid_BxT` is False at padding, which no real token attends to. `kernels`: the record `prepare` had.
    """
    x_BxTxD, kv = prefill_hidden(dp, tokens_BxT, positions_BxT, valid_BxT, c=c, kernels=kernels)
    return _head(c, dp, x_BxTxD[:, -1], kernels.decode_products), kv


def prefill_hidden(dp, tokens_BxT, positions_BxT, valid_BxT, *, c: GPTConfig, kernels: Kernels = PORTABLE):
    """`prefill` before the LM head: (the last block's output at every position [B, T, D], per-layer (k, v)).

    For callers that need logits elsewhere than the last position: right-padded prompts (a serving
    engine's slots) or every position's log-probabilities (`head` on the rows wanted).
    """
    x_BxTxD = _embed(c, dp, tokens_BxT, positions_BxT)
    attend_fn = partial(attend, valid_BxS=valid_BxT, kernels=kernels)
    kv = []
    for p in dp["layers"]:
        x_BxTxD, layer_kv = _block(c, p, x_BxTxD, attend_fn, lambda k, v: (k, v, (k, v)), kernels.decode_products)
        kv.append(layer_kv)
    return x_BxTxD, kv


def head(dp, x_BxD, *, c: GPTConfig, kernels: Kernels = PORTABLE):
    """float32 logits [B, V] of the last block's output (ln_f, then the tied LM head)."""
    return _head(c, dp, x_BxD, kernels.decode_products)


def step(dp, tokens_B, positions_B, cache, slot, valid_BxS, *, c: GPTConfig, kernels: Kernels = PORTABLE):
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

    return _one_token(
        c,
        dp,
        tokens_B,
        positions_B,
        cache,
        partial(attend, mask_BxTxS=mask_Bx1xS, kernels=kernels),
        write_at_slot,
        kernels,
    )


def step_rows(
    dp, tokens_B, positions_B, cache, *, c: GPTConfig, chunk: int = 64, kernels: Kernels = PORTABLE, slots_B=None
):
    """`step` with each row at its own cache slot: row b's key and value go to slot `positions_B[b]` of cache row
    `slots_B[b]` (None: row b; a row's sequence starts at slot 0: no padding), and it attends to its slots
    0..positions_B[b]. Returns (logits [B, V], cache). The cache may hold more rows than the step runs.

    For a serving engine, whose rows are independent requests at different lengths. Attention is the
    record's slot attention: "chunks" runs over the cache `chunk` slots at a time (`attend_chunks`), only as
    far as the longest row reaches, and a row's numbers do not depend on how far that is (the cache's S must
    be a multiple of `chunk`); "native" is jaxlm's CPU kernel, each row and head alone over its positions.
    """
    if slots_B is None:
        slots_B = jnp.arange(tokens_B.shape[0])

    def write_at_rows(k_NxHxSxK, v_NxHxSxK):
        def write(k_BxHx1xK, v_BxHx1xK):
            k = k_NxHxSxK.at[slots_B, :, positions_B].set(k_BxHx1xK[:, :, 0].astype(k_NxHxSxK.dtype))
            v = v_NxHxSxK.at[slots_B, :, positions_B].set(v_BxHx1xK[:, :, 0].astype(v_NxHxSxK.dtype))
            return k, v, (k, v)

        return write

    if kernels.slot_attention == "native" and c.head_dim % 8 == 0:  # a CPU kernel reading each row's slot in place
        attend_fn = partial(_attend_native, positions_B=positions_B, slots_B=slots_B)
    else:
        attend_fn = partial(attend_chunks, positions_B=positions_B, chunk=chunk, slots_B=slots_B)
    return _one_token(c, dp, tokens_B, positions_B, cache, attend_fn, write_at_rows, kernels, ln=_ln_rows)


def _attend_native(q_BxHx1xK, k_NxHxSxK, v_NxHxSxK, *, positions_B, slots_B):
    """`attend_chunks` as jaxlm's CPU kernel computes it (`jaxlm.cpu.native.attend_rows`)."""
    out_BxHxK = native.attend_rows(q_BxHx1xK[:, :, 0], k_NxHxSxK, v_NxHxSxK, slots_B, positions_B)
    return out_BxHxK.astype(v_NxHxSxK.dtype)[:, :, None]


def attend_chunks(q_BxHx1xK, k_NxHxSxK, v_NxHxSxK, *, positions_B, chunk: int, slots_B=None):
    """One query per row over its cache slots 0..positions_B[b] (of cache row `slots_B[b]`; None: row b),
    `chunk` slots at a time (online softmax).

    The loop runs only as far as the longest row reaches, and a chunk wholly past a row's position changes
    nothing of that row's result, bit for bit (its running max stays, its weight is exactly 0): a row's
    output is the same however long the other rows are. (One product over the slots up to a window
    gives a row other bits at another window length on XLA:CPU for some shapes.)
    """
    B, H, _, K = q_BxHx1xK.shape
    scale = 1.0 / np.sqrt(K)
    q_BxHxK = q_BxHx1xK[:, :, 0]
    steps = jnp.max(positions_B) // chunk + 1

    def rows(x_NxHxCxK):  # the chunk of the rows this step runs
        return x_NxHxCxK if slots_B is None else x_NxHxCxK[slots_B]

    def body(i, carry):
        m_BxH, l_BxH, acc_BxHxK = carry
        k_BxHxCxK = rows(jax.lax.dynamic_slice_in_dim(k_NxHxSxK, i * chunk, chunk, axis=2))
        v_BxHxCxK = rows(jax.lax.dynamic_slice_in_dim(v_NxHxSxK, i * chunk, chunk, axis=2))
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
    return (acc_BxHxK / l_BxH[..., None]).astype(v_NxHxSxK.dtype)[:, :, None]


def _one_token(c: GPTConfig, dp, tokens_B, positions_B, cache, attend_fn, writer, kernels: Kernels, ln=_ln):
    x_Bx1xD = _embed(c, dp, tokens_B, positions_B)[:, None]
    new_cache = []
    for p, layer_kv in zip(dp["layers"], cache, strict=True):
        x_Bx1xD, layer_kv = _block(c, p, x_Bx1xD, attend_fn, writer(*layer_kv), kernels.decode_products, ln)
        new_cache.append(layer_kv)
    return _head(c, dp, x_Bx1xD[:, 0], kernels.decode_products, ln), new_cache
