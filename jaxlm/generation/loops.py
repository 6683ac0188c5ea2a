"""The two compiled decode loops: one token per row (greedy or sampled) and beam search.

Each is one `lax.while_loop` over a fixed-size KV cache, traced once per shape bucket: no Python
per token. A row's history (its cache slots' token ids, [F, S]) feeds the logits processors and,
for beams, holds the hypotheses; the cache is reordered by beam on device each step. Beam search
is transformers' vectorised `_beam_search` step for step (2 x num_beams candidates, finished
hypotheses scored with the length penalty, the same early-stopping heuristic for True, False and
"never"), so it returns the same sequences and scores.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from . import processors
from .sampling import next_tokens
from .streaming import emit

NEG = -1.0e9  # transformers' "impossible" beam score (finite, so sums of it stay ordered)


def sample_loop(
    w, first, lengths_B, hist_BxS, keys_B, temperature, top_p, eos, max_new, penalty, min_new,
    *, path, P, greedy, top_k, use_top_p, stream, use_penalty, ngram,
):  # fmt: skip
    """Sample the first token from the prefill's logits, then one while_loop: step, sample, record.

    Token i of a row goes to history slot P + i, the cache slot it is fed at. Returns (history, steps).
    """
    logits_BxV, kv = first
    B, S = hist_BxS.shape
    cache = path.grow(kv, S)
    valid_BxS = jnp.arange(S)[None] >= (P - lengths_B)[:, None]
    sample = partial(next_tokens, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    process = partial(processors.apply, use_penalty=use_penalty, ngram=ngram)
    fill = jnp.maximum(eos, 0)

    def pick(i, logits_BxV, done_B, hist_BxS):
        logits_BxV = process(logits_BxV, hist_BxS, valid_BxS, P + i - 1, i, penalty, eos, min_new)
        new_B = sample(logits_BxV, keys_B, i, temperature, top_p)
        new_B = jnp.where(done_B, fill, new_B)  # finished rows repeat EOS (dropped later)
        done_B = done_B | (new_B == eos)
        if stream:
            io_callback(emit, None, *path.whole(new_B, i, done_B), ordered=False)
        return done_B, jax.lax.dynamic_update_slice(hist_BxS, new_B[:, None], (jnp.zeros((), jnp.int32), P + i))

    done_B, hist_BxS = pick(jnp.int32(0), logits_BxV, jnp.zeros((B,), bool), hist_BxS)

    def body(carry):
        i, done_B, cache, hist_BxS = carry
        tok_B = jax.lax.dynamic_index_in_dim(hist_BxS, P + i - 1, axis=1, keepdims=False)
        logits_BxV, cache = path.step(w, tok_B, lengths_B + i - 1, cache, P + i - 1, valid_BxS)
        done_B, hist_BxS = pick(i, logits_BxV, done_B, hist_BxS)
        return i + 1, done_B, cache, hist_BxS

    def cond(carry):
        i, done_B, _, _ = carry
        return (i < max_new) & ~jnp.all(done_B)

    i, _, _, hist_BxS = jax.lax.while_loop(cond, body, (jnp.int32(1), done_B, cache, hist_BxS))
    return hist_BxS, i


def _gather(x_BxKx, idx_BxJ):
    """x[b, idx[b, j]] for each row b: the beams (or candidates) idx picks."""
    idx = idx_BxJ.reshape(idx_BxJ.shape + (1,) * (x_BxKx.ndim - 2))
    return jnp.take_along_axis(x_BxKx, idx, axis=1)


def beam_loop(
    w, first, lengths_B, hist_BxS, eos, max_new, penalty, min_new, length_penalty,
    *, path, P, K, early_stopping, use_penalty, ngram,
):  # fmt: skip
    """transformers' beam search over B prompts with K beams each (F = B x K cache rows).

    Returns (finished hypotheses' history [B, K, S] best first, their scores [B, K], steps).
    """
    logits_BxV, kv = first
    B, S = hist_BxS.shape
    V = logits_BxV.shape[-1]
    F, C = B * K, 2 * K  # rows, candidates kept per prompt
    lengths_F = jnp.repeat(lengths_B, K)
    valid_FxS = jnp.arange(S)[None] >= (P - lengths_F)[:, None]
    cache = path.reorder(path.grow(kv, S), jnp.repeat(jnp.arange(B), K))  # prefilled once per prompt
    process = partial(processors.apply, use_penalty=use_penalty, ngram=ngram)
    is_true = early_stopping is True
    first_C = jnp.arange(C) < K  # only the top K candidates may finish

    def select(i, logits_FxV, s):
        """One step of `_beam_search` (b. to g.) on the running beams' logits."""
        logp_FxV = jax.nn.log_softmax(logits_FxV.astype(jnp.float32), axis=-1)
        logp_FxV = process(logp_FxV, s["run_hist"], valid_FxS, P + i - 1, i, penalty, eos, min_new)
        acc_BxKV = (logp_FxV.reshape(B, K, V) + s["run_scores"][:, :, None]).reshape(B, K * V)
        top_BxC, idx_BxC = jax.lax.top_k(acc_BxKV, C)
        src_BxC, tok_BxC = idx_BxC // V, idx_BxC % V
        top_hist_BxCxS = _gather(s["run_hist"].reshape(B, K, S), src_BxC).at[:, :, P + i].set(tok_BxC)
        hits_BxC = (tok_BxC == eos) | (i + 1 >= max_new)
        # e. the best K unfinished candidates run on
        run_BxC = top_BxC + hits_BxC.astype(jnp.float32) * NEG
        nxt_BxK = jax.lax.top_k(run_BxC, K)[1]
        run_scores = _gather(run_BxC, nxt_BxK)
        run_src_BxK = _gather(src_BxC, nxt_BxK)
        # f. finished candidates among the top K join the finished set if they score in its top K
        did_BxC = hits_BxC & first_C[None]
        fin_BxC = top_BxC / (i + 1).astype(jnp.float32) ** length_penalty
        fin_BxC += (jnp.all(s["fin"], axis=-1, keepdims=True) & is_true).astype(jnp.float32) * NEG
        fin_BxC += (~s["unsat"]).astype(jnp.float32) * NEG
        fin_BxC += (~did_BxC).astype(jnp.float32) * NEG
        merged = jnp.concatenate([s["scores"], fin_BxC], axis=1)
        best_BxK = jax.lax.top_k(merged, K)[1]
        scores = _gather(merged, best_BxK)
        hyps = _gather(jnp.concatenate([s["hyps"], top_hist_BxCxS], axis=1), best_BxK)
        fin = _gather(jnp.concatenate([s["fin"], did_BxC], axis=1), best_BxK)
        # g. can a running beam still beat the worst finished one? (the heuristic `early_stopping` picks)
        if early_stopping == "never":
            best_len = jnp.where(length_penalty > 0, max_new, i + 1)
        else:
            best_len = i + 1
        best_run_Bx1 = run_scores[:, :1] / best_len.astype(jnp.float32) ** length_penalty
        worst_BxK = jnp.where(fin, jnp.min(scores, axis=1, keepdims=True), NEG)
        unsat = s["unsat"] & jnp.any(best_run_Bx1 > worst_BxK, axis=-1, keepdims=True)
        go = jnp.any(unsat) & ~(jnp.all(fin) & is_true) & ~jnp.all(hits_BxC)
        run_hist = _gather(top_hist_BxCxS, nxt_BxK).reshape(F, S)
        rows_F = (jnp.arange(B)[:, None] * K + run_src_BxK).reshape(F)
        state = dict(run_hist=run_hist, run_scores=run_scores, hyps=hyps, scores=scores, fin=fin, unsat=unsat, go=go)
        return state, rows_F

    state = dict(
        run_hist=jnp.repeat(hist_BxS, K, axis=0),
        run_scores=jnp.zeros((B, K), jnp.float32).at[:, 1:].set(NEG),  # only beam 0 starts
        hyps=jnp.repeat(hist_BxS[:, None], K, axis=1),
        scores=jnp.full((B, K), NEG, jnp.float32),
        fin=jnp.zeros((B, K), bool),
        unsat=jnp.ones((B, 1), bool),
    )
    state, rows_F = select(jnp.int32(0), jnp.repeat(logits_BxV, K, axis=0), state)
    cache = path.reorder(cache, rows_F)

    def body(carry):
        i, s, cache = carry
        tok_F = jax.lax.dynamic_index_in_dim(s["run_hist"], P + i - 1, axis=1, keepdims=False)
        logits_FxV, cache = path.step(w, tok_F, lengths_F + i - 1, cache, P + i - 1, valid_FxS)
        s, rows_F = select(i, logits_FxV, s)
        return i + 1, s, path.reorder(cache, rows_F)

    def cond(carry):
        i, s, _ = carry
        return s["go"] & (i < max_new)

    i, state, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), state, cache))
    return state["hyps"], state["scores"], i
