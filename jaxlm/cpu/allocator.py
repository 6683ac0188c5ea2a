"""glibc's malloc told to keep freed memory: XLA:CPU's big per-call buffers then cost no page faults.

XLA on CPU allocates each call's temporaries afresh. By default glibc serves blocks over 32 MB with
mmap and unmaps them on free, so every call page-faults them back in: a large share of a small model's
train step, and of an eval forward at T = 1024, whose [B, H, T, T] scores and [B, T, V] logits are each
hundreds of MB. The price is a higher peak RSS (freed blocks stay with the process and fragment).
"""

from __future__ import annotations


def keep_freed_memory():
    """One arena, no mmap, no trimming: freed memory stays reusable (Linux glibc; a no-op elsewhere).

    For CPU programs only (one arena also serialises the host threads of TensorStore, the tokenizer and an
    accelerator's runtime): the commands call it before JAX starts, when the platform they will use is the CPU
    (`jaxlm.kernels.expected_platform`)."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
    mallopt(M_ARENA_MAX, 1)
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
