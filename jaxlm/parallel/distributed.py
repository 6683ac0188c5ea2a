"""Multi-process (multi-host) setup: join the job, and fail fast when a peer dies.

One process per host (TPU pod worker, GPU node) or per simulated host on a CPU. Every process
runs the same program; arrays are global, each process feeding its local devices.
"""

from __future__ import annotations

import contextlib
import os
import sys

import jax

from ..errors import JaxlmError


def _launched_by_cluster() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
) -> None:
    """Join a multi-process job: explicitly (all three arguments), or as a cluster launcher says.

    A single process with no arguments and no cluster environment does nothing.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise JaxlmError("multi-process runs need --coordinator-address, --num-processes and --process-id together")
        if not 0 <= process_id < num_processes:
            raise JaxlmError(f"--process-id {process_id} must be in [0, {num_processes})")
        if num_processes == 1:
            return
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
        )
    elif _launched_by_cluster():
        jax.distributed.initialize(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)


def is_main_process() -> bool:
    return jax.process_index() == 0


# What a failed collective or the coordination service says when a peer is gone (Gloo between CPUs, NCCL
# between GPUs, the service's heartbeat and RPCs). Told by the text, not the type: a device out of memory or
# a bad program is a JaxRuntimeError too, and Orbax's barriers (a save) raise Gloo's failure as a ValueError.
_PEER_LOSS = (
    "Gloo",
    "Connection closed by peer",
    "Connection reset by peer",
    "heartbeat timeout",
    "remote process exited",
    "UNAVAILABLE:",
    "Socket closed",
)
# How XLA reports a device allocation (or, on a TPU, a compiled program) that does not fit: "RESOURCE_EXHAUSTED:
# Out of memory while trying to allocate N bytes" (GPU), "... Ran out of memory in memory space hbm" (TPU).
_OUT_OF_MEMORY = "RESOURCE_EXHAUSTED"


def is_out_of_memory(e: BaseException) -> bool:
    """XLA ran out of device memory (in any process: each reports its own)."""
    return _OUT_OF_MEMORY in str(e)


def is_peer_loss(e: BaseException) -> bool:
    """A collective failed because another process of the job is gone."""
    return not is_out_of_memory(e) and any(m in str(e) for m in _PEER_LOSS)


@contextlib.contextmanager
def fail_fast_on_peer_loss():
    """When a collective fails because another process died, say so and exit at once.

    Without this the survivor would sit in the coordination service's shutdown barrier until the
    heartbeat timeout and then abort with a C++ stack trace.
    """
    try:
        yield
    except (jax.errors.JaxRuntimeError, ValueError, RuntimeError) as e:
        if jax.process_count() == 1 or not is_peer_loss(e):
            raise
        first = str(e).splitlines()[0][:300]
        print(
            f"error: process {jax.process_index()}: a collective failed, most likely because another "
            f"process of this job died ({first}); see that process's log. Exiting.",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(3)
