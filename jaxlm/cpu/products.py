"""A decode step's products x @ W.T on a CPU (`jaxlm.kernels`: decode products "native" or "cpu_fused").

Decoding reads every weight once per token, so on a CPU it is bound by memory bandwidth, and XLA:CPU's
matmul with a few rows runs several times below it. So, by rows and dtype: packed weights (`native.pack`)
take jaxlm's native kernel (up to `native.max_rows` rows: 64 for AVX-512's, any count for AVX2's); in
float32, 2 to FUSED_ROWS rows multiply and reduce in one fused loop; in bfloat16 one row is padded to two,
since XLA:CPU's one-row bf16 matmul runs much slower than two rows; beyond, XLA's matmul (docs/design.md,
bench/decode_linear.py). On a GPU or TPU none of this runs: there a multiply-and-sum would skip the tensor
cores and sum at another precision than the matmul, so a row's logits would depend on its batch size.
"""

from __future__ import annotations

import jax.numpy as jnp

from . import native

FUSED_ROWS = 32  # float32: up to this many rows, x @ W.T as a fused multiply-reduce; beyond, a matmul


def products(x_NxD, w_OxD, n_out: int | None):
    """x @ w.T [N, O] accumulated in float32; a packed `w_OxD` has `n_out` outputs."""
    (n, D), f32 = x_NxD.shape, w_OxD.dtype == jnp.float32
    if w_OxD.ndim > 2:
        limit = native.max_rows(w_OxD.dtype)
        if limit is None or n <= limit:
            return native.linear(x_NxD, w_OxD, n_out)
        w_OxD = native.unpack(w_OxD, n_out, D)  # many rows: XLA's matmul is faster (bench/decode_linear.py)
    if f32 and 1 < n <= FUSED_ROWS:
        # Must be 2-D: XLA's fused loop over a [N, 1, O, D] product runs far slower (docs/design.md).
        return jnp.sum(w_OxD * x_NxD[:, None, :], axis=-1, dtype=jnp.float32)
    # bfloat16 without the native kernel lands here: its fused form is the slower one (docs/design.md).
    if not f32 and n == 1:
        x_NxD = jnp.concatenate([x_NxD, x_NxD])
    return jnp.einsum("nd,od->no", x_NxD, w_OxD, preferred_element_type=jnp.float32)[:n]
