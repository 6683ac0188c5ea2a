"""Run by tests/test_multiprocess.py in each of 2 processes with 4 simulated CPU devices each:

    python tests/permuted_processes.py OUT COORDINATOR PROCESS_ID

Trains the same tiny model on data=4,fsdp=2 over the natural device order and over one that interleaves the
processes (each then holds every other block of batch rows: not one contiguous slice), then starts a run whose
batch does not fit in memory (an address-space limit stands in for a small device), inside
`fail_fast_on_peer_loss` as train.py runs it. Prints "RESULT {json}" (process 0) and "OOM <error>".
"""

import json
import resource
import sys
from pathlib import Path

import jax

import jaxlm.train as trainer
from jaxlm.config import TrainConfig
from jaxlm.errors import JaxlmError
from jaxlm.parallel import distributed, sharding
from jaxlm.train.step import batch_sharding

TINY = dict(
    n_layer=2, n_head=4, n_embd=64, block_size=32, batch_size=8, max_iters=4, warmup_iters=2, lr_decay_iters=4,
    learning_rate=1e-3, log_interval=1, eval_interval=4, eval_iters=1, tensorboard=False, dataset="shakespeare_char",
    mesh="data=4,fsdp=2",
)  # fmt: skip


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in trainer.read_metrics(out / "metrics.jsonl") if "loss" in r]


def main():
    out, coordinator, pid = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    distributed.initialize(coordinator, 2, pid)
    quiet = dict(log=lambda *a, **k: None)
    trainer.train(TrainConfig(**TINY, out_dir=str(out / "natural")), **quiet)
    devices = jax.devices()  # process 0's four, then process 1's
    interleaved = sharding.make_mesh(TINY["mesh"], devices=[devices[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)])
    trainer.train(TrainConfig(**TINY, out_dir=str(out / "interleaved")), mesh=interleaved, **quiet)
    held = batch_sharding(interleaved).addressable_devices_indices_map((1, TINY["batch_size"], 33)).values()
    if pid == 0:
        report = {
            "natural": losses(out / "natural"),
            "interleaved": losses(out / "interleaved"),
            "rows": sorted(i[1].start for i in held),
        }
        print("RESULT " + json.dumps(report), flush=True)

    # A batch whose activations need ~15 GB per device under a few GB of address space: XLA's allocation fails.
    size = int(Path("/proc/self/status").read_text().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + (6 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
    big = TrainConfig(**{**TINY, "batch_size": 1 << 22, "max_iters": 1}, out_dir=str(out / "oom"))
    try:
        with distributed.fail_fast_on_peer_loss():
            trainer.train(big, **quiet)
    except JaxlmError as e:
        print(f"OOM {e}", flush=True)


if __name__ == "__main__":
    main()
