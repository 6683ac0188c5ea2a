"""Scored positions against the tied LM head: log p(target) and whether the target is the argmax.

On a CPU the rows go through the head in chunks of CPU_HEAD_ROWS. XLA:CPU's row reductions over a
vocabulary-long row slow down about 5x once one call holds 256 rows or more (the sum of exp over
[256, 50257] runs at 2.4 ns per element, over [128, 50257] at 0.48), and a chunk's logits stay in
cache between the matmul and the reductions instead of making a round trip through memory. GPT-2's
head on 512 scored rows (`python bench/eval_head.py`): 397 ms in the plain form, 270 in chunks of 64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CPU_HEAD_ROWS = 64


def head_rows_for_backend() -> int | None:
    return CPU_HEAD_ROWS if jax.default_backend() == "cpu" else None


def _score_rows(hidden_NxD, wte_VxD, targets_N):
    # Logits as [V, N]: XLA:CPU runs this product ~1.4x faster than the [N, V] one at these shapes, and
    # the reductions over V then run down columns, vectorised across the rows.
    logits_VxN = jnp.einsum("vd,nd->vn", wte_VxD, hidden_NxD, preferred_element_type=jnp.float32)
    max_N = jnp.max(logits_VxN, axis=0)
    logz_N = max_N + jnp.log(jnp.sum(jnp.exp(logits_VxN - max_N), axis=0))
    picked_N = jnp.take_along_axis(logits_VxN, targets_N[None, :], axis=0)[0]
    # argmax as the first index that holds the max: one plain min-reduction, where jnp.argmax's
    # (value, index) reduction is the slower loop on a CPU. Same answer for any finite logits.
    V = logits_VxN.shape[0]
    first_N = jnp.min(jnp.where(logits_VxN == max_N, jnp.arange(V, dtype=jnp.int32)[:, None], V), axis=0)
    return picked_N - logz_N, first_N == targets_N


def score_targets(hidden_NxD, wte_VxD, targets_N, rows: int | None = None):
    """(log-probability [N] float32, target is the argmax [N] bool); `rows` per chunk, None: all at once."""
    N = hidden_NxD.shape[0]
    if rows is None or N <= rows:
        return _score_rows(hidden_NxD, wte_VxD, targets_N)
    pad = -N % rows
    hidden_KxRxD = jnp.pad(hidden_NxD, ((0, pad), (0, 0))).reshape(-1, rows, hidden_NxD.shape[1])
    targets_KxR = jnp.pad(targets_N, (0, pad)).reshape(-1, rows)
    logprob_KxR, greedy_KxR = jax.lax.map(lambda xs: _score_rows(xs[0], wte_VxD, xs[1]), (hidden_KxRxD, targets_KxR))
    return logprob_KxR.reshape(-1)[:N], greedy_KxR.reshape(-1)[:N]
