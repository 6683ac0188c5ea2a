"""Training and eval batches, one small object per kind of data, so the loop never asks which kind it has.

`TextBatches`: windows of a token stream (jaxlm.data), no mask; one row length, one compiled step.
`SFTBatches`: whole prompt/completion examples padded to a length bucket (jaxlm.data.sft), with the loss mask;
each bucket is its own shape, so the loop compiles the train step once per bucket that holds train
examples, all ahead of time (a bucket drawn late would otherwise stall the run mid-way to compile).
Eval uses one fixed set of `eval_iters` batches; for SFT data they are padded to the one bucket that holds
every val example, and their loss is the masked mean over all their counted tokens.

Both are pure functions of (seed, step, rows): a resumed run draws exactly the batches the uninterrupted one
drew, and a process builds only its rows of the global batch (the batch axis shards as for text).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..data import sft
from ..data import tokens as data
from .step import Batch


def batches_for(ds, seed: int, shape: tuple[int, int], block_size: int, eval_iters: int, batch_sh, rows):
    """The batches object for `ds`: SFTBatches for prompt/completion data, else TextBatches."""
    kind = SFTBatches if isinstance(ds, sft.SFTData) else TextBatches
    return kind(ds, seed, shape, block_size, eval_iters, batch_sh, rows)


class TextBatches:
    def __init__(self, ds: data.TokenData, seed, shape, block_size, eval_iters, batch_sh, rows):
        self.ds, self.seed, self.shape, self.T, self.sh, self.rows = ds, seed, shape, block_size, batch_sh, rows
        self.lengths = (block_size,)  # the row lengths T a train batch can have
        val = [self._local("val", i, (1, shape[1]))[0] for i in range(eval_iters)]
        self.val = self._global(np.stack(val))

    def summary(self) -> str:
        return f"{len(self.ds.train):,} train tokens"

    def abstract(self, T: int) -> Batch:
        return Batch(jax.ShapeDtypeStruct((*self.shape, T + 1), jnp.int32, sharding=self.sh))

    def train(self, step: int) -> Batch:
        return self._global(self._local("train", step, self.shape))

    def _local(self, split, step, shape):
        return data.get_batch(self.ds, split, self.seed, step, shape, self.T, self.rows)

    def _global(self, tokens) -> Batch:
        return Batch(jax.make_array_from_process_local_data(self.sh, tokens, _global_shape(tokens, self.shape)))


class SFTBatches:
    def __init__(self, ds: sft.SFTData, seed, shape, block_size, eval_iters, batch_sh, rows):
        self.ds, self.seed, self.shape, self.T, self.sh, self.rows = ds, seed, shape, block_size, batch_sh, rows
        ladder = sft.bucket_lengths(block_size)
        self.lengths = tuple(T for T in ladder if _bucket_of(ds.train.lengths, ladder).get(T))
        T_val = max(_bucket_of(ds.val.lengths, ladder))  # every val example fits: one shape for the eval set
        val = [
            sft.get_batch(ds, "val", seed, i, (1, shape[1]), block_size, rows, buckets=[T_val])
            for i in range(eval_iters)
        ]
        self.val = self._global(np.concatenate([t for t, _ in val]), np.concatenate([m for _, m in val]))

    def summary(self) -> str:
        m = self.ds.meta
        return (
            f"{m['counts']['train']:,} train examples ({m['tokens']['train']:,} tokens) in row lengths "
            f"{', '.join(map(str, self.lengths))}"
        )

    def abstract(self, T: int) -> Batch:
        return Batch(
            jax.ShapeDtypeStruct((*self.shape, T + 1), jnp.int32, sharding=self.sh),
            jax.ShapeDtypeStruct((*self.shape, T), jnp.float32, sharding=self.sh),
        )

    def train(self, step: int) -> Batch:
        tokens, mask = sft.get_batch(self.ds, "train", self.seed, step, self.shape, self.T, self.rows)
        return self._global(tokens, mask)

    def _global(self, tokens, mask) -> Batch:
        put = jax.make_array_from_process_local_data
        return Batch(
            put(self.sh, tokens, _global_shape(tokens, self.shape)), put(self.sh, mask, _global_shape(mask, self.shape))
        )


def _global_shape(local: np.ndarray, shape: tuple[int, int]) -> tuple:
    """The global shape of a process's [A, b, ...] rows: b -> the global batch B."""
    return (local.shape[0], shape[1], *local.shape[2:])


def _bucket_of(lengths: np.ndarray, ladder: list[int]) -> dict[int, int]:
    """{bucket T: examples whose T + 1 tokens it is the smallest to hold}."""
    which = np.searchsorted(np.asarray(ladder) + 1, lengths)
    return {ladder[k]: int(n) for k, n in enumerate(np.bincount(which, minlength=len(ladder))[: len(ladder)]) if n}
