"""HF's logits processors inside the jitted loop: repetition penalty, no-repeat n-grams, min new tokens.

Each works on a row's history as the loop keeps it: the token ids of its cache slots [F, S] (left
padding, prompt, new tokens), `valid_FxS` False at padding and `slot` the last filled slot. Only
real tokens count, as in transformers for repetition penalty (it masks the padding); its no-repeat
n-gram also matches windows over the padding, which differs only when the last n-1 tokens are the
padding id (transformers pads with EOS, which ends a row). Applied in HF's order: repetition
penalty, no-repeat n-gram, min new tokens; on logits for greedy / sampling, on log-probs for beams.
"""

from __future__ import annotations

import jax.numpy as jnp


def _mark(F, V, ids_FxN, keep_FxN):
    """[F, V] True at ids where keep (others go to a spare column V that is cut off)."""
    rows_Fx1 = jnp.arange(F)[:, None]
    return jnp.zeros((F, V + 1), bool).at[rows_Fx1, jnp.where(keep_FxN, ids_FxN, V)].set(True)[:, :V]


def apply(scores_FxV, hist_FxS, valid_FxS, slot, count, penalty, eos, min_new, *, use_penalty: bool, ngram: int):
    """`scores_FxV` after the processors; `count` new tokens so far, `eos` -1 for none (traced)."""
    F, V = scores_FxV.shape
    S = hist_FxS.shape[1]
    live_FxS = valid_FxS & (jnp.arange(S) <= slot)
    if use_penalty:
        # RepetitionPenaltyLogitsProcessor: once per token seen; negative scores times, positive over.
        seen_FxV = _mark(F, V, hist_FxS, live_FxS)
        penalized = jnp.where(scores_FxV < 0, scores_FxV * penalty, scores_FxV / penalty)
        scores_FxV = jnp.where(seen_FxV, penalized, scores_FxV)
    if ngram:
        # NoRepeatNGramLogitsProcessor: every complete window whose first n-1 tokens equal the last n-1
        # bans its last token. A window must lie wholly in real, filled slots.
        W = S - ngram + 1
        win_FxWxN = jnp.stack([hist_FxS[:, t : W + t] for t in range(ngram)], axis=-1)
        win_live_FxW = jnp.stack([live_FxS[:, t : W + t] for t in range(ngram)], axis=-1).all(-1)
        starts = slot - ngram + 2 + jnp.arange(ngram - 1)
        prefix_FxM = jnp.take(hist_FxS, jnp.clip(starts, 0, S - 1), axis=1)
        match_FxW = win_live_FxW & (win_FxWxN[..., :-1] == prefix_FxM[:, None, :]).all(-1)
        scores_FxV = jnp.where(_mark(F, V, win_FxWxN[..., -1], match_FxW), -jnp.inf, scores_FxV)
    # MinNewTokensLengthLogitsProcessor: EOS impossible before `min_new` new tokens.
    return jnp.where((jnp.arange(V) == eos) & (count < min_new), -jnp.inf, scores_FxV)
