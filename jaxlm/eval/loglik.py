"""The one primitive every task is built on: log-likelihoods of scored tokens in token sequences.

A `Request` is a token sequence `s` (2 to block_size + 1 tokens): the model reads `s[:-1]`, predicts
`s[1:]`, and the last `n_score` predictions are scored (log-probability, and whether each target is the
argmax). A (context, continuation) pair, an lm-eval rolling window and an HF-guide stride window are all
this one shape, so one jitted function serves every task.

Why it is fast on a CPU: requests are sorted by length and batched, the batch padded to a few length
buckets (powers of two up to the block size), so a whole task compiles a handful of shapes; and the LM
head (a third of GPT-2 124M's FLOPs at T=1024) runs only on the scored positions, gathered from the
final hidden states (`GPT.hidden_states`), not on all T. The program's `jaxlm.kernels` record (resolved
from where the params live) picks the attention, the head's form and, on a CPU, a cap of CPU_BATCH_TOKENS
tokens per batch (two 1024-token windows): batches whose activations stay in cache score faster there.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPTConfig
from ..cpu.eval_head import (
    CPU_BATCH_TOKENS,  # noqa: F401  (re-exported: jaxlm.eval.loglik.CPU_BATCH_TOKENS)
    CPU_HEAD_ROWS,
    score_targets,
)
from ..kernels import Kernels, placed_on, resolve
from ..model.gpt import GPT
from ..utils.buckets import bucket, buckets


@dataclass(frozen=True)
class Request:
    tokens: tuple[int, ...]  # the model reads tokens[:-1] and predicts tokens[1:]
    n_score: int  # the last n_score predictions are scored


@dataclass
class Scored:
    logprobs: np.ndarray  # [n_score] float64: log p(target | everything before it)
    greedy: np.ndarray  # [n_score] bool: the target is the argmax

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    @property
    def is_greedy(self) -> bool:
        return bool(self.greedy.all())


def encode_pair(tokenizer, context: str, continuation: str, prefix_id: int) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for causal models: trailing spaces of the context move to the
    continuation; the pair is encoded whole and the continuation's tokens are those after the
    context's own encoding. An empty context becomes the prefix token (lm-eval's `loglikelihood`)."""
    if context == "":
        return [prefix_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def pair_request(context_ids, continuation_ids, block_size: int) -> Request:
    """lm-eval's truncation: keep the last block_size + 1 tokens (the model reads block_size)."""
    if not continuation_ids:
        raise ValueError("a continuation must have at least one token")
    if len(continuation_ids) > block_size:
        raise ValueError(f"a continuation of {len(continuation_ids)} tokens exceeds the block size {block_size}")
    seq = (list(context_ids) + list(continuation_ids))[-(block_size + 1) :]
    return Request(tuple(seq), len(continuation_ids))


def rolling_requests(token_ids, prefix_id: int, block_size: int) -> list[Request]:
    """lm-eval's `loglikelihood_rolling` (get_rolling_token_windows with context_len=1, then
    make_disjoint_window and the pair truncation): every token predicted exactly once; the first
    window is conditioned on the prefix token, later ones on the block_size tokens before them."""
    n = len(token_ids)
    if n == 0:
        return []
    out = [Request(tuple([prefix_id] + list(token_ids[: min(block_size, n)])), min(block_size, n))]
    done = out[0].n_score
    while done < n:
        m = min(n - done, block_size)
        end = done + m
        start = max(0, end - block_size - 1)
        out.append(Request(tuple(token_ids[start:end]), m))
        done = end
    return out


class Scorer:
    """Owns the jitted scoring function for one model; `compiles` counts the shapes it compiled.

    A batch holds up to `batch_size` sequences and, if `batch_tokens` is set, up to that many padded
    tokens (at least one sequence); None picks the record's: CPU_BATCH_TOKENS on a CPU, no limit elsewhere.
    `attention`: auto | reference | xla | cudnn | splash (`jaxlm.kernels.resolve`); `kernels`: a resolved
    record instead (e.g. one for another platform).
    """

    def __init__(
        self,
        params,
        config: GPTConfig,
        batch_size: int = 8,
        batch_tokens: int | None = None,
        attention: str = "auto",
        kernels: Kernels | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_tokens is not None and batch_tokens < 0:
            raise ValueError(f"batch_tokens must be >= 0 (0: no limit), got {batch_tokens}")
        self.kernels = kernels or resolve(placed_on(params), dtype=config.dtype, attention=attention)
        if batch_tokens is None:
            batch_tokens = self.kernels.eval_batch_tokens
        self.params, self.config, self.batch_size, self.batch_tokens = params, config, batch_size, batch_tokens
        self.head_rows = CPU_HEAD_ROWS if self.kernels.eval_head == "cpu_chunked" else None
        self.t_buckets = buckets(config.block_size, 16)
        self.shapes: set[tuple[int, int, int]] = set()
        self._fn = jax.jit(self._score)

    @property
    def compiles(self) -> int:
        return len(self.shapes)

    def _score(self, params, inputs_BxT, index_BxH, targets_BxH):
        c = self.config
        # The final LayerNorm's output only: the LM head runs on the scored positions below, not on all T.
        hidden_BxTxD = GPT(c, kernels=self.kernels).apply({"params": params}, inputs_BxT, method=GPT.hidden_states)
        hidden_BxHxD = jnp.take_along_axis(hidden_BxTxD, index_BxH[..., None], axis=1)
        wte_VxD = params["wte"]["embedding"].astype(c.dtype)
        B, H = targets_BxH.shape
        logprob_N, greedy_N = score_targets(
            hidden_BxHxD.reshape(B * H, -1), wte_VxD, targets_BxH.reshape(-1), self.head_rows
        )
        return logprob_N.reshape(B, H), greedy_N.reshape(B, H)

    def score(self, requests: list[Request], progress=None) -> list[Scored]:
        """Score every request; results in the order given. `progress(n)` is called per batch."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))
        results: list[Scored | None] = [None] * len(requests)
        pending = []  # one batch in flight while the next is prepared (dispatch is asynchronous)
        lo = 0
        while lo < len(order):  # longest first, so a batch's first request sets its length bucket
            rows = self.rows_for(len(requests[order[lo]].tokens) - 1)
            idx, lo = order[lo : lo + rows], lo + rows
            pending.append((idx, self._dispatch([requests[i] for i in idx], rows)))
            if len(pending) > 1:
                self._collect(*pending.pop(0), requests, results, progress)
        for item in pending:
            self._collect(*item, requests, results, progress)
        return results

    def rows_for(self, n_tokens: int) -> int:
        """Sequences per batch for inputs of `n_tokens` (before padding to the length bucket)."""
        if not self.batch_tokens:
            return self.batch_size
        return max(1, min(self.batch_size, self.batch_tokens // bucket(n_tokens, self.t_buckets)))

    def _dispatch(self, batch: list[Request], B: int):
        T = bucket(max(len(r.tokens) - 1 for r in batch), self.t_buckets)
        H = bucket(max(r.n_score for r in batch), buckets(T, 8))
        inputs = np.zeros((B, T), np.int32)  # right padding: causal attention never looks at it
        index = np.zeros((B, H), np.int32)
        targets = np.zeros((B, H), np.int32)
        for b, r in enumerate(batch):
            seq = np.asarray(r.tokens, np.int32)
            n = len(seq) - 1
            inputs[b, :n] = seq[:-1]
            index[b, : r.n_score] = np.arange(n - r.n_score, n)
            targets[b, : r.n_score] = seq[n - r.n_score + 1 :]
        self.shapes.add((B, T, H))
        return self._fn(self.params, inputs, index, targets)

    def _collect(self, idx, out, requests, results, progress):
        logprob_BxH, greedy_BxH = (np.asarray(x) for x in out)
        for b, i in enumerate(idx):
            k = requests[i].n_score
            results[i] = Scored(logprob_BxH[b, :k].astype(np.float64), greedy_BxH[b, :k])
        if progress is not None:
            progress(len(idx))
