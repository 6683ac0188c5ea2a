"""`generate`: a batch of prompts -> new token ids, with transformers' `generate` options.

Greedy, sampling (temperature, top-k, top-p) and beam search (`num_beams`, `length_penalty`,
`early_stopping`, `num_return_sequences`), with `repetition_penalty`, `no_repeat_ngram_size` and
`min_new_tokens`; `jaxlm.generation.options` maps each to HF's meaning and validates it. Prefill, then one
jitted `lax.while_loop` (`jaxlm.generation.loops`).

Prompts are left-padded to a bucket of P slots (a power of two, at least 8), each row's positions
counting from 0 at its first real token (as HF does from the attention mask), so rows of different
lengths generate exactly what they would alone. The per-layer KV cache has P + N slots, N the new
tokens rounded up to a multiple of 64: within a bucket no prompt length, token, sampling or penalty
value recompiles; the executables are compiled ahead of time, which is how `stats.compile_s` is measured.

Output: one list per returned sequence (prompt-major: `num_return_sequences` per prompt) of the new
tokens only, ending at (and including) `eos_id` when it produced it. Prompt + new tokens must fit
the model's block_size (no sliding window).

Two paths share the prompt handling and the loops (`jaxlm.generation.placement`): without a mesh,
`jaxlm.generation.decode`'s single-device layout (fastest on one device); with a mesh
(`Generator(params, config, mesh=...)`), `GPT.apply` with its stacked KV cache over params left
sharded as `jaxlm.parallel.sharding` places them, so a model too big for one device generates tensor-parallel.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import numpy as np
from jax.sharding import Mesh

from ..config import GPTConfig, check_dtype
from ..errors import JaxlmError
from ..kernels import Kernels, placed_on, resolve
from ..parallel.sharding import param_shardings
from ..tokenizer import GPT2_EOT_ID
from . import decode
from . import options as gen_options
from .loops import beam_loop, sample_loop
from .placement import OneDevice, Sharded, place_on
from .sampling import row_keys
from .streaming import stream_to

MIN_PROMPT_BUCKET = 8
NEW_TOKENS_BUCKET = 64
_AUTO = "auto"


@dataclass
class GenerateStats:
    """Timings of one call: compile (0 when cached), prefill and the decode loop, in seconds."""

    batch: int = 0  # rows decoded: prompts x num_return_sequences (sampling) or x num_beams (beam search)
    prompt_bucket: int = 0
    cache_slots: int = 0
    steps: int = 0  # decode steps run (every row advances one token per step)
    new_tokens: int = 0  # tokens returned, summed over sequences (after each one's EOS: none)
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
    mesh: Mesh | None = None,
    attention: str = "auto",
    **options,
):
    """New token ids for each prompt (a list of token-id lists, lengths may differ); see `Generator.__call__`.

    To call repeatedly with the same weights, use `Generator`, which keeps them in decode layout.
    `mesh` (from `jaxlm.parallel.sharding.make_mesh`): generate sharded over it; `attention`: the prompt's
    attention kernel (see `Generator`).
    """
    return Generator(params, config, mesh=mesh, attention=attention)(prompts, **options)


class Generator:
    """`generate` over weights prepared once; `stats` describes the last call, `scores` its beam scores.

    `dtype`: "float32" or "bfloat16", the weights' and KV cache's dtype while decoding (softmax,
    log-probs and beam scores stay float32). Without a mesh the weights are copied once into
    `jaxlm.generation.decode`'s single-device layout. With one, they stay where they are: params already on
    `mesh` keep their sharding, others are placed by `jaxlm.parallel.sharding.param_shardings` (device to
    device; never gathered), and prefill and decode run `GPT.apply` traced under the mesh, the KV
    cache split like the activations (batch over data/fsdp as far as the batch divides, heads over tensor).

    `attention`: the prefill's attention, auto | reference | xla | cudnn | splash (decode steps always take the
    reference form); `kernels`: a resolved `jaxlm.kernels` record instead (e.g. one for another platform).
    Either way `kernels` holds the record in use: it also picks a step's products.
    """

    def __init__(
        self,
        params,
        config: GPTConfig,
        mesh: Mesh | None = None,
        dtype: str | None = None,
        attention: str = "auto",
        kernels: Kernels | None = None,
    ):
        if dtype is not None:
            check_dtype(dtype)
            config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
            if mesh is not None and dtype != "float32":
                params = jax.tree.map(lambda x: x.astype(dtype), params)
        self.config = config
        self.mesh = mesh
        where = mesh if mesh is not None else placed_on(params)
        # decode products are the one-device layout's (with a mesh, GPT.decode's Dense layers run)
        self.kernels = kernels or resolve(where, dtype=config.dtype, attention=attention, decode=mesh is None)
        if mesh is None:
            dparams = decode.prepare(params, config, self.kernels)  # on the default device
            # Committed there: every call computes on that device, whatever the default device is by then.
            self.dparams = jax.device_put(dparams, next(iter(jax.tree.leaves(dparams)[0].devices())))
        else:
            self.params = place_on(mesh, params, param_shardings(config, mesh))
        # Where the weights live (their devices) is part of every executable's key: two Generators on two
        # devices compile their own.
        self._weights_key = tuple((x.sharding, x.dtype) for x in jax.tree.leaves(self._weights))
        self.stats = GenerateStats()
        self.scores: list[float] | None = None

    @property
    def _weights(self):
        return self.dparams if self.mesh is None else self.params

    def __call__(
        self,
        prompts,
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        min_new_tokens: int = 0,
        do_sample: bool | None = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int = 0,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        eos_id: int | None | str = _AUTO,
        on_tokens: Callable | None = None,
    ) -> list[list[int]]:
        """New token ids, `num_return_sequences` lists per prompt, best beam first.

        The options are transformers' (`jaxlm.generation.options` for the mapping): `max_length` counts the
        prompt, `max_new_tokens` does not (neither: 100, or what block_size leaves). As in transformers for
        GPT-2, decoding is greedy (or beam search with `num_beams` > 1) unless `do_sample=True`, whatever the
        temperature; with `do_sample=True`, temperature, then top_k / top_p filter as HF's warpers do and
        `seed` fixes the draws. `do_sample=None` is jaxlm's command-line rule: sample unless temperature is
        0 (what `python sample.py` does by default). `eos_id`: the token that ends a row; "auto"
        is <|endoftext|> (50256) when the vocabulary has it, None never stops early. An empty prompt
        is an error: start from [eos_id] instead. `on_tokens(tokens_B, step, done_B)` is called on the
        host as each step's tokens exist (streaming; not with beams, which reorder as they go).
        """
        c = self.config
        rows = _check_prompts(prompts, c)
        eos = _check_eos(eos_id, c)
        o = gen_options.resolve(
            c, max(len(r) for r in rows), max_new_tokens=max_new_tokens, max_length=max_length,
            min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, num_beams=num_beams, num_return_sequences=num_return_sequences, length_penalty=length_penalty,
            early_stopping=early_stopping, repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )  # fmt: skip
        if o.mode == "beam" and on_tokens is not None:
            raise JaxlmError("on_tokens (streaming) does not work with beam search: beams reorder as they go")
        if o.mode != "beam":  # each returned sequence is a row of its own (own key: own draws)
            rows = [r for r in rows for _ in range(o.num_return_sequences)]

        B, longest = len(rows), max(len(r) for r in rows)
        P = min(max(MIN_PROMPT_BUCKET, 1 << (longest - 1).bit_length()), c.block_size)
        N = -(-o.max_new_tokens // NEW_TOKENS_BUCKET) * NEW_TOKENS_BUCKET
        fill = 0 if eos is None else eos
        hist_BxS = np.full((B, P + N), fill, np.int32)
        lengths_B = np.array([len(r) for r in rows], np.int32)
        for b, r in enumerate(rows):
            hist_BxS[b, P - len(r) : P] = r
        pad_B = P - lengths_B
        positions_BxP = np.maximum(np.arange(P)[None] - pad_B[:, None], 0).astype(np.int32)
        valid_BxP = np.arange(P)[None] >= pad_B[:, None]

        F = B * o.num_beams if o.mode == "beam" else B
        stats = GenerateStats(batch=F, prompt_bucket=P, cache_slots=P + N)
        path = OneDevice(c, self.kernels) if self.mesh is None else Sharded.for_batch(c, self.mesh, B, self.kernels)
        prompt_args = (self._weights, *path.rows(hist_BxS[:, :P], positions_BxP, valid_BxP))
        with path.tracing():
            pre = _compiled(("prefill", path, B, P, self._weights_key), jax.jit(path.prefill), prompt_args, stats)
        t0 = time.perf_counter()
        first = jax.block_until_ready(pre(*prompt_args))
        stats.prefill_s = time.perf_counter() - t0

        common = dict(path=path, P=P, use_penalty=o.repetition_penalty != 1.0, ngram=o.no_repeat_ngram_size)
        values = (np.int32(-1 if eos is None else eos), np.int32(o.max_new_tokens), np.float32(o.repetition_penalty))
        values += (np.int32(o.min_new_tokens),)
        if o.mode == "beam":
            statics = dict(common, K=o.num_beams, early_stopping=o.early_stopping)
            loop_fn = beam_loop
            args = (*path.rows(lengths_B, hist_BxS), *path.scalars(*values, np.float32(o.length_penalty)))
        else:
            greedy, k, use_top_p = o.sampling.statics(c.vocab_size)
            greedy = greedy or o.mode == "greedy"
            statics = dict(common, greedy=greedy, top_k=k, use_top_p=use_top_p, stream=on_tokens is not None)
            loop_fn = sample_loop
            eos_v, max_new_v, *rest = values
            args = (
                *path.rows(lengths_B, hist_BxS, row_keys(int(o.sampling.seed), B)),
                *path.scalars(
                    np.float32(max(o.sampling.temperature, 1e-6)), np.float32(o.sampling.top_p), eos_v, max_new_v, *rest
                ),
            )
        loop_args = (self._weights, first, *args)
        key = (loop_fn.__name__, B, self._weights_key, *statics.items())
        with path.tracing():
            loop = _compiled(key, jax.jit(partial(loop_fn, **statics)), loop_args, stats)
        with stream_to(on_tokens) as stream:
            t0 = time.perf_counter()
            out = stream.run(loop, loop_args)
            stats.decode_s = time.perf_counter() - t0
        stats.steps = int(out[-1])
        cut = partial(_new_only, P=P, n=min(stats.steps, o.max_new_tokens), eos=eos)
        if o.mode == "beam":
            hyps_BxKxS, scores_BxK = np.asarray(out[0]), np.asarray(out[1])
            R = o.num_return_sequences
            result = [cut(h) for h in hyps_BxKxS[:, :R].reshape(B * R, -1)]
            self.scores = scores_BxK[:, :R].reshape(-1).tolist()
        else:
            result = [cut(h) for h in np.asarray(out[0])]
            self.scores = None
        stats.new_tokens = sum(len(r) for r in result)
        self.stats = stats
        return result


def _new_only(hist_S, *, P, n, eos):
    return _until_eos(hist_S[P : P + n].tolist(), eos)


# Executables by (what, shapes, statics, the weights' shardings), compiled ahead of time so compile time is
# measured on its own; the least recently used go first beyond MAX_EXECUTABLES (a server sees many shapes).
MAX_EXECUTABLES = 64
EXECUTABLES: OrderedDict = OrderedDict()
_EXECUTABLES_LOCK = threading.Lock()


def _compiled(key, jitted, args, stats: GenerateStats):
    with _EXECUTABLES_LOCK:
        exe = EXECUTABLES.get(key)
        if exe is not None:
            EXECUTABLES.move_to_end(key)
            return exe
    t0 = time.perf_counter()
    exe = jitted.lower(*args).compile()
    stats.compile_s += time.perf_counter() - t0
    with _EXECUTABLES_LOCK:
        EXECUTABLES[key] = exe
        while len(EXECUTABLES) > MAX_EXECUTABLES:
            EXECUTABLES.popitem(last=False)
    return exe


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
