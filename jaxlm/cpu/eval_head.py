"""Scored positions against the tied LM head: log p(target) and whether the target is the argmax.

On a CPU, more than CPU_ONE_PIECE_ROWS rows go through the head a vocabulary chunk at a time
(CPU_VOCAB_CHUNK entries, a running max, sum of exp and first argmax), in groups of at most CPU_HEAD_ROWS
rows. Each chunk's [C, N] logits stay in cache between the product and the reductions instead of a
[V, N] round trip through memory, and no reduction runs along a vocabulary-long row (XLA:CPU's slow
down per element from a few hundred such rows per call). `python bench/eval_head.py` times the forms
(docs/design.md). Few rows stream the weights once either way and stay in one piece.

A CPU scoring batch also holds at most CPU_BATCH_TOKENS padded tokens (`jaxlm.eval.loglik.Scorer`): with
GPT-2 124M at 1024 tokens, 2 windows per batch score faster per token than 8, their activations staying in
cache (docs/design.md; bench/bench_eval.py --batch-tokens). `jaxlm.kernels` picks both for CPU programs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CPU_VOCAB_CHUNK = 1024
CPU_HEAD_ROWS = 512
CPU_ONE_PIECE_ROWS = 64
CPU_BATCH_TOKENS = 2048
_NEG = float(jnp.finfo(jnp.float32).min)


def _chunk_stats(logits_CxN, offset):
    # argmax as the first index that holds the max: one plain min-reduction, where jnp.argmax's
    # (value, index) reduction is the slower loop on a CPU. Same answer for any finite logits.
    C = logits_CxN.shape[0]
    max_N = jnp.max(logits_CxN, axis=0)
    first_N = jnp.min(jnp.where(logits_CxN == max_N, jnp.arange(C, dtype=jnp.int32)[:, None], C), axis=0)
    return max_N, first_N + offset


def _merge(carry, logits_CxN, offset):
    """Running (max, sum of exp(logit - max), first argmax) after one more chunk of the vocabulary."""
    max_N, sum_N, first_N = carry
    cmax_N, cfirst_N = _chunk_stats(logits_CxN, offset)
    new_N = jnp.maximum(max_N, cmax_N)
    sum_N = sum_N * jnp.exp(max_N - new_N) + jnp.sum(jnp.exp(logits_CxN - new_N), axis=0)
    return new_N, sum_N, jnp.where(cmax_N > max_N, cfirst_N, first_N)  # ">": ties keep the earlier index


def _logits(wte_CxD, hidden_NxD):
    # Logits as [V, N]: XLA:CPU runs this product faster than the [N, V] one at these shapes, and
    # the reductions over V then run down columns, vectorised across the rows.
    return jnp.einsum("vd,nd->vn", wte_CxD, hidden_NxD, preferred_element_type=jnp.float32)


def _score_rows(hidden_NxD, wte_VxD, targets_N, chunk: int | None):
    V, N = wte_VxD.shape[0], hidden_NxD.shape[0]
    chunk = V if chunk is None else min(chunk, V)

    def step(carry, k):
        wte_CxD = jax.lax.dynamic_slice_in_dim(wte_VxD, k * chunk, chunk, 0)
        return _merge(carry, _logits(wte_CxD, hidden_NxD), k * chunk), None

    full = V // chunk
    carry = (jnp.full((N,), _NEG), jnp.zeros((N,), jnp.float32), jnp.zeros((N,), jnp.int32))
    if full == 1:  # one piece: no loop
        carry, _ = step(carry, 0)
    else:
        carry, _ = jax.lax.scan(step, carry, jnp.arange(full))
    if V % chunk:
        carry = _merge(carry, _logits(wte_VxD[full * chunk :], hidden_NxD), full * chunk)
    max_N, sum_N, first_N = carry
    picked_N = jnp.einsum("nd,nd->n", hidden_NxD, wte_VxD[targets_N], preferred_element_type=jnp.float32)
    return picked_N - (max_N + jnp.log(sum_N)), first_N == targets_N


def score_targets(hidden_NxD, wte_VxD, targets_N, rows: int | None = None, vocab_chunk: int = CPU_VOCAB_CHUNK):
    """(log-probability [N] float32, target is the argmax [N] bool). `rows`: None scores all rows in one
    piece (GPU/TPU); otherwise the CPU form above, groups of at most `rows` rows, `vocab_chunk` entries."""
    N = hidden_NxD.shape[0]
    if rows is None or N <= CPU_ONE_PIECE_ROWS:
        return _score_rows(hidden_NxD, wte_VxD, targets_N, None)
    if N <= rows:
        return _score_rows(hidden_NxD, wte_VxD, targets_N, vocab_chunk)
    pad = -N % rows
    hidden_KxRxD = jnp.pad(hidden_NxD, ((0, pad), (0, 0))).reshape(-1, rows, hidden_NxD.shape[1])
    targets_KxR = jnp.pad(targets_N, (0, pad)).reshape(-1, rows)
    logprob_KxR, greedy_KxR = jax.lax.map(
        lambda xs: _score_rows(xs[0], wte_VxD, xs[1], vocab_chunk), (hidden_KxRxD, targets_KxR)
    )
    return logprob_KxR.reshape(-1)[:N], greedy_KxR.reshape(-1)[:N]
