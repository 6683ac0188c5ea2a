"""Training: AdamW with warmup + cosine decay, a jitted (state, batch) -> (state, metrics) step, and the loop.

The train state is a plain dict pytree: params, opt_state, step (updates done) and rng (the dropout key;
step s uses fold_in(rng, s)). Batches are a function of (seed, step), so a checkpoint of the state is the
whole run: resuming replays exactly the steps the uninterrupted run would have taken.

A run directory (`--out-dir`) holds checkpoints/ (Orbax, one dir per saved step, the last K kept),
metrics.jsonl, tensorboard/ and loss.png.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from . import checkpoint, data, distributed, loader, sharding
from .config import GPTConfig, TrainConfig
from .errors import JaxlmError
from .model import GPT, cross_entropy, init_params, param_shapes

RUN_FORMAT = "jaxlm-run"
ARCH_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")  # what makes two models "the same"
_RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "loss.png")


class TrainingDiverged(JaxlmError):
    """The loss or the gradients became NaN/inf."""


# ---------------------------------------------------------------------------------------------
# Optimizer


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr (nanoGPT's)."""
    if not cfg.decay_lr:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.learning_rate / (cfg.warmup_iters + 1),  # no wasted zero-lr first step
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_iters,
        decay_steps=max(cfg.decay_iters, cfg.warmup_iters + 1),  # decay ending inside warmup: drop to min_lr
        end_value=cfg.final_lr,
    )


def decay_mask(params):
    """True where weight decay applies: Dense kernels and the token/position embeddings (the matrices).

    Biases and LayerNorm scales/offsets do not decay. (nanoGPT's "dim >= 2" rule, by name here because
    scanned layers give every parameter a leading layer axis.)
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("kernel", "embedding"), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=1e-8, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip else adamw


# ---------------------------------------------------------------------------------------------
# Steps


def make_train_step(config: GPTConfig, tx: optax.GradientTransformation, schedule: optax.Schedule):
    """(state, tokens_AxBxT1) -> (state, metrics): A micro-batches of B windows of T+1 tokens, one update."""
    model = GPT(config)

    def loss_fn(params, tokens_BxT1, key):
        logits_BxTxV = model.apply({"params": params}, tokens_BxT1[:, :-1], train=True, rngs={"dropout": key})
        return cross_entropy(logits_BxTxV, tokens_BxT1[:, 1:])

    grad_fn = jax.value_and_grad(loss_fn)

    def step(state, tokens_AxBxT1):
        params = state["params"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        accum = tokens_AxBxT1.shape[0]
        if accum == 1:
            loss, grads = grad_fn(params, tokens_AxBxT1[0], key)
        else:  # gradient accumulation: a scan over micro-batches, summing float32 gradients

            def micro(carry, xs):
                tokens_BxT1, i = xs
                loss, grads = grad_fn(params, tokens_BxT1, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(micro, zeros, (tokens_AxBxT1, jnp.arange(accum)))
            loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        return new_state, metrics

    return step


def make_eval_step(config: GPTConfig):
    """(params, tokens_ExBxT1) -> mean loss over E batches (dropout off)."""
    model = GPT(config)

    def batch_loss(params, tokens_BxT1):
        return cross_entropy(model.apply({"params": params}, tokens_BxT1[:, :-1]), tokens_BxT1[:, 1:])

    def step(params, tokens_ExBxT1):
        return jax.lax.map(partial(batch_loss, params), tokens_ExBxT1).mean()

    return step


# ---------------------------------------------------------------------------------------------
# FLOPs


# Dense bf16 peak FLOP/s per JAX device, by device_kind prefix (first match wins).
PEAK_FLOPS = (
    ("TPU v2", 22.5e12),
    ("TPU v3", 61.5e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12),
    ("Tesla V100", 125e12),
    ("Tesla T4", 65e12),
)


def peak_flops_per_device(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    return next((flops for prefix, flops in PEAK_FLOPS if kind.startswith(prefix)), None)


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, seconds: float = 1.0) -> float:
    """FLOP/s of a square jitted matmul on the default device: the practical peak of a CPU."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or reps < 2:
        f(a, a).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / elapsed


# ---------------------------------------------------------------------------------------------
# State: init, placement, checkpoints


@dataclass
class Setup:
    """Everything resolved before the first step."""

    cfg: TrainConfig
    config: GPTConfig
    data: data.TokenData
    tokenizer: dict
    start: int  # updates done (a resumed run's checkpoint step)
    mesh: jax.sharding.Mesh
    state_shardings: dict
    state_shapes: dict
    init_state: Callable[[], dict]  # fresh or restored, placed on state_shardings


def state_shardings(config: GPTConfig, tx, mesh) -> dict:
    params = sharding.param_shardings(config, mesh)
    opt_shapes = jax.eval_shape(tx.init, param_shapes(config))
    rep = sharding.replicated(mesh)
    opt = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, params, transform_non_params=lambda _: rep)
    return {"params": params, "opt_state": opt, "step": rep, "rng": rep}


def state_shapes(config: GPTConfig, tx) -> dict:
    params = param_shapes(config)
    return {
        "params": params,
        "opt_state": jax.eval_shape(tx.init, params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }


def _abstract(shapes, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def new_state(config: GPTConfig, tx, shardings: dict, seed: int, params=None) -> dict:
    """A fresh train state on its shardings: random params (jitted init, born sharded) unless given."""
    init_key, rng = jax.random.split(jax.random.key(seed))
    if params is None:
        params = jax.jit(partial(init_params, config), out_shardings=shardings["params"])(init_key)
    else:
        params = jax.tree.map(
            lambda x, s: jax.device_put(jnp.asarray(x, config.param_dtype), s), params, shardings["params"]
        )
    return {
        "params": params,
        "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
        "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
        "rng": jax.device_put(jax.random.key_data(rng), shardings["rng"]),
    }


def _progress(state) -> dict:
    return {"step": state["step"], "rng": state["rng"]}


def load_run(run_dir, shardings=None, step: int | None = None):
    """(GPTConfig, params, tokenizer_spec) of a training run's latest (or given) checkpoint."""
    run_dir = Path(run_dir)
    manager = _open_manager(run_dir, read_only=True)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise JaxlmError(f"{run_dir} holds no complete checkpoint yet; train longer or pick another run")
    meta = checkpoint.restore_run_step(manager, step)["meta"]
    config = GPTConfig.from_dict(meta["model"])
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, param_shapes(config))
    params = checkpoint.restore_run_step(manager, step, {"params": _abstract(param_shapes(config), shardings)})
    manager.close()
    return config, params["params"], meta.get("tokenizer")


def _open_manager(run_dir: Path, max_to_keep: int | None = None, read_only: bool = False):
    ckpt = run_dir / "checkpoints"
    if read_only and not ckpt.is_dir():
        raise JaxlmError(f"{run_dir} holds no checkpoints/; it is not a training run")
    return checkpoint.run_manager(ckpt, max_to_keep, read_only=read_only)


def _run_meta(run_dir: Path) -> tuple[int, dict] | None:
    """(latest step, meta) of the run in `run_dir`, or None when it holds no complete checkpoint."""
    if not (run_dir / "checkpoints").is_dir():
        return None
    manager = _open_manager(run_dir, read_only=True)
    step = manager.latest_step()
    meta = None if step is None else checkpoint.restore_run_step(manager, step)["meta"]
    manager.close()
    return None if step is None else (step, meta)


# ---------------------------------------------------------------------------------------------
# Setup: everything that can fail on user input happens here, before any compile


def setup(cfg: TrainConfig, explicit: frozenset = frozenset(), log=print) -> Setup:
    out = Path(cfg.out_dir).expanduser()
    _check_writable(out)
    previous = _run_meta(out)
    resume = cfg.init_from == "resume"
    if resume:
        if previous is None:
            raise JaxlmError(f"--init-from resume: {out} holds no checkpoint to resume; use --init-from scratch")
        cfg = _resume_config(cfg.to_dict(), explicit, previous[1])

    ds = data.resolve_dataset(cfg.dataset, cfg.tokenizer)
    ds.check_block_size(cfg.block_size)
    params, tokenizer = None, ds.tokenizer_spec
    if resume:
        config = GPTConfig.from_dict(previous[1]["model"]).replace(**_compute_overrides(cfg))
        _check_same_data(previous[1], ds)
    elif cfg.init_from == "scratch":
        config = cfg.model_config(ds.vocab_size)
    else:
        config, params, tokenizer = _load_pretrained(cfg, explicit, ds, log)
    if ds.vocab_size > config.vocab_size:
        raise JaxlmError(f"dataset vocab {ds.vocab_size} exceeds the model's vocab_size {config.vocab_size}")

    if not resume and previous is not None:
        old = GPTConfig.from_dict(previous[1]["model"])
        if _arch(old) != _arch(config) and not cfg.overwrite:
            raise JaxlmError(
                f"{out} holds a run of a different model ({_describe(old)}, step {previous[0]}) than this one "
                f"({_describe(config)}); pass --overwrite to replace it, --init-from resume to continue it, "
                "or choose another --out-dir"
            )
        log(f"replacing the run in {out} (step {previous[0]})")
        for name in _RUN_FILES:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)

    mesh = sharding.make_mesh(cfg.mesh)
    if cfg.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise JaxlmError(
            f"--batch-size {cfg.batch_size} must be divisible by the data x fsdp mesh size "
            f"{mesh.shape['data'] * mesh.shape['fsdp']}"
        )
    tx = make_optimizer(cfg)
    shardings, shapes = state_shardings(config, tx, mesh), state_shapes(config, tx)
    if resume:
        init = partial(_restore_state, out, previous[0], shapes, shardings)
    else:
        init = partial(new_state, config, tx, shardings, cfg.seed, params)
    return Setup(cfg, config, ds, tokenizer, previous[0] if resume else 0, mesh, shardings, shapes, init)


def _check_writable(out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise JaxlmError(f"cannot write to --out-dir {out} ({e.strerror}); choose a writable directory") from None


def _resume_config(values: dict, explicit: frozenset, meta: dict) -> TrainConfig:
    """The stored run's config with the flags given now on top (model shape flags must agree)."""
    model = meta["model"]
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if name in explicit and values[name] not in (None, model[name]):
            raise JaxlmError(
                f"--init-from resume: the run has {name}={model[name]} but --{name.replace('_', '-')} "
                f"{values[name]} was given; drop the flag (or start a new run)"
            )
    changes = {k: values[k] for k in explicit if k not in ARCH_FIELDS}
    return TrainConfig.from_dict({**meta["train"], **changes, "init_from": "resume", "out_dir": values["out_dir"]})


def _compute_overrides(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("dropout", "dtype", "remat", "scan_layers")}


def _check_same_data(meta: dict, ds: data.TokenData):
    was = meta.get("data", {})
    now = {"counts": ds.meta["counts"], "tokenizer": ds.tokenizer_spec}
    if {k: was.get(k) for k in now} != now:
        raise JaxlmError(
            "--init-from resume: the dataset differs from the one the run was trained on (token counts or "
            "tokenizer changed); resume with the same --dataset, or fine-tune with --init-from <run dir>"
        )


def _load_pretrained(cfg: TrainConfig, explicit: frozenset, ds: data.TokenData, log):
    log(f"initialising from {cfg.init_from}")
    config, params, tokenizer = loader.load_with_tokenizer(cfg.init_from, **_compute_overrides(cfg))
    for name in ("n_layer", "n_head", "n_embd", "vocab_size"):
        if name in explicit and getattr(cfg, name) not in (None, getattr(config, name)):
            raise JaxlmError(
                f"--init-from {cfg.init_from} has {name}={getattr(config, name)}; drop --{name.replace('_', '-')}"
            )
    if "block_size" in explicit and cfg.block_size != config.block_size:
        if cfg.block_size > config.block_size:
            raise JaxlmError(
                f"--block-size {cfg.block_size} exceeds {cfg.init_from}'s context of {config.block_size} tokens"
            )
        params = {**params, "wpe": {"embedding": params["wpe"]["embedding"][: cfg.block_size]}}  # crop positions
        config = config.replace(block_size=cfg.block_size)
    ds.check_block_size(config.block_size)
    if tokenizer is not None and tokenizer != ds.tokenizer_spec:
        raise JaxlmError(
            f"{cfg.init_from} was trained with the {tokenizer.get('kind')} tokenizer but the dataset uses "
            f"{ds.tokenizer_spec.get('kind')}; prepare the data with that tokenizer (e.g. --dataset shakespeare)"
        )
    return config, params, tokenizer or ds.tokenizer_spec


def _restore_state(out: Path, step: int, shapes: dict, shardings: dict) -> dict:
    items = {
        "params": _abstract(shapes["params"], shardings["params"]),
        "opt_state": _abstract(shapes["opt_state"], shardings["opt_state"]),
        "progress": {k: _abstract(shapes[k], shardings[k]) for k in ("step", "rng")},
    }
    manager = _open_manager(out, read_only=True)
    r = checkpoint.restore_run_step(manager, step, items)
    manager.close()
    return {"params": r["params"], "opt_state": r["opt_state"], **r["progress"]}


def _arch(c: GPTConfig) -> dict:
    return {k: getattr(c, k) for k in ARCH_FIELDS}


def _describe(c: GPTConfig) -> str:
    return ", ".join(f"{k}={getattr(c, k)}" for k in ARCH_FIELDS)


# ---------------------------------------------------------------------------------------------
# Logging: metrics.jsonl, TensorBoard, progress bar, loss curve (process 0 only)


class RunLog:
    def __init__(self, out: Path, cfg: TrainConfig, start: int, total: int):
        self.out, self.main = out, jax.process_index() == 0
        self.path = out / "metrics.jsonl"
        self.writer, self.bar = None, None
        if not self.main:
            return
        _truncate_metrics(self.path, start)
        self.file = open(self.path, "a")
        if cfg.tensorboard:
            self.writer = _summary_writer()(str(out / "tensorboard"), purge_step=start or None)
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=None, file=sys.stderr)
        self.lines = self.bar.disable  # not a terminal: print a line per log row instead

    def row(self, **row):
        if not self.main:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self.writer.add_scalar(("val/" if k == "val_loss" else "train/") + k, v, row["step"])

    def train_row(self, row: dict):
        self.row(**row)
        if not self.main:
            return
        shown = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
        if row.get("mfu") is not None:
            shown["mfu"] = f"{100 * row['mfu']:.1f}%"
        if self.lines:
            print(f"step {row['step']}: " + ", ".join(f"{k} {v}" for k, v in shown.items()), flush=True)
        else:
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1):
        if self.main:
            self.bar.update(n)

    def write(self, msg: str):
        if self.main:
            self.bar.write(msg) if not self.lines else print(msg, flush=True)

    def close(self):
        if not self.main:
            return
        self.bar.close()
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        plot_losses(self.path, self.out / "loss.png")


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without torch (it imports torch only to accept its tensors,
    which costs seconds; we log floats)."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter


def _truncate_metrics(path: Path, start: int):
    """Drop rows a resumed run is about to write again (those after its checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start]
    if not start:
        keep = []
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for points, label in ((train, "train"), (val, "val")):
        if points:
            ax.plot(*zip(*points, strict=True), label=label, marker="o" if label == "val" else None, ms=3)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The loop


class _StopFlag:
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


def keep_freed_memory():
    """Stop glibc from handing XLA's per-step buffers back to the OS (Linux; a no-op elsewhere).

    XLA on CPU allocates each step's temporaries afresh; by default glibc unmaps them on free, so every step
    page-faults tens of MB back in (a large share of a small model's step time). One arena, no mmap and no
    trimming make freed memory reusable. Call before JAX starts its threads (harmless on GPU/TPU hosts).
    """
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
    mallopt(M_ARENA_MAX, 1)
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


# Models up to this many (non-embedding) params train data parallel over CPU cores and keep freed memory;
# bigger ones keep one device, whose ops are large enough to use every core, one copy of the weights and
# optimizer state, and glibc's default of returning big freed blocks (else 124M peaks at ~12 GiB, not ~4).
SMALL_MODEL_PARAMS = 20_000_000


def is_small(cfg: TrainConfig) -> bool:
    """A model trained from scratch or resumed with at most SMALL_MODEL_PARAMS non-embedding params."""
    return cfg.init_from in ("scratch", "resume") and 12 * cfg.n_layer * cfg.n_embd**2 <= SMALL_MODEL_PARAMS


def use_cpu_cores(batch_size: int):
    """On a CPU host, expose each core as a JAX device (as many as divide the batch), so the default mesh
    runs data parallel across the cores.

    XLA runs a small model's step on about one core at a time (its ops are too small to split), so two
    cores as two devices train the default model 1.2-1.4x faster. Only the CPU platform is affected
    (GPU/TPU hosts keep their accelerators), and only before JAX initialises; a device count the user
    set (XLA_FLAGS or JAX_NUM_CPU_DEVICES) wins.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") or os.environ.get(
        "JAX_NUM_CPU_DEVICES"
    ):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = max(d for d in range(1, cores + 1) if batch_size % d == 0)
    with contextlib.suppress(RuntimeError):  # already initialised: keep what it has
        jax.config.update("jax_num_cpu_devices", n)


def _persistent_compile_cache():
    """Cache compiled steps on disk (unless the user chose a cache): a resumed or repeated run skips compiling."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(data.cache_dir() / "xla"))
        jax.config.update("jax_compilation_cache_max_size", 2**30)


def train(cfg: TrainConfig, explicit: frozenset = frozenset(), log=print) -> dict:
    """Train as `cfg` says; returns a summary {"step", "val_loss", "seconds", "out_dir", "stopped_by"}."""
    t_start = time.perf_counter()
    if is_small(cfg):
        keep_freed_memory()
    _persistent_compile_cache()
    log = log if jax.process_index() == 0 else (lambda *a, **k: None)
    stop = _StopFlag()
    with stop.installed():
        s = setup(cfg, explicit, log)
        with sharding.activate(s.mesh):  # steps are traced under the mesh and its logical-axis rules
            return _loop(s, stop, log, t_start)


def _loop(s: Setup, stop: _StopFlag, log, t_start: float) -> dict:
    cfg, config, mesh = s.cfg, s.config, s.mesh
    out = Path(cfg.out_dir).expanduser()
    A, B, T = cfg.gradient_accumulation_steps, cfg.batch_size, config.block_size
    batch_spec = PartitionSpec(None, *sharding.batch_sharding(mesh).spec)
    batch_sh = NamedSharding(mesh, batch_spec)
    train_shape, eval_shape = (A, B, T + 1), (cfg.eval_iters, B, T + 1)
    rows = _local_rows(batch_sh, train_shape)
    n_params = config.num_params()
    log(
        f"model: {n_params / 1e6:.2f}M params ({_describe(config)}, {config.dtype}); data: "
        f"{len(s.data.train):,} train tokens; {A}x{B}x{T} tokens/step on {mesh.size} {jax.devices()[0].platform} "
        f"device(s); steps {s.start}..{cfg.max_iters}"
    )

    val_local = [data.get_batch(s.data, "val", cfg.seed, i, (1, B), T, rows)[0] for i in range(cfg.eval_iters)]
    val_tokens = jax.make_array_from_process_local_data(batch_sh, np.stack(val_local), eval_shape)

    def batch(step: int):
        local = data.get_batch(s.data, "train", cfg.seed, step, (A, B), T, rows)
        return jax.make_array_from_process_local_data(batch_sh, local, train_shape)

    # Compile both steps in the background (lowered from shapes alone) while the state is built or restored.
    t = time.perf_counter()
    abstract_state = {k: _abstract(s.state_shapes[k], s.state_shardings[k]) for k in s.state_shapes}
    train_lowered = jax.jit(
        make_train_step(config, make_optimizer(cfg), lr_schedule(cfg)),
        in_shardings=(s.state_shardings, batch_sh),
        out_shardings=(s.state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    ).lower(abstract_state, jax.ShapeDtypeStruct(train_shape, jnp.int32, sharding=batch_sh))
    eval_lowered = jax.jit(make_eval_step(config)).lower(abstract_state["params"], val_tokens)
    with ThreadPoolExecutor(2) as pool:
        compiled = [pool.submit(lowered.compile) for lowered in (train_lowered, eval_lowered)]
        state = s.init_state()
        train_step, eval_step = (c.result() for c in compiled)
    log(f"compiled in {time.perf_counter() - t:.1f} s")

    peak = cfg.peak_flops or peak_flops_per_device()
    if peak is None and jax.devices()[0].platform == "cpu":
        peak = measure_matmul_flops(2048, seconds=0.5) / len(jax.devices())  # the practical peak bench/ uses
    flops_per_step = config.flops_per_token(T) * A * B * T

    manager = _open_manager(out, cfg.keep_checkpoints)
    runlog = RunLog(out, cfg, s.start, cfg.max_iters)
    meta = {
        "format": RUN_FORMAT,
        "version": 1,
        "model": config.to_dict(),
        "train": cfg.to_dict(),
        "tokenizer": s.tokenizer,
        "data": {"counts": s.data.meta["counts"], "tokenizer": s.data.tokenizer_spec, "source": str(cfg.dataset)},
    }
    step, last_saved, val_loss = s.start, None, None
    pending: list[tuple[int, dict]] = []  # device metrics not yet read back (reading them syncs)
    window = {"t": time.perf_counter(), "excluded": 0.0, "steps": 0}

    def drain():
        """Read back pending metrics (a host sync); stop on NaN/inf before anything is saved."""
        if not pending:
            return []
        fetched = jax.device_get(pending)
        pending.clear()
        for k, m in fetched:
            if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                manager.wait_until_finished()
                where = f"step {last_saved} in {out / 'checkpoints'}" if last_saved is not None else "none"
                raise TrainingDiverged(
                    f"loss became {float(m['loss'])} (gradient norm {float(m['grad_norm'])}) at step {k}; training "
                    f"diverged and nothing after it was saved (last good checkpoint: {where}); lower "
                    "--learning-rate, raise --warmup-iters or set --grad-clip, then --init-from resume"
                )
        return fetched

    def log_train():
        fetched = drain()
        now = time.perf_counter()
        seconds = now - window["t"] - window["excluded"]
        tok_s = window["steps"] * A * B * T / max(seconds, 1e-9)
        row = {
            "step": step,
            "loss": float(np.mean([m["loss"] for _, m in fetched])),
            "lr": float(fetched[-1][1]["lr"]),
            "grad_norm": float(np.mean([m["grad_norm"] for _, m in fetched])),
            "tokens_per_s": tok_s,
            "ms_per_step": 1000 * seconds / max(window["steps"], 1),
            "mfu": tok_s / (A * B * T) * flops_per_step / (peak * mesh.size) if peak else None,
            "elapsed_s": now - t_start,
        }
        runlog.train_row(row)
        window.update(t=now, excluded=0.0, steps=0)

    def evaluate():
        nonlocal val_loss
        t = time.perf_counter()
        val_loss = float(eval_step(state["params"], val_tokens))
        runlog.row(step=step, val_loss=val_loss, elapsed_s=time.perf_counter() - t_start)
        runlog.write(f"step {step}: val loss {val_loss:.4f}")
        window["excluded"] += time.perf_counter() - t

    def save():
        nonlocal last_saved
        t = time.perf_counter()
        drain()
        checkpoint.save_run_step(
            manager,
            step,
            {"params": state["params"], "opt_state": state["opt_state"], "progress": _progress(state)},
            {**meta, "step": step, "val_loss": val_loss},
        )
        last_saved = step
        window["excluded"] += time.perf_counter() - t

    try:
        if step % cfg.eval_interval == 0 and not (s.start and cfg.init_from == "resume"):
            evaluate()
        window["t"] = time.perf_counter()
        next_batch = batch(step) if step < cfg.max_iters else None
        while step < cfg.max_iters:
            state, metrics = train_step(state, next_batch)
            pending.append((step + 1, metrics))
            step += 1
            window["steps"] += 1
            if step < cfg.max_iters:
                next_batch = batch(step)  # built on the host while the device runs the step
            last = step == cfg.max_iters or stop.signal is not None
            if step % cfg.log_interval == 0 or last:
                log_train()
            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                evaluate()
            if step % cfg.save_interval == 0 or last:
                save()
            runlog.advance()
            if stop.signal is not None:
                break
        if last_saved != step:
            save()
        manager.wait_until_finished()
    finally:
        with contextlib.suppress(Exception):
            manager.wait_until_finished()
        manager.close()
        runlog.close()
    seconds = time.perf_counter() - t_start
    if stop.signal is not None:
        log(
            f"stopped by {stop.signal} at step {step}; checkpoint saved in {out / 'checkpoints'}; continue with "
            f"python train.py --init-from resume --out-dir {cfg.out_dir}"
        )
    else:
        shown = "n/a" if val_loss is None else f"{val_loss:.4f}"
        log(f"done: {step} steps in {seconds:.0f} s, val loss {shown}; run in {out}")
    return {"step": step, "val_loss": val_loss, "seconds": seconds, "out_dir": str(out), "stopped_by": stop.signal}


def _local_rows(batch_sh: NamedSharding, shape: tuple) -> slice:
    """The rows of the global batch (axis 1) that this process's devices hold."""
    idx = batch_sh.addressable_devices_indices_map(shape).values()
    starts = [i[1].start or 0 for i in idx]
    stops = [shape[1] if i[1].stop is None else i[1].stop for i in idx]
    return slice(min(starts), max(stops))


def main(argv=None) -> int:
    """`python train.py [flags]`: parse, train, say how to sample."""
    from .config import parse_train_flags

    values, explicit = parse_train_flags(argv)
    distributed.initialize(values["coordinator_address"], values["num_processes"], values["process_id"])
    if values["init_from"] == "resume":  # the stored run's config is the base the flags override
        previous = _run_meta(Path(values["out_dir"]).expanduser())
        if previous is None:
            raise JaxlmError(f"--init-from resume: {values['out_dir']} holds no checkpoint to resume")
        cfg = _resume_config(values, explicit, previous[1])
    else:
        cfg = TrainConfig(**values)
    single_process = values["coordinator_address"] is None and values["num_processes"] is None
    if is_small(cfg) and cfg.mesh is None and single_process:  # (train() sets keep_freed_memory itself)
        use_cpu_cores(cfg.batch_size)
    with distributed.fail_fast_on_peer_loss():
        summary = train(cfg, explicit)
    if summary["stopped_by"] is None and jax.process_index() == 0:
        flag = "" if cfg.out_dir == "out" else f" --out-dir {cfg.out_dir}"
        print(f"sample from it: python sample.py{flag}")
    return 0
