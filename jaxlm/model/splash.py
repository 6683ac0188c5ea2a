"""Pallas splash attention (a TPU kernel) over whole causal sequences, in jaxlm's [B, H, T, K] layout.

`jaxlm.kernels` picks it on TPUs: it never forms the [B, H, T, T] scores (nor keeps them for the backward
pass) and skips the blocks above the diagonal. With a tracing mesh (`jaxlm.model.mesh`) it runs inside
`jax.shard_map`, the batch split as the "batch" rule says and the heads as "heads", each device running the
kernel on its own rows and heads (XLA cannot partition a Pallas call). Left padding (a prefill) goes in as
segment ids: padding is segment 0 and text segment 1, so text sees only text and no row is empty. Off a TPU
it runs in interpret mode (XLA loops on a CPU: slow, for the tests that hold it to the reference form).
`fits` says when it cannot run a call, which then takes the reference form: keys other than the queries
(a KV cache), sequences not in whole blocks of 128 tokens, or a batch or head count the mesh does not divide
(model init traces one row of 8 tokens).
"""

from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

BLOCKS = (512, 256, 128)  # tile sizes tried, largest first: a tile must divide T and be a multiple of 128


def block_for(T: int) -> int | None:
    """The splash tile for T tokens (query, key and backward blocks alike), None when none divides T."""
    return next((b for b in BLOCKS if T % b == 0), None)


def _split(mesh: Mesh) -> tuple:
    """(mesh axes of the batch, of the heads, with their sizes) for [B, H, T, K] under the active rules."""
    batch, heads = tuple(nn.logical_to_mesh_axes(("batch", "heads")))

    def size(axes):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        return math.prod(mesh.shape[a] for a in axes)

    return batch, heads, size(batch), size(heads)


def fits(q_BxHxTxK, k_BxHxSxK, mesh: Mesh | None) -> bool:
    B, H, T, _ = q_BxHxTxK.shape
    if k_BxHxSxK.shape[2] != T or block_for(T) is None:
        return False
    if mesh is None:
        return True
    _, _, n_batch, n_heads = _split(mesh)
    return B % n_batch == 0 and H % n_heads == 0


def attend(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK, valid_BxT=None, *, mesh: Mesh | None):
    """softmax(q k^T / sqrt(K)) v, causal (and only valid keys where `valid_BxT` is given); `fits` holds."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas: imported when used

    T, K = q_BxHxTxK.shape[2], q_BxHxTxK.shape[3]
    b = block_for(T)
    sizes = sa.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip

    def run(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK, *segments_BxT, interpret: bool):  # one device's rows and heads
        heads = q_BxHxTxK.shape[1]
        mask = sa.MultiHeadMask([sa.CausalMask((T, T)) for _ in range(heads)])
        kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        q_BxHxTxK = q_BxHxTxK * jnp.asarray(1.0 / math.sqrt(K), q_BxHxTxK.dtype)  # the kernel does not scale
        if not segments_BxT:
            return jax.vmap(kernel)(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK)

        def one(q, k, v, s):
            return kernel(q, k, v, segment_ids=sa.SegmentIds(q=s, kv=s))

        return jax.vmap(one)(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK, segments_BxT[0])

    def local(*args):
        # Compiled for a TPU, interpreted elsewhere: chosen as the program is lowered for its platform.
        return jax.lax.platform_dependent(
            *args, tpu=partial(run, interpret=False), default=partial(run, interpret=True)
        )

    args = (q_BxHxTxK, k_BxHxTxK, v_BxHxTxK) + (() if valid_BxT is None else (valid_BxT.astype(jnp.int32),))
    if mesh is None:
        return local(*args)
    batch, heads, _, _ = _split(mesh)
    spec = PartitionSpec(batch, heads, None, None)
    specs = (spec,) * 3 + (() if valid_BxT is None else (PartitionSpec(batch, None),))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)(*args)
