"""CPU cores as JAX devices: a small model trains data parallel across the cores of a CPU host.

XLA runs a small model's step on about one core at a time (its ops are too small to split), so two cores as
two devices train the default model faster (docs/design.md). JAX creates its CPU devices once, when it
starts, so the count is set before that (`jaxlm.train.runtime` decides when, from the platform the command
will use); GPU and TPU hosts keep their accelerators.
"""

from __future__ import annotations

import contextlib
import os

import jax


def user_set_cpu_devices() -> bool:
    """Whether the user chose a CPU device count (XLA_FLAGS or JAX_NUM_CPU_DEVICES): theirs stands."""
    return "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") or bool(
        os.environ.get("JAX_NUM_CPU_DEVICES")
    )


def cpu_cores_for(batch_size: int) -> int:
    """How many CPU devices a small model trains on: as many cores as divide the batch."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(d for d in range(1, cores + 1) if batch_size % d == 0)


def use_cpu_cores(n: int):
    """Expose `n` CPU devices, so the default mesh runs data parallel across the cores; only before JAX starts
    (after, JAX keeps what it has)."""
    with contextlib.suppress(RuntimeError):  # already initialised: keep what it has
        jax.config.update("jax_num_cpu_devices", n)
