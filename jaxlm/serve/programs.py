"""The engine's device programs for one model, slot count and maximum length, compiled before serving.

- `prefill[T]`: one prompt, right-padded to the length bucket T (`utils.buckets.fine_buckets`: padding is
  wasted work, so the buckets are close), into one slot of the KV cache; returns the logits after its last
  real token and the last block's output at every position (for prompt log-probs).
- `step[R]`: one token for each of R busy slots (the slots named by the call, R a row bucket: powers of two from
  2, then the slot count), each at its own position (`jaxlm.generation.decode.step_rows`: attention over the
  cache CHUNK positions at a time, as far as the longest live sequence reaches); `draw[R]`: their next tokens
  (`jaxlm.serve.sampler.next_tokens` over those slots' rows of the token counts).
- `copy`: one slot's cache into another (the n choices of one prompt share its prefill).
- `sample[1]`: a prefill's first token; `logprobs[R]` log-probabilities of 1 or R rows; `echo`: prompt
  log-probs, ECHO_ROWS positions at a time.

Every shape is fixed when the server starts, so nothing compiles while it serves, and a step costs the
rows that are busy (rounded up to a bucket), not all the slots. A row's numbers never depend on the other
rows: the products (`for_serving`: jaxlm's native CPU kernel, else the platform's matmul) give a row the same
bits at any row count from 2, whatever the other rows hold or where the row sits (tests/test_serve_engine.py),
attention and sampling are row by row (layer norms and the sampler's prefix sums a row at a time), and a
prompt is prefilled alone at its own length bucket.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPTConfig
from ..cpu import native
from ..generation import decode
from ..kernels import PORTABLE, Kernels
from ..utils.buckets import bucket, buckets, fine_buckets
from . import sampler

MIN_BUCKET = 16  # prompt-length buckets: multiples of 16 to 128, then a quarter apart
MIN_ROWS = 2  # XLA:CPU's one-row product takes another path, with other bits than at 2 or more rows
ECHO_ROWS = 64
CHUNK = 64  # cache positions per step of a decode step's attention loop


def for_serving(kernels: Kernels, dtype) -> Kernels:
    """The record the engine runs in `dtype`: decode products that give a row the same bits at every row count a
    step can have, since that count changes with the load. jaxlm's native CPU kernel does (one chain of FMAs
    per output, whatever the rows) and is kept where it runs every row count (AVX2's: a prompt's rows too, so
    no prefill unpacks the weights); so does the platform's matmul, taken otherwise. The CPU's fused
    multiply-reduce does not."""
    if kernels.decode_products == "native" and native.max_rows(dtype) is None:
        return kernels
    why = (*kernels.why, ("decode_products", "serving: the platform's matmul, whose rows do not depend on the batch"))
    return dataclasses.replace(kernels, decode_products="plain", why=why)


class Programs:
    """Compiled programs over decode-layout weights `dp` (`jaxlm.generation.decode.prepare`)."""

    def __init__(self, dp, config: GPTConfig, slots: int, max_len: int, kernels: Kernels = PORTABLE):
        self.dp, self.c, self.slots, self.max_len = dp, config, slots, max_len
        self.kernels = kernels  # the record `dp` was prepared with (its decode products, the prompt's attention)
        self.lengths = fine_buckets(max_len, MIN_BUCKET)
        self.rows = buckets(slots, min(MIN_ROWS, slots))
        self.cache_len = -(-max_len // CHUNK) * CHUNK
        self.exe: dict = {}
        self.compile_log: list[tuple[str, float]] = []

    # ---- state ------------------------------------------------------------------------------------------
    def new_cache(self):
        c = self.c
        shape = (self.slots, c.n_head, self.cache_len, c.head_dim)
        return [(jnp.zeros(shape, c.dtype), jnp.zeros(shape, c.dtype)) for _ in range(c.n_layer)]

    def new_counts(self):
        return jnp.zeros((self.slots, self.c.vocab_size), jnp.int32)

    # ---- the functions compiled ---------------------------------------------------------------------------
    def _prefill(self, dp, cache, tokens_1xT, length, slot):
        T = tokens_1xT.shape[1]
        positions_1xT = jnp.arange(T, dtype=jnp.int32)[None]
        x_1xTxD, kv = decode.prefill_hidden(
            dp, tokens_1xT, positions_1xT, positions_1xT < length, c=self.c, kernels=self.kernels
        )
        zero = jnp.zeros((), jnp.int32)

        def put(x_NxHxSxK, x_1xHxTxK):
            return jax.lax.dynamic_update_slice(x_NxHxSxK, x_1xHxTxK.astype(x_NxHxSxK.dtype), (slot, zero, zero, zero))

        cache = [(put(kc, k), put(vc, v)) for (kc, vc), (k, v) in zip(cache, kv, strict=True)]
        last_1xD = jax.lax.dynamic_index_in_dim(x_1xTxD[0], length - 1, axis=0)
        return decode.head(dp, last_1xD, c=self.c, kernels=self.kernels), x_1xTxD[0], cache

    def _step(self, dp, cache, slots_R, tokens_R, positions_R):
        return decode.step_rows(
            dp, tokens_R, positions_R, cache, c=self.c, chunk=CHUNK, kernels=self.kernels, slots_B=slots_R
        )

    @staticmethod
    def _draw(logits_RxV, counts_NxV, slots_R, *rows):
        """`sampler.next_tokens` over the rows of `slots_R`, their token counts read from and written back
        into the slots' counts."""
        tokens_R, counts_RxV = sampler.next_tokens(logits_RxV, counts_NxV[slots_R], *rows)
        return tokens_R, counts_NxV.at[slots_R].set(counts_RxV)

    @staticmethod
    def _copy(cache, src, dst):
        def one(x):
            row = jax.lax.dynamic_index_in_dim(x, src, axis=0)
            return jax.lax.dynamic_update_index_in_dim(x, row, dst, axis=0)

        return [(one(k), one(v)) for k, v in cache]

    def _echo(self, dp, x_RxD, targets_R):
        return sampler.token_logprobs(decode.head(dp, x_RxD, c=self.c, kernels=self.kernels), targets_R)

    # ---- compiling ------------------------------------------------------------------------------------------
    def _specs(self):
        c, N, V = self.c, self.slots, self.c.vocab_size
        i32, f32, u32 = jnp.int32, jnp.float32, jnp.uint32
        S = jax.ShapeDtypeStruct
        cache = [(S(x.shape, x.dtype), S(y.shape, y.dtype)) for x, y in jax.eval_shape(self.new_cache)]
        scalar = S((), i32)

        def rows(R):  # next_tokens' per-row arguments after the logits and counts, then the mode
            per_row = (i32, bool, bool, None, i32, i32, f32, f32, i32, f32, f32)
            return (*(S((R, 2), u32) if t is None else S((R,), t) for t in per_row), scalar)

        todo = []
        for T in self.lengths:
            args = (self.dp, cache, S((1, T), i32), scalar, scalar)
            todo.append((("prefill", T), jax.jit(self._prefill, donate_argnums=1), args))
        for R in self.rows:
            todo.append((("step", R), jax.jit(self._step, donate_argnums=1), (self.dp, cache, *[S((R,), i32)] * 3)))
            draw_args = (S((R, V), f32), S((N, V), i32), S((R,), i32), *rows(R))
            todo.append((("draw", R), jax.jit(self._draw, donate_argnums=1), draw_args))
        todo.append((("copy",), jax.jit(self._copy, donate_argnums=0), (cache, scalar, scalar)))
        todo.append((("sample", 1), jax.jit(sampler.next_tokens), (S((1, V), f32), S((1, V), i32), *rows(1))))
        for R in sorted({1, *self.rows}):
            todo.append((("logprobs", R), jax.jit(sampler.token_logprobs), (S((R, V), f32), S((R,), i32))))
        echo_args = (self.dp, S((ECHO_ROWS, c.n_embd), c.dtype), S((ECHO_ROWS,), i32))
        todo.append((("echo",), jax.jit(self._echo), echo_args))
        return todo

    def compile_all(self, log=None, only=None):
        """Compile every program the engine can run (or those whose key `only(key)` accepts), and run each once
        on zeros: XLA:CPU's first run of a program is slower than the next by a few hundred milliseconds (a
        GPT-2 124M prefill: 0.45 s, then 0.08 s), which would otherwise fall on the first request to need it.
        `log(message)` hears of each with its time."""
        cache = None  # one cache for the warm-up runs, handed on from program to program (they donate it)
        for key, fn, args in self._specs():
            if only is not None and not only(key):
                continue
            t0 = time.perf_counter()
            self.exe[key] = fn.lower(*args).compile()
            if cache is None and any(isinstance(a, list) for a in args):
                cache = self.new_cache()
            out = self.exe[key](*(cache if isinstance(a, list) else jax.tree.map(_zeros, a) for a in args))
            jax.block_until_ready(out)
            if any(isinstance(a, list) for a in args):  # the cache (the one list argument) comes back new
                cache = out if isinstance(out, list) else next(o for o in out if isinstance(o, list))
            seconds = time.perf_counter() - t0
            self.compile_log.append((_name(key), seconds))
            if log is not None:
                log(f"compiled {_name(key)} in {seconds:.2f} s")

    # ---- running ------------------------------------------------------------------------------------------
    def prefill(self, cache, prompt: list[int], slot: int):
        """(logits [1, V], hidden [T, D], cache) for `prompt` written into `slot`."""
        T = bucket(len(prompt), self.lengths)
        tokens = np.zeros((1, T), np.int32)
        tokens[0, : len(prompt)] = prompt
        return self.exe["prefill", T](self.dp, cache, tokens, np.int32(len(prompt)), np.int32(slot))

    def step(self, cache, slots_R, tokens_R, positions_R):
        """(logits [R, V], cache): one token for each of the slots `slots_R` (R: one of `self.rows`)."""
        return self.exe["step", len(slots_R)](self.dp, cache, slots_R, tokens_R, positions_R)

    def draw(self, mode: str, logits_RxV, counts_NxV, slots_R, *rows):
        """(tokens [R], counts): the next token of each of the slots `slots_R` (`sampler.next_tokens`)."""
        mode = np.int32(sampler.MODES.index(mode))
        return self.exe["draw", len(slots_R)](logits_RxV, counts_NxV, slots_R, *rows, mode)

    def copy(self, cache, src: int, dst: int):
        return self.exe["copy",](cache, np.int32(src), np.int32(dst))

    def sample(self, mode: str, *args):
        """(tokens, counts): `jaxlm.serve.sampler.next_tokens` over one row (a prefill's first token)."""
        return self.exe["sample", 1](*args, np.int32(sampler.MODES.index(mode)))

    def logprobs(self, logits_RxV, tokens_R):
        """(log-prob of each token, top 5 log-probs, their ids) of the model's own distribution."""
        return self.exe["logprobs", logits_RxV.shape[0]](logits_RxV, tokens_R)

    def prompt_logprobs(self, hidden_TxD, prompt: list[int]):
        """For each prompt token after the first: (its log-prob, the top 5 log-probs, their ids), as numpy."""
        n = len(prompt) - 1
        rows = -(-max(n, 1) // ECHO_ROWS) * ECHO_ROWS
        x_RxD = np.zeros((rows, self.c.n_embd), hidden_TxD.dtype)
        x_RxD[:n] = np.asarray(hidden_TxD)[:n]
        targets_R = np.zeros(rows, np.int32)
        targets_R[:n] = prompt[1:]
        out = [self.exe["echo",](self.dp, x_RxD[lo : lo + ECHO_ROWS], targets_R[lo : lo + ECHO_ROWS])
               for lo in range(0, rows, ECHO_ROWS)]  # fmt: skip
        return tuple(np.concatenate([np.asarray(o[i]) for o in out])[:n] for i in range(3))


def _zeros(x):
    """Zeros for an argument's shape, the argument itself where it is an array already (the weights)."""
    return jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x


def _name(key) -> str:
    what, *rest = key
    if what in ("step", "draw", "sample", "logprobs"):
        return f"{what}[rows={rest[0]}]"
    return f"{what}[{rest[0]}]" if rest else what
