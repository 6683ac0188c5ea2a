"""jaxlm's training library: `import jaxlm.train` (it imports optax; `import jaxlm` alone does not).

optimizer  lr_schedule, decay_mask, make_optimizer
step       Batch, lm_loss, make_train_step(loss_fn, tx, schedule), make_eval_step
state      model_layout / layout (shapes + shardings), new_state, restore_state
setup      setup(cfg) -> Setup: run dir, resume, pretrained init; resume_config
lora       LoRA runs: adapters as the trainable state, the base frozen and recorded by source + fingerprint
loop       train(cfg), main(argv) (python train.py), the Loop
metrics    RunLog, read_metrics, plot_losses, MFU peaks
runtime    allocator, CPU cores as devices, compile cache, stop signals
runlock    RunLock: one writer per run directory

May import: every package below it in docs/design.md's order (errors, config, tokenizer, utils, cli, cpu,
kernels, lora, model, parallel, data, io, generation); never eval or serve.
"""

from ..io.runs import load_run
from ..parallel.sharding import placed_shapes as abstract
from .loop import Loop, TrainingDiverged, main, train
from .metrics import (
    PEAK_FLOPS,
    RunLog,
    measure_matmul_flops,
    peak_flops_for,
    peak_flops_per_device,
    plot_losses,
    read_metrics,
)
from .optimizer import decay_mask, lr_schedule, make_optimizer
from .runlock import RunLock, RunLocked
from .runtime import apply_layout, host_layout, is_small, keep_freed_memory, use_cpu_cores
from .setup import RunComplete, Setup, resume_config, run_meta, setup
from .state import layout, model_layout, new_state, restore_state
from .step import Batch, batch_sharding, jit_train_step, lm_loss, make_eval_step, make_train_step

__all__ = [
    "PEAK_FLOPS",
    "Batch",
    "Loop",
    "RunComplete",
    "RunLock",
    "RunLocked",
    "RunLog",
    "Setup",
    "TrainingDiverged",
    "abstract",
    "apply_layout",
    "batch_sharding",
    "decay_mask",
    "host_layout",
    "is_small",
    "jit_train_step",
    "keep_freed_memory",
    "layout",
    "lm_loss",
    "load_run",
    "lr_schedule",
    "main",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "measure_matmul_flops",
    "model_layout",
    "new_state",
    "peak_flops_for",
    "peak_flops_per_device",
    "plot_losses",
    "read_metrics",
    "restore_state",
    "resume_config",
    "run_meta",
    "setup",
    "train",
    "use_cpu_cores",
]
