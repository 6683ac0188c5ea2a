"""How the host runs a job: the allocator, CPU cores as devices, the compile cache, stop signals.

The allocator setting and CPU cores as devices are CPU tunings (`jaxlm.cpu`): they are decided before
anything initialises JAX, from the platform the command will use (`jaxlm.kernels.expected_platform`), so a
GPU or TPU host gets neither. The layout, the platform and the kernel record are written to the run
directory (`runtime.json`), so a resumed run trains on the same devices as the run it continues: reductions
then run in the same order and the resumed losses equal the uninterrupted ones bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from pathlib import Path

import jax

from ..cpu.allocator import keep_freed_memory
from ..cpu.cores import cpu_cores_for, use_cpu_cores, user_set_cpu_devices
from ..data.prepared import META_FILE
from ..data.tokens import BUILTIN
from ..kernels import Kernels, expected_platform
from ..tokenizer import GPT2_EOT_ID
from ..utils.cache import cache_dir
from ..utils.publish import write_file

RUNTIME_FILE = "runtime.json"

# Models up to this many (non-embedding) params train data parallel over CPU cores and keep freed memory;
# bigger ones keep one device, whose ops are large enough to use every core, one copy of the weights and
# optimizer state, and glibc's default of returning big freed blocks (else 124M peaks far higher: docs/design.md).
SMALL_MODEL_PARAMS = 20_000_000
# ... and a vocabulary up to this size (char-level): a GPT-2-vocabulary head is big enough for XLA to spread
# over the cores by itself (data parallel over cores measured no faster there), and 2-device runs of small
# GPT-2-vocabulary models hung in XLA's in-process all-reduce at the first step in 3 of 10 runs.
SMALL_VOCAB = 4096


def is_small(cfg) -> bool:
    """A model trained from scratch or resumed with at most SMALL_MODEL_PARAMS non-embedding params
    (`cfg`: a TrainConfig or its dict of values)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    return get("init_from") in ("scratch", "resume") and 12 * get("n_layer") * get("n_embd") ** 2 <= SMALL_MODEL_PARAMS


def vocab_size_of(values: dict) -> int | None:
    """The vocabulary a run from `values` (TrainConfig values) will train with, read without tokenising
    anything: --vocab-size, a prepared dataset's meta.json, else its tokenizer's (None: char-level, not
    known before the text is read; always small)."""
    if values.get("vocab_size"):
        return values["vocab_size"]
    source = values["dataset"]
    kind = BUILTIN.get(source, values.get("tokenizer"))
    meta = Path(source).expanduser() / META_FILE
    if source not in BUILTIN and meta.is_file():
        with contextlib.suppress(OSError, ValueError):
            return int(json.loads(meta.read_text())["vocab_size"])
    return GPT2_EOT_ID + 1 if kind == "gpt2" else None


def host_layout(values: dict, single_process: bool = True) -> dict:
    """{"cpu_devices": n | None, "keep_freed_memory": bool} for a run about to start; JAX stays untouched.

    `values`: the run's TrainConfig values (flags). Both are CPU tunings, so only when the command will run
    on the CPU (`expected_platform`: JAX_PLATFORMS, else whether an accelerator plugin is installed). A resumed
    run takes what its run directory recorded. Otherwise a small model with a small (char-level) vocabulary, on
    one process with no --mesh and no device count of the user's own, gets a CPU device per core that divides
    the batch, and a small model keeps freed memory.
    """
    cpu = expected_platform() == "cpu"
    mine = cpu and values["mesh"] is None and single_process and not user_set_cpu_devices()
    if values["init_from"] == "resume":
        recorded = read_layout(values["out_dir"])
        if recorded is not None:
            keep = cpu and bool(recorded.get("keep_freed_memory"))
            return {"cpu_devices": recorded.get("cpu_devices") if mine else None, "keep_freed_memory": keep}
    small = is_small(values)
    vocab = vocab_size_of(values) if small and mine else None
    cores = small and mine and (vocab is None or vocab <= SMALL_VOCAB)
    return {"cpu_devices": cpu_cores_for(values["batch_size"]) if cores else None, "keep_freed_memory": small and cpu}


def apply_layout(layout: dict):
    """Set the allocator and the CPU device count; call before anything initialises JAX."""
    if layout.get("keep_freed_memory"):
        keep_freed_memory()
    if layout.get("cpu_devices"):
        use_cpu_cores(layout["cpu_devices"])


def record_layout(out_dir, keep: bool, kernels: Kernels | None = None):
    """Write the layout this run actually has into its directory (process 0; written whole or not at all):
    the platform, CPU devices, the allocator setting and the kernel record with why each was chosen."""
    if jax.process_index() != 0:
        return
    platform = jax.devices()[0].platform
    layout = {"platform": platform, "cpu_devices": jax.device_count() if platform == "cpu" else None}
    layout["keep_freed_memory"] = keep
    if kernels is not None:
        layout["kernels"] = kernels.to_dict()
    write_file(Path(out_dir).expanduser() / RUNTIME_FILE, json.dumps(layout) + "\n")


def read_layout(out_dir) -> dict | None:
    path = Path(out_dir).expanduser() / RUNTIME_FILE
    try:
        layout = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # an older run or a torn file: decide afresh
    return layout if isinstance(layout, dict) else None


def persistent_compile_cache():
    """Cache compiled steps on disk (unless the user chose a cache): a resumed or repeated run skips compiling."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        jax.config.update("jax_compilation_cache_max_size", 2**30)


class StopFlag:
    """SIGINT/SIGTERM ask the loop to save and stop after the current step; a second SIGINT aborts."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
