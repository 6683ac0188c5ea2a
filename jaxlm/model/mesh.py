"""The mesh the model is being traced for: what its activation constraints and sharded kernels run over.

`jaxlm.parallel.sharding.activate(mesh)` sets it, with the logical-axis rules, around tracing. It is passed
to flax explicitly because neither global mesh works: flax 0.12's `with_logical_constraint` constrains only
when handed a mesh or when `jax.sharding.get_abstract_mesh()` is set; the legacy `with mesh:` does not set
the abstract mesh (so every constraint was silently dropped, and fsdp=4 at GPT-2 124M kept whole batches on
each chip), and `jax.set_mesh` breaks flax's scanned DenseGeneral params.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

from jax.sharding import Mesh

_MESH: ContextVar[Mesh | None] = ContextVar("jaxlm_tracing_mesh", default=None)


def tracing_mesh() -> Mesh | None:
    """The mesh set by the innermost `tracing_over` (None: no mesh, nothing is constrained)."""
    return _MESH.get()


@contextlib.contextmanager
def tracing_over(mesh: Mesh | None):
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)
