"""The next token of every slot from its logits, each row under its own request's settings.

One compiled program serves any mix of requests: temperature, top-p, top-k and OpenAI's penalties are
per-row arrays. The engine passes, per call, how much work the mix needs (`mode`, an index into MODES):
"greedy" (every row takes the argmax), "draw" (some rows sample, none filters) or "filter" (some row has
top-p < 1 or top-k); one `lax.switch` in the same program, after the scores every mode shares, so a row's
scores are the same bits whatever its batch-mates ask for. Log-probabilities are a program of their own
(`token_logprobs`), run when some row wants them.

Sorting the vocabulary costs more than a decode step on a CPU (XLA's sort of 32 x 50257 logits took
longer than GPT-2 124M's step; measured in bench/bench_serve.py's notes), so nothing here sorts it:
- a draw is an inverse-CDF draw, one uniform number per row, located by block sums: no per-token noise;
- HF's warpers (temperature, then top-k keeping ties at the k-th value, then top-p over what top-k kept)
  become one threshold per row, found among the CANDIDATES most likely tokens (`lax.top_k`); a row whose
  top-k or top-p reaches past them gets its exact threshold by bisection over the float order (32 passes
  over the row), run only when some row needs it. Which way a row's threshold is found depends on that
  row alone, so a row's token never depends on its batch-mates.

A row's draw depends on its request alone: its uniform comes from the request's seed, the choice's
index (n > 1) and the position of the token being drawn, never from the slot or the batch, so a seeded
request gives the same text however busy the server is. Greedy rows (temperature 0) take the argmax of
the penalised logits. Log-probabilities are the model's own (log-softmax of the raw logits, before
penalties and temperature), as vLLM reports them by default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TOP_LOGPROBS = 5  # OpenAI's completions API allows logprobs up to 5
CANDIDATES = 128  # tokens among which a top-k / top-p threshold is looked for first
BLOCK = 128  # tokens per block of the inverse-CDF search
MODES = ("greedy", "draw", "filter")


def row_uniforms(seed_Rx2, choice_R, position_R):
    """One uniform in [0, 1) per row, from key(seed) folded with the choice index, then the token's position."""

    def one(seed_2, choice, position):
        key = jax.random.wrap_key_data(seed_2, impl="threefry2x32")
        return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, choice), position))

    return jax.vmap(one)(seed_Rx2, choice_R, position_R)


def penalised(logits_RxV, counts_RxV, presence_R, frequency_R):
    """OpenAI's presence and frequency penalties over the tokens each row generated so far."""
    counts = counts_RxV.astype(jnp.float32)
    return logits_RxV - frequency_R[:, None] * counts - presence_R[:, None] * (counts_RxV > 0)


def _cumsum(x_RxN):
    """Inclusive prefix sums along the last axis, as a product with a triangular matrix: XLA:CPU's cumsum of
    a few hundred columns took 200 ms where this takes well under one. One row at a time: XLA:CPU's matmul
    gives a row other bits at some row counts (1 and 64 rows against 2 to 32, at GPT-2's 393 blocks), and a
    row's draw must not depend on how many rows the step runs."""
    N = x_RxN.shape[-1]
    upper_NxN = (jnp.arange(N)[:, None] <= jnp.arange(N)[None, :]).astype(x_RxN.dtype)

    def row(x_N):
        return jnp.matmul(x_N[None], upper_NxN, precision=jax.lax.Precision.HIGHEST)[0]

    return jax.lax.map(row, x_RxN)


def _top_k(x_RxV, k: int):
    """`lax.top_k` kept whole: once XLA folds a later slice of its output into it (vals[:, j]), XLA:CPU no
    longer recognises the top-k and sorts the whole row instead (hundreds of ms at 8 x 50257)."""
    return jax.lax.optimization_barrier(jax.lax.top_k(x_RxV, k))


def _ordered(x):
    """float32 -> int32 in the same order (negative floats' bits reversed), so thresholds can be bisected."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _mid(lo, hi, up: bool):
    """(lo + hi) // 2 (or rounded up) without int32 overflow."""
    return (lo >> 1) + (hi >> 1) + (((lo | hi) if up else (lo & hi)) & 1)


def _kth_largest(o_RxV, k_R):
    """The largest t with count(o >= t) >= k, per row (exact: 32 halvings of the int32 range)."""

    def body(_, lohi):
        lo, hi = lohi
        mid = _mid(lo, hi, up=True)
        ok = jnp.sum(o_RxV >= mid[:, None], axis=-1) >= k_R
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (o_RxV.min(-1), o_RxV.max(-1)))
    return lo


def _nucleus_floor(o_RxV, q_RxV, top_p_R):
    """The smallest t with mass(o > t) < top_p, per row: top-p keeps exactly the tokens with o >= t."""

    def body(_, lohi):
        lo, hi = lohi
        mid = _mid(lo, hi, up=False)
        ok = jnp.sum(jnp.where(o_RxV > mid[:, None], q_RxV, 0.0), axis=-1) < top_p_R
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, 32, body, (o_RxV.min(-1), o_RxV.max(-1)))
    return hi


def thresholds(z_RxV, top_k_R, top_p_R, active_R):
    """Per row, the ordered-int threshold of HF's top-k then top-p over scores `z` (keep o(z) >= it); rows not
    `active` (greedy, or free slots) never ask for the exact search."""
    R, V = z_RxV.shape
    C = min(CANDIDATES, V)
    low = jnp.iinfo(jnp.int32).min
    o_RxV = _ordered(z_RxV)
    vals_RxC, _ = _top_k(z_RxV, C)
    o_RxC = _ordered(vals_RxC)
    rows_R = jnp.arange(R)
    k_on = (top_k_R > 0) & (top_k_R < V)
    k_near = k_on & (top_k_R <= C)
    t_k = jnp.where(k_near, o_RxC[rows_R, jnp.clip(top_k_R - 1, 0, C - 1)], low)
    e_RxV = jnp.exp(z_RxV - vals_RxC[:, :1])
    total_R = jnp.sum(jnp.where(o_RxV >= t_k[:, None], e_RxV, 0.0), axis=-1)
    p_RxC = jnp.where(o_RxC >= t_k[:, None], jnp.exp(vals_RxC - vals_RxC[:, :1]), 0.0) / total_R[:, None]
    before_RxC = _cumsum(p_RxC) - p_RxC
    p_on = top_p_R < 1
    kept_R = jnp.sum((o_RxC >= t_k[:, None]) & (before_RxC < top_p_R[:, None]), axis=-1)
    t_near = jnp.where(p_on, o_RxC[rows_R, jnp.maximum(kept_R, 1) - 1], t_k)
    # Found among the candidates unless top-k reaches past them, or (without a top-k among them) the
    # nucleus takes every candidate and may go on.
    resolved = ~active_R | (jnp.where(k_on, k_near, True) & ~(p_on & ~k_near & (kept_R >= C)))

    def exact(_):
        t_k = jnp.where(k_on, _kth_largest(o_RxV, top_k_R), low)
        kept = o_RxV >= t_k[:, None]
        q_RxV = jnp.where(kept, e_RxV, 0.0) / jnp.sum(jnp.where(kept, e_RxV, 0.0), axis=-1, keepdims=True)
        t_p = jnp.where(p_on, _nucleus_floor(o_RxV, q_RxV, top_p_R), low)
        return jnp.where(resolved, t_near, jnp.maximum(t_k, t_p))

    return jax.lax.cond(jnp.all(resolved), lambda _: t_near, exact, None)


def inverse_cdf(z_RxV, keep_RxV, u_R):
    """One draw per row from softmax(z) over the kept tokens: the first token whose cumulative mass exceeds
    u x the total, found block by block (a cumulative sum over the whole row is slow on a CPU)."""
    R, V = z_RxV.shape
    B = -(-V // BLOCK)
    e_RxV = jnp.where(keep_RxV, jnp.exp(z_RxV - jnp.max(jnp.where(keep_RxV, z_RxV, -jnp.inf), -1, keepdims=True)), 0)
    e_RxBxK = jnp.pad(e_RxV, ((0, 0), (0, B * BLOCK - V))).reshape(R, B, BLOCK)
    cum_RxB = _cumsum(e_RxBxK.sum(-1))
    target_R = u_R * cum_RxB[:, -1]
    b_R = jnp.minimum(jnp.sum(cum_RxB <= target_R[:, None], axis=-1), B - 1)
    before_R = jnp.where(b_R > 0, jnp.take_along_axis(cum_RxB, jnp.maximum(b_R - 1, 0)[:, None], 1)[:, 0], 0.0)
    inner_RxK = jnp.take_along_axis(e_RxBxK, b_R[:, None, None], 1)[:, 0]
    j_R = jnp.sum(_cumsum(inner_RxK) + before_R[:, None] <= target_R[:, None], axis=-1)
    idx_R = b_R * BLOCK + jnp.minimum(j_R, BLOCK - 1)
    # u rounding up to the very end can land past the last kept token: take the most likely one instead
    ok_R = (idx_R < V) & jnp.take_along_axis(jnp.pad(keep_RxV, ((0, 0), (0, B * BLOCK - V))), idx_R[:, None], 1)[:, 0]
    return jnp.where(ok_R, idx_R, jnp.argmax(jnp.where(keep_RxV, z_RxV, -jnp.inf), -1))


def next_tokens(
    logits_RxV, counts_RxV, fed_R, fresh_R, live_R, seed_Rx2, choice_R, position_R,
    temperature_R, top_p_R, top_k_R, presence_R, frequency_R, mode,
):  # fmt: skip
    """(tokens [R] int32, counts).

    `counts_RxV` counts each row's generated tokens; `fed_R` is the token each row was just fed (its
    last generated one), added to the counts where `live_R`; `fresh_R` rows start a new request (their
    counts are reset first). `position_R` is the position the drawn token will have in its sequence.

    One row at a time (`jax.lax.map`): XLA:CPU may order a sum over a [rows, vocabulary] array differently at
    another row count, and a row's draw must not depend on how many rows the step runs (the soak found
    top-p draws that moved by a token under load, from the same logits).
    """
    rows = (logits_RxV, counts_RxV, fed_R, fresh_R, live_R, seed_Rx2, choice_R, position_R,
            temperature_R, top_p_R, top_k_R, presence_R, frequency_R)  # fmt: skip

    def one(row):
        token_1, counts_1xV = _next_tokens(*(x[None] for x in row), mode)
        return token_1[0], counts_1xV[0]

    return jax.lax.map(one, rows)


def _next_tokens(
    logits_RxV, counts_RxV, fed_R, fresh_R, live_R, seed_Rx2, choice_R, position_R,
    temperature_R, top_p_R, top_k_R, presence_R, frequency_R, mode,
):  # fmt: skip
    """`next_tokens` over R rows at once."""
    R = logits_RxV.shape[0]
    counts_RxV = jnp.where(fresh_R[:, None], 0, counts_RxV)
    counts_RxV = counts_RxV.at[jnp.arange(R), fed_R].add(live_R.astype(counts_RxV.dtype))
    logits_RxV = logits_RxV.astype(jnp.float32)
    scores_RxV = penalised(logits_RxV, counts_RxV, presence_R, frequency_R)
    greedy_R = jnp.argmax(scores_RxV, axis=-1).astype(jnp.int32)

    def drawn(filter: bool):
        z_RxV = scores_RxV / jnp.where(temperature_R > 0, temperature_R, 1.0)[:, None]
        keep_RxV = jnp.ones(z_RxV.shape, bool)
        if filter:
            keep_RxV = _ordered(z_RxV) >= thresholds(z_RxV, top_k_R, top_p_R, temperature_R > 0)[:, None]
        drawn_R = inverse_cdf(z_RxV, keep_RxV, row_uniforms(seed_Rx2, choice_R, position_R)).astype(jnp.int32)
        return jnp.where(temperature_R > 0, drawn_R, greedy_R)

    branches = {"greedy": lambda: greedy_R, "draw": lambda: drawn(False), "filter": lambda: drawn(True)}
    return jax.lax.switch(mode, [branches[m] for m in MODES]), counts_RxV


def token_logprobs(logits_RxV, tokens_R):
    """(log p of each row's token [R], the top 5 log-probabilities [R, 5] and their ids), all from one
    log-softmax row, so a token that is the argmax has exactly its top-1 value (lm-eval compares them)."""
    logp_RxV = jax.nn.log_softmax(logits_RxV.astype(jnp.float32), axis=-1)
    chosen_R = jnp.take_along_axis(logp_RxV, tokens_R[:, None], axis=-1)[:, 0]
    top_Rx5, ids_Rx5 = _top_k(logp_RxV, TOP_LOGPROBS)
    return chosen_R, top_Rx5, ids_Rx5.astype(jnp.int32)
