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

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPTConfig
from ..cpu import native
from ..model.attention import attend
from ..model.gpt import layer_norm

FUSED_ROWS = 32  # float32: up to this many rows, x @ W.T as a fused multiply-reduce (faster on CPU); beyond, a matmul
NATIVE_ROWS = 64  # packed weights: up to this many rows the native kernel; beyond (a long prefill), XLA's matmul


def prepare(params, c: GPTConfig) -> dict:
    """Decode-layout weights in the compute dtype: per-layer dicts, kernels [out, in] (one copy).

    Done in numpy (zero-copy views of CPU arrays): as one XLA program, its ~100 slices and
    transposes took about 4 s to compile for the 124M model. Where `native.usable`, the kernels and
    wte are stored packed (`native.pack`, rank 3 or 4); `_linear` and `_embed` tell by their rank.
    """
    dtype = jnp.dtype(c.dtype)
    packed = native.usable(dtype)
    h = jax.tree.map(np.asarray, jax.device_get(params["h"]))
    a, m = h["attn"], h["mlp"]
    L, D = a["c_attn"]["kernel"].shape[:2]

    def put(x):
        return jax.device_put(np.ascontiguousarray(x, dtype=dtype))

    def kernel(w_OxD):
        w_OxD = np.asarray(w_OxD, dtype)
        return jax.device_put(native.pack(w_OxD) if packed else np.ascontiguousarray(w_OxD))

    def layer(i):
        return {
            "ln_1": {k: put(x[i]) for k, x in h["ln_1"].items()},
            "ln_2": {k: put(x[i]) for k, x in h["ln_2"].items()},
            "qkv_w": kernel(a["c_attn"]["kernel"][i].reshape(D, 3 * D).T),
            "qkv_b": put(a["c_attn"]["bias"][i].reshape(3 * D)),
            "proj_w": kernel(a["c_proj"]["kernel"][i].T),
            "proj_b": put(a["c_proj"]["bias"][i]),
            "fc_w": kernel(m["c_fc"]["kernel"][i].T),
            "fc_b": put(m["c_fc"]["bias"][i]),
            "out_w": kernel(m["c_proj"]["kernel"][i].T),
            "out_b": put(m["c_proj"]["bias"][i]),
        }

    rest = jax.tree.map(lambda x: put(np.asarray(x)), jax.device_get({k: params[k] for k in ("wpe", "ln_f")}))
    return {
        "wte": kernel(jax.device_get(params["wte"]["embedding"])),  # the head's [out, in] as it is
        "wpe": rest["wpe"]["embedding"],
        "ln_f": rest["ln_f"],
        "layers": [layer(i) for i in range(L)],
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


def _mlp(c: GPTConfig, p, x):
    h = jax.nn.gelu(_linear(_ln(c, p["ln_2"], x), p["fc_w"], p["fc_b"]), approximate=True)
    return x + _linear(h, p["out_w"], p["out_b"])


def _qkv(c: GPTConfig, p, x_BxTxD):
    B, T, _ = x_BxTxD.shape
    qkv_BxTx3xHxK = _linear(_ln(c, p["ln_1"], x_BxTxD), p["qkv_w"], p["qkv_b"]).reshape(B, T, 3, c.n_head, -1)
    return (qkv_BxTx3xHxK[:, :, i].transpose(0, 2, 1, 3) for i in range(3))


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
    T = tokens_BxT.shape[1]
    x_BxTxD = _embed(c, dp, tokens_BxT, positions_BxT)
    mask_BxTxT = jnp.tril(jnp.ones((T, T), bool))[None] & valid_BxT[:, None, :]
    kv = []
    for p in dp["layers"]:
        q, k, v = _qkv(c, p, x_BxTxD)
        kv.append((k, v))
        y_BxHxTxK = attend(q, k, v, mask_BxTxT)
        y_BxTxD = y_BxHxTxK.transpose(0, 2, 1, 3).reshape(x_BxTxD.shape)
        x_BxTxD = _mlp(c, p, x_BxTxD + _linear(y_BxTxD, p["proj_w"], p["proj_b"]))
    return _head(c, dp, x_BxTxD[:, -1]), kv


def step(dp, tokens_B, positions_B, cache, slot, valid_BxS, *, c: GPTConfig):
    """One new token per row, written at cache `slot`; returns (logits [B, V], cache).

    `cache` is a list of per-layer (k, v), each [B, H, S, K]; a row attends to the slots up to
    `slot` that are valid (`valid_BxS` is False at its left padding).
    """
    B, S = valid_BxS.shape
    x_Bx1xD = _embed(c, dp, tokens_B, positions_B)[:, None]
    mask_Bx1xS = (valid_BxS & (jnp.arange(S) <= slot))[:, None]
    zero = jnp.zeros((), jnp.int32)
    new_cache = []
    for p, (k_BxHxSxK, v_BxHxSxK) in zip(dp["layers"], cache, strict=True):
        q, k, v = _qkv(c, p, x_Bx1xD)
        k_BxHxSxK = jax.lax.dynamic_update_slice(k_BxHxSxK, k.astype(k_BxHxSxK.dtype), (zero, zero, slot, zero))
        v_BxHxSxK = jax.lax.dynamic_update_slice(v_BxHxSxK, v.astype(v_BxHxSxK.dtype), (zero, zero, slot, zero))
        new_cache.append((k_BxHxSxK, v_BxHxSxK))
        y_BxHx1xK = attend(q, k_BxHxSxK, v_BxHxSxK, mask_Bx1xS)
        y_Bx1xD = y_BxHx1xK.transpose(0, 2, 1, 3).reshape(B, 1, -1)
        x_Bx1xD = _mlp(c, p, x_Bx1xD + _linear(y_Bx1xD, p["proj_w"], p["proj_b"]))
    return _head(c, dp, x_Bx1xD[:, 0]), new_cache
