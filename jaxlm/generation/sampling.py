"""The next token from logits: greedy, or a draw after temperature, top-k and top-p, in HF's order.

`Sampling` is validated on the host; `next_tokens` runs inside the jitted decode loop. The options
that change the computation's shape (greedy or not, top-k, top-p on or off) are static; the values
of temperature and top-p are traced, so changing them does not recompile.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..errors import JaxlmError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax; top_k and top_p are then ignored); top_k None and top_p 1.0
    are off; a top_k above the vocabulary size keeps every token. Each row draws from its own key
    (seed, row, step), so a row's text does not depend on the other rows in the batch."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise JaxlmError(f"temperature must be a finite number >= 0 (0 is greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
            raise JaxlmError(f"top_k must be an integer >= 1 (or None for no top-k), got {k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise JaxlmError(f"top_p must be in (0, 1] (1 keeps every token), got {p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise JaxlmError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def statics(self, vocab_size: int) -> tuple[bool, int | None, bool]:
        """(greedy, top_k, use_top_p): what `next_tokens` compiles for."""
        if self.greedy:
            return True, None, False
        top_k = None if self.top_k is None or self.top_k >= vocab_size else int(self.top_k)
        return False, top_k, self.top_p < 1


def row_keys(seed: int, batch: int) -> jax.Array:
    """One key per row, so a row's draws depend on (seed, row, step) only."""
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(batch))


def candidates(logits_BxV, temperature, top_p, *, top_k: int | None, use_top_p: bool):
    """HF's TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper (in that order), as the kept
    candidates: (logits_BxC, ids_BxC), C = top_k (or V), -inf where top-p removed one."""
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_k is None and not use_top_p:
        return logits_BxV, jnp.broadcast_to(jnp.arange(logits_BxV.shape[-1]), logits_BxV.shape)
    # Candidates sorted by logit, highest first (exactly k: ties at the k-th value are cut).
    vals_BxC, ids_BxC = jax.lax.top_k(logits_BxV, top_k or logits_BxV.shape[-1])
    if use_top_p:
        # HF's rule: keep the smallest top set whose probability reaches top_p (the first always).
        probs_BxC = jax.nn.softmax(vals_BxC, axis=-1)
        before_BxC = jnp.cumsum(probs_BxC, axis=-1) - probs_BxC
        vals_BxC = jnp.where(before_BxC < top_p, vals_BxC, -jnp.inf)
    return vals_BxC, ids_BxC


def warped_logits(logits_BxV, temperature, top_p, *, top_k: int | None, use_top_p: bool):
    """The logits `next_tokens` draws from, over the whole vocabulary (-inf: filtered out)."""
    vals_BxC, ids_BxC = candidates(logits_BxV, temperature, top_p, top_k=top_k, use_top_p=use_top_p)
    rows_Bx1 = jnp.arange(logits_BxV.shape[0])[:, None]
    return jnp.full(logits_BxV.shape, -jnp.inf, jnp.float32).at[rows_Bx1, ids_BxC].set(vals_BxC)


def next_tokens(logits_BxV, keys_B, step, temperature, top_p, *, greedy: bool, top_k: int | None, use_top_p: bool):
    """Token ids [B] (int32). Without top-k, top-p sorts the whole vocabulary every step."""
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys_B, step)
    vals_BxC, ids_BxC = candidates(logits_BxV, temperature, top_p, top_k=top_k, use_top_p=use_top_p)
    pick_B = jax.vmap(jax.random.categorical)(keys_B, vals_BxC)
    return jnp.take_along_axis(ids_BxC, pick_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
