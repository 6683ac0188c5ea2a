"""The engine's device programs for one model, slot count and maximum length, compiled before serving.

- `prefill[T]`: one prompt, right-padded to the length bucket T, into one slot of the KV cache; returns the
  logits after its last real token and the last block's output at every position (for prompt log-probs).
- `step`: one token for every slot, each at its own position (`jaxlm.generation.decode.step_rows`: attention
  over the cache CHUNK positions at a time, as far as the longest live sequence reaches).
- `copy`: one slot's cache into another (the n choices of one prompt share its prefill).
- `sample[R]`: `jaxlm.serve.sampler.next_tokens` over R = 1 (a prefill's first token) or R = slots rows,
  `logprobs[R]` their log-probabilities; `echo`: prompt log-probs, ECHO_ROWS positions at a time.

Every shape is fixed when the server starts, so nothing compiles while it serves. A row's numbers never
depend on the other rows: the step always runs all slots (XLA:CPU's products give a row the same bits
at a fixed row count, whatever the other rows hold or where the row sits), and a prompt is prefilled
alone at its own length bucket.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPTConfig
from ..generation import decode
from ..kernels import PORTABLE, Kernels
from ..utils.buckets import bucket, buckets
from . import sampler

MIN_BUCKET = 32
ECHO_ROWS = 64
CHUNK = 64  # cache positions per step of a decode step's attention loop


class Programs:
    """Compiled programs over decode-layout weights `dp` (`jaxlm.generation.decode.prepare`)."""

    def __init__(self, dp, config: GPTConfig, slots: int, max_len: int, kernels: Kernels = PORTABLE):
        self.dp, self.c, self.slots, self.max_len = dp, config, slots, max_len
        self.kernels = kernels  # the record `dp` was prepared with (its decode products, the prompt's attention)
        self.lengths = buckets(max_len, MIN_BUCKET)
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

    def _step(self, dp, cache, tokens_N, positions_N):
        return decode.step_rows(dp, tokens_N, positions_N, cache, c=self.c, chunk=CHUNK, kernels=self.kernels)

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

        def rows(R):  # next_tokens' arguments over R rows
            per_row = (i32, bool, bool, None, i32, i32, f32, f32, i32, f32, f32)
            rows = (S((R, 2), u32) if t is None else S((R,), t) for t in per_row)
            return (S((R, V), f32), S((R, V), i32), *rows, scalar)  # the last: the mode

        todo = []
        for T in self.lengths:
            args = (self.dp, cache, S((1, T), i32), scalar, scalar)
            todo.append((("prefill", T), jax.jit(self._prefill, donate_argnums=1), args))
        todo.append((("step",), jax.jit(self._step, donate_argnums=1), (self.dp, cache, S((N,), i32), S((N,), i32))))
        todo.append((("copy",), jax.jit(self._copy, donate_argnums=0), (cache, scalar, scalar)))
        for R in (1, N):
            fn = jax.jit(sampler.next_tokens, donate_argnums=1 if R == N else ())
            todo.append((("sample", R), fn, rows(R)))
            todo.append((("logprobs", R), jax.jit(sampler.token_logprobs), (S((R, V), f32), S((R,), i32))))
        echo_args = (self.dp, S((ECHO_ROWS, c.n_embd), c.dtype), S((ECHO_ROWS,), i32))
        todo.append((("echo",), jax.jit(self._echo), echo_args))
        return todo

    def compile_all(self, log=None, only=None):
        """Compile every program the engine can run (or those whose key `only(key)` accepts); `log(message)`
        hears of each with its time."""
        for key, fn, args in self._specs():
            if only is not None and not only(key):
                continue
            t0 = time.perf_counter()
            self.exe[key] = fn.lower(*args).compile()
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

    def step(self, cache, tokens_N, positions_N):
        return self.exe["step",](self.dp, cache, tokens_N, positions_N)

    def copy(self, cache, src: int, dst: int):
        return self.exe["copy",](cache, np.int32(src), np.int32(dst))

    def sample(self, rows: int, mode: str, *args):
        """(tokens, counts): `jaxlm.serve.sampler.next_tokens` over `rows` rows."""
        return self.exe["sample", rows](*args, np.int32(sampler.MODES.index(mode)))

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


def _name(key) -> str:
    what, *rest = key
    if what in ("sample", "logprobs"):
        return f"{what}[rows={rest[0]}]"
    return f"{what}[{rest[0]}]" if rest else what
