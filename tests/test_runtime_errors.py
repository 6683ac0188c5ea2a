"""XLA's errors told apart by their text: a lost peer, a device out of memory, anything else. A real
RESOURCE_EXHAUSTED from train.py (an address-space limit makes XLA's allocation fail on the CPU) is one line
naming the batch size and the flags that lower memory. tests/test_multiprocess.py does it in two processes."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import ROOT, cpu_devices

from jaxlm.parallel.distributed import is_out_of_memory, is_peer_loss

# Texts XLA, NCCL, Gloo and the coordination service print (quoted from their sources and users' reports).
PEER_LOSS = [
    "UNKNOWN: Gloo AllGather failed: [gloo/transport/tcp/pair.cc:547] Connection closed by peer [127.0.0.1]:5000",
    "INTERNAL: NCCL operation ncclAllReduce(...) failed: remote process exited or there was a network error",
    "UNAVAILABLE: Task /job:jax_worker/replica:0/task:1 heartbeat timeout. This indicates that the remote task "
    "has failed, got preempted, or crashed unexpectedly.",
    "UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted "
    'unexpectedly or this task is experiencing network issues. {grpc_message:"Socket closed", grpc_status:14}',
]
OUT_OF_MEMORY = [
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 7406166528 bytes.\nBufferAssignment OOM Debugging.",
    "RESOURCE_EXHAUSTED: Failed to allocate request for 2.99GiB (3206250496B) on device ordinal 0",
    "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 20.5G of "
    "15.48G hbm. Exceeded hbm capacity by 5.0G.",
    "RESOURCE_EXHAUSTED: Out of memory allocating 15233712128 bytes.",  # XLA:CPU, as train.py below gets it
]


def test_texts_are_classified():
    for text in PEER_LOSS:
        assert is_peer_loss(ValueError(text)) and not is_out_of_memory(ValueError(text)), text
    for text in OUT_OF_MEMORY:
        assert is_out_of_memory(RuntimeError(text)) and not is_peer_loss(RuntimeError(text)), text
    assert not is_peer_loss(ValueError("--batch-size must be >= 1"))
    # A real XLA runtime error that is neither (every JaxRuntimeError used to count as a lost peer).
    with pytest.raises(jax.errors.JaxRuntimeError) as e, jax.transfer_guard("disallow"):
        jax.jit(lambda x: x + 1)(np.ones(3))  # an implicit transfer, refused
    assert not is_peer_loss(e.value) and not is_out_of_memory(e.value)


# train.py under 10 GiB of address space (set in the child itself: no fork hook in this threaded process);
# one device's activations for the batch below need ~60 GB.
LIMITED = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_AS, (10 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_batch_too_big_for_memory_is_one_line(tmp_path):
    flags = (
        "--n-layer 1 --n-head 2 --n-embd 32 --block-size 32 --batch-size 2097152 --max-iters 1 --eval-iters 1 "
        "--tensorboard false"
    ).split()
    env = {**os.environ, **cpu_devices(1), "JAXLM_CACHE": str(tmp_path)}
    env["MALLOC_ARENA_MAX"] = "2"  # glibc's per-thread arenas would reserve address space by the core count
    r = subprocess.run(
        [sys.executable, "-c", LIMITED, str(ROOT / "train.py"), *flags, f"--out-dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert errors[0].startswith(
        "error: out of device memory at --batch-size 2097152 (1 micro-batch(es) of 2097152 x 32"
    )
    assert "XLA: Out of memory allocating" in errors[0]
    assert "--gradient-accumulation-steps" in errors[0] and "--remat true" in errors[0]
