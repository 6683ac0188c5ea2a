"""`generate`: a batch of prompts -> new token ids. Prefill, then one jitted `lax.while_loop` decode.

Prompts are left-padded to a bucket of P slots (a power of two, at least 8), each row's positions
counting from 0 at its first real token (as HF does from the attention mask), so rows of different
lengths generate exactly what they would alone. The per-layer KV cache has P + N slots, N the new
tokens rounded up to a multiple of 64: within a bucket no prompt length, token or sampling value
recompiles; the executables are compiled ahead of time, which is how `stats.compile_s` is measured.

Output: one list per prompt of the new tokens only, ending at (and including) `eos_id` when the
row produced it. Prompt + new tokens must fit the model's block_size (no sliding window).

Two paths share the prompt handling and the loop: without a mesh, `jaxlm.decode`'s single-device
layout (fastest on one device); with a mesh (`Generator(params, config, mesh=...)`), `GPT.apply` with
its stacked KV cache over params left sharded as `jaxlm.sharding` places them, so a model too big
for one device generates tensor-parallel. Same tokens either way, up to float rounding.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import decode, sharding
from .config import GPTConfig
from .errors import JaxlmError
from .model import GPT, init_cache
from .sampling import Sampling, next_tokens, row_keys
from .tokenizer import GPT2_EOT_ID

MIN_PROMPT_BUCKET = 8
NEW_TOKENS_BUCKET = 64
_AUTO = "auto"


@dataclass
class GenerateStats:
    """Timings of one call: compile (0 when cached), prefill and the decode loop, in seconds."""

    batch: int = 0
    prompt_bucket: int = 0
    cache_slots: int = 0
    steps: int = 0  # decode steps run (every row advances one token per step)
    new_tokens: int = 0  # tokens returned, summed over rows (after each row's EOS: none)
    compile_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Tokens returned per second of the decode loop (compile and prefill excluded)."""
        return self.new_tokens / self.decode_s if self.decode_s else 0.0


def generate(
    params,
    config: GPTConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None | str = _AUTO,
    on_tokens: Callable | None = None,
    mesh: Mesh | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (a list of token-id lists, lengths may differ).

    temperature 0 is greedy; top_k / top_p filter as HF's warpers do; `seed` fixes the draws.
    `eos_id`: the token that ends a row; "auto" is <|endoftext|> (50256) when the vocabulary
    has it, None never stops early. An empty prompt is an error: start from [eos_id] instead.
    `on_tokens(tokens_B, step, done_B)` is called on the host as each step's tokens exist
    (streaming). To call repeatedly with the same weights, use `Generator`, which keeps them in
    decode layout. `mesh` (from `jaxlm.sharding.make_mesh`): generate sharded over it (see `Generator`).
    """
    return Generator(params, config, mesh=mesh)(
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_id=eos_id,
        on_tokens=on_tokens,
    )


class Generator:
    """`generate` over weights prepared once; `stats` describes the last call.

    Without a mesh the weights are copied once into `jaxlm.decode`'s single-device layout. With one,
    they stay where they are: params already on `mesh` keep their sharding, others are placed by
    `jaxlm.sharding.param_shardings` (device to device; never gathered), and prefill and decode run
    `GPT.apply` traced under the mesh, the KV cache split like the activations (batch over
    data/fsdp as far as the batch divides, heads over tensor).
    """

    def __init__(self, params, config: GPTConfig, mesh: Mesh | None = None):
        self.config = config
        self.mesh = mesh
        if mesh is None:
            self.dparams = decode.prepare(params, config)
            self._weights_key = None
        else:
            self.params = _place_on(mesh, params, sharding.param_shardings(config, mesh))
            self._weights_key = tuple(x.sharding for x in jax.tree.leaves(self.params))
        self.stats = GenerateStats()

    @property
    def _weights(self):
        return self.dparams if self.mesh is None else self.params

    def __call__(
        self,
        prompts,
        *,
        max_new_tokens: int = 100,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int = 0,
        eos_id: int | None | str = _AUTO,
        on_tokens: Callable | None = None,
    ) -> list[list[int]]:
        c = self.config
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        rows = _check_prompts(prompts, c)
        eos = _check_eos(eos_id, c)
        _check_lengths(rows, max_new_tokens, c)

        B, longest = len(rows), max(len(r) for r in rows)
        P = min(max(MIN_PROMPT_BUCKET, 1 << (longest - 1).bit_length()), c.block_size)
        N = -(-max_new_tokens // NEW_TOKENS_BUCKET) * NEW_TOKENS_BUCKET
        tokens_BxP = np.zeros((B, P), np.int32)
        lengths_B = np.array([len(r) for r in rows], np.int32)
        for b, r in enumerate(rows):
            tokens_BxP[b, P - len(r) :] = r
        pad_B = P - lengths_B
        positions_BxP = np.maximum(np.arange(P)[None] - pad_B[:, None], 0).astype(np.int32)
        valid_BxP = np.arange(P)[None] >= pad_B[:, None]

        greedy, k, use_top_p = sampling.statics(c.vocab_size)
        stats = GenerateStats(batch=B, prompt_bucket=P, cache_slots=P + N)
        path = _OneDevice(c) if self.mesh is None else _Sharded.for_batch(c, self.mesh, B)
        prompt_args = (self._weights, *path.rows(tokens_BxP, positions_BxP, valid_BxP))
        with path.tracing():
            pre = _compiled(("prefill", path, B, P, self._weights_key), jax.jit(path.prefill), prompt_args, stats)
        t0 = time.perf_counter()
        first = jax.block_until_ready(pre(*prompt_args))
        stats.prefill_s = time.perf_counter() - t0

        statics = dict(path=path, P=P, N=N, greedy=greedy, top_k=k, use_top_p=use_top_p, stream=on_tokens is not None)
        loop_args = (
            self._weights,
            first,
            *path.rows(lengths_B, row_keys(int(sampling.seed), B)),
            *path.scalars(
                np.float32(max(sampling.temperature, 1e-6)),
                np.float32(sampling.top_p),
                np.int32(-1 if eos is None else eos),
                np.int32(max_new_tokens),
            ),
        )
        key = ("decode", B, self._weights_key, *statics.items())
        with path.tracing():
            loop = _compiled(key, jax.jit(partial(_decode, **statics)), loop_args, stats)
        with _stream_to(on_tokens) as stream:
            t0 = time.perf_counter()
            out_BxN, steps = stream.run(loop, loop_args)
            stats.decode_s = time.perf_counter() - t0
        stats.steps = int(steps)
        result = [_until_eos(row[: stats.steps], eos) for row in np.asarray(out_BxN).tolist()]
        stats.new_tokens = sum(len(r) for r in result)
        self.stats = stats
        return result


def _decode(
    w, first, lengths_B, keys_B, temperature, top_p, eos, max_new, *, path, P, N, greedy, top_k, use_top_p, stream
):
    """Sample the first token from the prefill's logits, then one while_loop: step, sample, record.

    `path` (`_OneDevice` or `_Sharded`) supplies the model: its cache layout and one decode step.
    """
    logits_BxV, kv = first
    B = lengths_B.shape[0]
    S = P + N
    cache = path.grow(kv, S)
    valid_BxS = jnp.arange(S)[None] >= (P - lengths_B)[:, None]
    sample = partial(next_tokens, greedy=greedy, top_k=top_k, use_top_p=use_top_p)

    def record(i, tok_B, done_B, out_BxN):
        if stream:
            io_callback(_emit, None, *path.whole(tok_B, i, done_B), ordered=False)
        return jax.lax.dynamic_update_slice(out_BxN, tok_B[:, None], (jnp.zeros((), jnp.int32), i))

    tok_B = sample(logits_BxV, keys_B, 0, temperature, top_p)
    done_B = tok_B == eos
    out_BxN = record(jnp.int32(0), tok_B, done_B, jnp.full((B, N), jnp.maximum(eos, 0), jnp.int32))

    def body(carry):
        i, tok_B, done_B, cache, out_BxN = carry
        logits_BxV, cache = path.step(w, tok_B, lengths_B + i - 1, cache, P + i - 1, valid_BxS)
        new_B = sample(logits_BxV, keys_B, i, temperature, top_p)
        new_B = jnp.where(done_B, jnp.maximum(eos, 0), new_B)  # finished rows repeat EOS (dropped later)
        done_B = done_B | (new_B == eos)
        return i + 1, new_B, done_B, cache, record(i, new_B, done_B, out_BxN)

    def cond(carry):
        i, _, done_B, _, _ = carry
        return (i < max_new) & ~jnp.all(done_B)

    i, _, _, _, out_BxN = jax.lax.while_loop(cond, body, (jnp.int32(1), tok_B, done_B, cache, out_BxN))
    return out_BxN, i


@dataclass(frozen=True)
class _OneDevice:
    """`jaxlm.decode`'s layout on one device: per-layer (k, v) caches [B, H, S, K]."""

    c: GPTConfig

    def tracing(self):
        return contextlib.nullcontext()

    def rows(self, *arrays):
        return arrays

    def scalars(self, *values):
        return values

    def whole(self, *arrays):
        return arrays

    def prefill(self, dp, tokens_BxP, positions_BxP, valid_BxP):
        return decode.prefill(dp, tokens_BxP, positions_BxP, valid_BxP, c=self.c)

    def grow(self, kv, S):
        c = self.c
        B, _, P, _ = kv[0][0].shape
        return [
            tuple(jnp.zeros((B, c.n_head, S, c.head_dim), x.dtype).at[:, :, :P].set(x) for x in layer_kv)
            for layer_kv in kv
        ]

    def step(self, dp, tokens_B, positions_B, cache, slot, valid_BxS):
        return decode.step(dp, tokens_B, positions_B, cache, slot, valid_BxS, c=self.c)


@dataclass(frozen=True)
class _Sharded:
    """`GPT.apply` over sharded params, traced under the mesh; its stacked cache {"k", "v"}
    [L, B, S, H, K] split over `batch_axes` (the mesh axes that divide the batch) and tensor (heads)."""

    c: GPTConfig
    mesh: Mesh
    batch_axes: tuple[str, ...]

    @classmethod
    def for_batch(cls, c: GPTConfig, mesh: Mesh, B: int) -> _Sharded:
        """Split the batch over data and fsdp, or over the one of them (or none) that divides it."""
        for axes in (("data", "fsdp"), ("data",), ("fsdp",), ()):
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if B % math.prod(mesh.shape[a] for a in axes) == 0:
                return cls(c, mesh, axes)
        raise AssertionError("unreachable: the empty split divides every batch")

    def _sharding(self, *spec):
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def _batch(self):
        return self.batch_axes or None

    @contextlib.contextmanager
    def tracing(self):
        """The mesh and its logical-axis rules, with "batch" over the axes this batch divides."""
        rules = tuple(("batch", self._batch()) if name == "batch" else (name, v) for name, v in sharding.RULES)
        with sharding.activate(self.mesh), nn.logical_axis_rules(rules):
            yield

    def rows(self, *arrays):
        return tuple(jax.device_put(x, self._sharding(self._batch(), *[None] * (np.ndim(x) - 1))) for x in arrays)

    def scalars(self, *values):
        return tuple(jax.device_put(v, self._sharding()) for v in values)

    def whole(self, *arrays):
        """Replicated, e.g. for a host callback (which reads them from the first device)."""
        return tuple(jax.lax.with_sharding_constraint(x, self._sharding()) for x in arrays)

    def _cache(self, cache):
        s = self._sharding(None, self._batch(), None, "tensor", None)
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, s), cache)

    def _apply(self, params, tokens_BxT, positions_BxT, cache, index, valid_BxS):
        logits_BxTxV, cache = GPT(self.c).apply(
            {"params": params}, tokens_BxT, positions_BxT, cache=cache, cache_index=index, kv_mask_BxS=valid_BxS
        )
        # Whole rows of logits for sampling (a gather of B x V floats): the same draws as on one device.
        logits_BxV = jax.lax.with_sharding_constraint(logits_BxTxV[:, -1], self._sharding(self._batch(), None))
        return logits_BxV, self._cache(cache)

    def prefill(self, params, tokens_BxP, positions_BxP, valid_BxP):
        """All but the last prompt slot fill the cache (their logits are never computed); the last is
        a decode step, so only one position goes through the LM head."""
        B, P = tokens_BxP.shape
        cache = self._cache(init_cache(self.c, B, P))
        if P > 1:
            _, cache = self._apply(params, tokens_BxP[:, :-1], positions_BxP[:, :-1], cache, 0, valid_BxP)
        return self._apply(params, tokens_BxP[:, -1:], positions_BxP[:, -1:], cache, P - 1, valid_BxP)

    def grow(self, kv, S):
        P = kv["k"].shape[2]
        return self._cache(
            {name: jnp.zeros(x.shape[:2] + (S,) + x.shape[3:], x.dtype).at[:, :, :P].set(x) for name, x in kv.items()}
        )

    def step(self, params, tokens_B, positions_B, cache, slot, valid_BxS):
        return self._apply(params, tokens_B[:, None], positions_B[:, None], cache, slot, valid_BxS)


def _place_on(mesh: Mesh, params, shardings):
    """Params already on `mesh` as they are; others moved onto `shardings` (device to device)."""

    def place(x, s):
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        return jax.device_put(x, s)

    return jax.tree.map(place, params, shardings)


# Executables by (what, shapes, statics), compiled ahead of time so compile time is measurable.
_EXECUTABLES: dict = {}


def _compiled(key, jitted, args, stats: GenerateStats):
    exe = _EXECUTABLES.get(key)
    if exe is None:
        t0 = time.perf_counter()
        exe = jitted.lower(*args).compile()
        stats.compile_s += time.perf_counter() - t0
        _EXECUTABLES[key] = exe
    return exe


class _Stop(Exception):
    pass


class _QuietStop(logging.Filter):
    """jax logs a callback's exception with its traceback; a Ctrl-C stop is not an error."""

    def filter(self, record):
        return not (record.exc_info and isinstance(record.exc_info[1], _Stop))


logging.getLogger("jax._src.callback").addFilter(_QuietStop())


class _stream_to:
    """Routes the compiled loop's host callback to this call's `on_tokens` (the executable is shared,
    so the sink is global, and calls take turns)."""

    _lock = threading.Lock()
    current = None

    def __init__(self, sink):
        self.sink, self.stop = sink, False

    def __enter__(self):
        self._lock.acquire()
        _stream_to.current = self
        return self

    def __exit__(self, *exc):
        _stream_to.current = None
        self._lock.release()

    def run(self, executable, args):
        """executable(*args), ready. It runs on a worker thread: a loop with host callbacks blocks
        its caller in C++, where Ctrl-C would wait for the end; here it stops at the next step."""
        box, finished = {}, threading.Event()

        def work():
            try:
                box["out"] = jax.block_until_ready(executable(*args))
            except BaseException as e:  # handed to the caller
                box["err"] = e
            finished.set()

        threading.Thread(target=work, daemon=True).start()
        try:
            while not finished.wait(0.1):
                pass
        except KeyboardInterrupt:
            self.stop = True  # the next callback raises, which ends the loop
            finished.wait()
            raise
        if "err" in box:
            raise box["err"]
        return box["out"]


def _emit(tok_B, i, done_B):
    stream = _stream_to.current
    if stream is not None and stream.stop:
        raise _Stop("interrupted")
    if stream is not None and stream.sink is not None:
        stream.sink(np.asarray(tok_B), int(i), np.asarray(done_B))


def _until_eos(row: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in row:
        return row[: row.index(eos) + 1]
    return row


def _check_prompts(prompts, c: GPTConfig) -> list[list[int]]:
    if isinstance(prompts, str):
        raise JaxlmError("prompts must be token ids (a list of lists of ints), not text; encode it first")
    try:
        rows = [np.asarray(p) for p in prompts]
    except TypeError:
        raise JaxlmError("prompts must be a list of token-id lists, e.g. [[50256], [15496, 11]]") from None
    if not rows:
        raise JaxlmError("no prompts: pass a list of token-id lists, e.g. [[50256]]")
    out = []
    for i, r in enumerate(rows):
        if r.ndim != 1:
            raise JaxlmError(f"prompt {i} is not a flat list of token ids (shape {r.shape}); pass a list of prompts")
        if r.size == 0:
            raise JaxlmError(
                f"prompt {i} is empty; to generate without a prompt, start from <|endoftext|> (id {GPT2_EOT_ID}) "
                "or another token"
            )
        if not np.issubdtype(r.dtype, np.integer):
            raise JaxlmError(f"prompt {i} must hold integer token ids, got dtype {r.dtype}")
        if r.min() < 0 or r.max() >= c.vocab_size:
            raise JaxlmError(
                f"prompt {i} has token ids outside [0, {c.vocab_size}) (min {r.min()}, max {r.max()}); "
                "the tokenizer does not match the model"
            )
        out.append([int(t) for t in r])
    return out


def _check_eos(eos_id, c: GPTConfig) -> int | None:
    if eos_id == _AUTO:
        return GPT2_EOT_ID if c.vocab_size > GPT2_EOT_ID else None
    if eos_id is None:
        return None
    if isinstance(eos_id, bool) or not isinstance(eos_id, int | np.integer) or not 0 <= eos_id < c.vocab_size:
        raise JaxlmError(f"eos_id must be a token id in [0, {c.vocab_size}), None or 'auto', got {eos_id!r}")
    return int(eos_id)


def _check_lengths(rows: list[list[int]], max_new_tokens, c: GPTConfig):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise JaxlmError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    longest = max(len(r) for r in rows)
    if longest > c.block_size:
        raise JaxlmError(
            f"a prompt of {longest} tokens is longer than the model's block_size ({c.block_size}); shorten it"
        )
    if longest + max_new_tokens > c.block_size:
        raise JaxlmError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's block_size "
            f"({c.block_size}); lower max_new_tokens to at most {c.block_size - longest} or shorten the prompt"
        )
