"""Training and eval batches, one small object per kind of data, so the loop never asks which kind it has.

`TextBatches`: windows of a token stream (jaxlm.data), no mask; one row length, one compiled step.
`SFTBatches`: whole prompt/completion examples padded to a length bucket (jaxlm.data.sft), with the loss mask;
each bucket is its own shape, so the loop compiles the train step once per bucket that holds train
examples, all ahead of time (a bucket drawn late would otherwise stall the run mid-way to compile).
Eval uses one fixed set of `eval_iters` batches; for SFT data they are padded to the one bucket that holds
every val example, and their loss is the masked mean over all their counted tokens.

Both are pure functions of (seed, step, rows): a resumed run draws exactly the batches the uninterrupted one
drew, and each process builds only the rows its devices hold (`jax.make_array_from_callback`, asked per
device: a mesh may give a process rows that are not contiguous, e.g. a TPU pod's device order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..data import sft
from ..data import tokens as data
from .step import Batch


def batches_for(ds, seed: int, shape: tuple[int, int], block_size: int, eval_iters: int, batch_sh):
    """The batches object for `ds`: SFTBatches for prompt/completion data, else TextBatches."""
    kind = SFTBatches if isinstance(ds, sft.SFTData) else TextBatches
    return kind(ds, seed, shape, block_size, eval_iters, batch_sh)


class TextBatches:
    def __init__(self, ds: data.TokenData, seed, shape, block_size, eval_iters, batch_sh):
        self.ds, self.seed, self.shape, self.T, self.sh = ds, seed, shape, block_size, batch_sh
        self.lengths = (block_size,)  # the row lengths T a train batch can have

        def val(rows):
            return np.stack([self._rows("val", i, (1, shape[1]), rows)[0] for i in range(eval_iters)])

        self.val = Batch(assemble(batch_sh, (eval_iters, shape[1], block_size + 1), val))

    def summary(self) -> str:
        return f"{len(self.ds.train):,} train tokens"

    def abstract(self, T: int) -> Batch:
        return Batch(jax.ShapeDtypeStruct((*self.shape, T + 1), jnp.int32, sharding=self.sh))

    def train(self, step: int) -> Batch:
        return Batch(
            assemble(self.sh, (*self.shape, self.T + 1), lambda rows: self._rows("train", step, self.shape, rows))
        )

    def _rows(self, split, step, shape, rows):
        return data.get_batch(self.ds, split, self.seed, step, shape, self.T, rows)


class SFTBatches:
    def __init__(self, ds: sft.SFTData, seed, shape, block_size, eval_iters, batch_sh):
        self.ds, self.seed, self.shape, self.T, self.sh = ds, seed, shape, block_size, batch_sh
        ladder = sft.bucket_lengths(block_size)
        self.lengths = tuple(T for T in ladder if _bucket_of(ds.train.lengths, ladder).get(T))
        T_val = max(_bucket_of(ds.val.lengths, ladder))  # every val example fits: one shape for the eval set

        def val(rows):
            parts = [
                sft.get_batch(ds, "val", seed, i, (1, shape[1]), block_size, rows, buckets=[T_val])
                for i in range(eval_iters)
            ]
            return np.concatenate([t for t, _ in parts]), np.concatenate([m for _, m in parts])

        self.val = self._global(val, (eval_iters, shape[1]), T_val)

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
        def rows_of(rows):
            return sft.get_batch(self.ds, "train", self.seed, step, self.shape, self.T, rows)

        T = rows_of(slice(0, 0))[1].shape[-1]  # the step's bucket, the same for every row: read off no rows
        return self._global(rows_of, self.shape, T)

    def _global(self, rows_of, shape: tuple[int, int], T: int) -> Batch:
        """(tokens, mask) of `shape` rows of length T, each device's rows built once by `rows_of(rows)`."""
        rows_of = _once_per_rows(rows_of)
        tokens = assemble(self.sh, (*shape, T + 1), lambda rows: rows_of(rows)[0])
        return Batch(tokens, assemble(self.sh, (*shape, T), lambda rows: rows_of(rows)[1]))


def assemble(sharding, shape: tuple, rows_of) -> jax.Array:
    """The global [A, B, ...] array on `sharding` whose rows (axis 1, the only one split) come from
    `rows_of(rows)`, a slice of B; called once per distinct slice this process's devices hold."""
    rows_of = _once_per_rows(rows_of)
    return jax.make_array_from_callback(shape, sharding, lambda index: rows_of(index[1])[index[0]])


def _once_per_rows(rows_of):
    """`rows_of` remembered by its slice: devices holding the same rows (a tensor axis) share one build."""
    built = {}

    def cached(rows: slice):
        key = rows.indices(1 << 62)
        if key not in built:
            built[key] = rows_of(rows)
        return built[key]

    return cached


def _bucket_of(lengths: np.ndarray, ladder: list[int]) -> dict[int, int]:
    """{bucket T: examples whose T + 1 tokens it is the smallest to hold}."""
    which = np.searchsorted(np.asarray(ladder) + 1, lengths)
    return {ladder[k]: int(n) for k, n in enumerate(np.bincount(which, minlength=len(ladder))[: len(ladder)]) if n}
