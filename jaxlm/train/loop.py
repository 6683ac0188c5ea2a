"""The training loop, and `train()` / `main()` around it.

`Loop.run` reads top to bottom like nanoGPT's loop: step, log, evaluate, checkpoint, stop. Each of those
is a small method; the loop's state (step, last checkpoint, val loss, unread metrics) lives on the object.
The step is jitted with donated state and the host never waits for it except to log.
"""

from __future__ import annotations

import contextlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

from ..config import TrainConfig
from ..errors import JaxlmError, disk_full
from ..io import runs
from ..kernels import resolve as resolve_kernels
from ..parallel import distributed, sharding
from ..parallel.sharding import placed_shapes
from .batches import batches_for
from .flags import parse_train_flags
from .metrics import RunLog, measure_matmul_flops, peak_flops_per_device
from .optimizer import lr_schedule, make_optimizer
from .runlock import RunLock
from .runtime import (
    StopFlag,
    apply_layout,
    host_layout,
    is_small,
    keep_freed_memory,
    persistent_compile_cache,
    record_layout,
)
from .setup import RunComplete, Setup, check_incomplete, resume_config, run_meta, setup
from .state import checkpoint_items, prng_impl
from .step import batch_sharding, jit_train_step, lm_loss, make_eval_step


class TrainingDiverged(JaxlmError):
    """The loss or the gradients became NaN/inf."""


def train(
    cfg: TrainConfig, explicit: frozenset = frozenset(), log=print, *, loss_fn=None, trainable=None, mesh=None
) -> dict:
    """Train as `cfg` says; returns a summary {"step", "val_loss", "seconds", "out_dir", "stopped_by"}.

    `loss_fn` (default: the LM loss of the run's model) and `trainable` (a predicate on param paths; default:
    everything) are the seams for other objectives and frozen parts; `mesh` (default: `cfg.mesh`'s) one whose
    device order is the caller's (`jaxlm.parallel.sharding.make_mesh(spec, devices=...)`).
    """
    t_start = time.perf_counter()
    # an impossible --attention (cudnn on a CPU, ...) fails here, before anything is written
    resolve_kernels(None, dtype=cfg.dtype, dropout=cfg.dropout, attention=cfg.attention)
    keep = is_small(cfg) and jax.devices()[0].platform == "cpu"  # a CPU tuning (jaxlm.cpu.allocator)
    if keep:
        keep_freed_memory()
    persistent_compile_cache()
    log = log if jax.process_index() == 0 else (lambda *a, **k: None)
    stop = StopFlag()
    with stop.installed():
        try:
            check_incomplete(cfg, explicit)  # a finished run is left untouched (its lock file too)
            with RunLock(cfg.out_dir):  # one writer per run directory, taken before anything is written
                s = setup(cfg, explicit, log, trainable, mesh)
                log(f"kernels: {s.kernels.describe('attention')}")
                record_layout(s.cfg.out_dir, keep, s.kernels)
                with sharding.activate(s.mesh), out_of_memory_said(s):  # steps trace under the mesh and its rules
                    loss = loss_fn or s.loss_fn or lm_loss(s.config, kernels=s.kernels)
                    return Loop(s, stop, log, t_start, loss).run()
        except RunComplete as done:
            log(str(done))
            return {"step": None, "val_loss": None, "seconds": 0.0, "out_dir": cfg.out_dir, "stopped_by": None}


class Loop:
    def __init__(self, s: Setup, stop: StopFlag, log, t_start: float, loss_fn):
        self.s, self.stop, self.log, self.t_start = s, stop, log, t_start
        cfg, config, mesh = s.cfg, s.config, s.mesh
        self.out = Path(cfg.out_dir).expanduser()
        A, B, T = cfg.gradient_accumulation_steps, cfg.batch_size, config.block_size
        batch_sh = batch_sharding(mesh)
        self.batches = batches_for(s.data, cfg.seed, (A, B), T, cfg.eval_iters, batch_sh)
        lengths = self.batches.lengths
        log(
            f"model: {config.num_params() / 1e6:.2f}M params ({config.arch_summary()}, {config.dtype}); data: "
            f"{self.batches.summary()}; {A}x{B}x{'|'.join(map(str, lengths))} tokens/step on {mesh.size} "
            f"{jax.devices()[0].platform} device(s); steps {s.start}..{cfg.max_iters}"
        )
        self.train_steps, self.eval_step, self.state = self._compile(loss_fn)
        self.peak = cfg.peak_flops or peak_flops_per_device(mesh.devices.flat[0], config.dtype)
        if self.peak is None and jax.devices()[0].platform == "cpu":
            self.peak = measure_matmul_flops(2048, seconds=0.5) / len(jax.devices())  # what bench/ uses
        self.step, self.last_saved, self.val_loss = s.start, None, None
        self.pending: list[tuple[int, dict]] = []  # device metrics not yet read back (reading them syncs)
        self.window = {"t": time.perf_counter(), "excluded": 0.0, "steps": 0, "tokens": 0, "flops": 0.0}
        self.meta = {
            "format": runs.RUN_FORMAT,
            "version": 1,
            "model": config.to_dict(),
            "train": cfg.to_dict(),
            "tokenizer": s.tokenizer,
            "data": {"counts": s.data.meta["counts"], "tokenizer": s.data.tokenizer_spec, "source": str(cfg.dataset)},
            "frozen_paths": list(s.frozen_paths),
            "prng_impl": prng_impl(),  # the dropout key's shape and draws: a resume must use the same
        }
        if s.lora is not None:
            self.meta["lora"] = s.lora

    def _compile(self, loss_fn):
        """Compile the train step for each row length the batches can have, and the eval step, in the background
        (lowered from shapes alone) while the state is built or restored."""
        s, t = self.s, time.perf_counter()
        state_abstract = {k: placed_shapes(s.state_shapes[k], s.state_shardings[k]) for k in s.state_shapes}
        step = jit_train_step(loss_fn, make_optimizer(s.cfg), lr_schedule(s.cfg), s.state_shardings, s.mesh)
        lowered = {T: step.lower(state_abstract, self.batches.abstract(T)) for T in self.batches.lengths}
        eval_lowered = jax.jit(make_eval_step(loss_fn)).lower(
            state_abstract["params"], state_abstract["frozen"], self.batches.val
        )
        with ThreadPoolExecutor(2) as pool:
            compiled = {T: pool.submit(low.compile) for T, low in lowered.items()}
            eval_compiled = pool.submit(eval_lowered.compile)
            state = s.init_state()
            train_steps, eval_step = {T: c.result() for T, c in compiled.items()}, eval_compiled.result()
        self.log(f"compiled {len(train_steps)} train step(s) and the eval step in {time.perf_counter() - t:.1f} s")
        return train_steps, eval_step, state

    def train_step(self, state, batch):
        """One update with the step compiled for this batch's row length; counts the tokens and FLOPs it ran."""
        A, B, T = batch.tokens.shape[0], batch.tokens.shape[1], batch.tokens.shape[2] - 1
        self.window["tokens"] += A * B * T
        self.window["flops"] += self.s.config.flops_per_token(T) * A * B * T
        return self.train_steps[T](state, batch)

    def run(self) -> dict:
        cfg = self.s.cfg
        self.manager = runs.open_run(self.out, cfg.keep_checkpoints)
        self.runlog = RunLog(self.out, cfg.tensorboard, self.s.start, cfg.max_iters)
        try:
            self.steps()
            self.manager.wait_until_finished()
        except BaseException as e:
            with contextlib.suppress(Exception):  # let a save in flight end; then nothing else may mask `e`
                self.manager.wait_until_finished()
            with contextlib.suppress(Exception):
                self.close()
            reason = disk_full(e)
            if reason is None:
                raise
            raise runs.out_of_space(self.out, reason) from None
        self.close()
        return self.summary()

    def steps(self):
        cfg = self.s.cfg
        if self.step % cfg.eval_interval == 0 and not (self.s.start and cfg.init_from == "resume"):
            self.evaluate()
        self.window["t"] = time.perf_counter()
        next_batch = self.batches.train(self.step) if self.step < cfg.max_iters else None
        while self.step < cfg.max_iters:
            self.state, metrics = self.train_step(self.state, next_batch)
            self.step += 1
            self.pending.append((self.step, metrics))
            self.window["steps"] += 1
            if self.step < cfg.max_iters:
                next_batch = self.batches.train(self.step)  # built on the host while the device runs the step
            last = self.step == cfg.max_iters or self.stop.signal is not None
            if self.step % cfg.log_interval == 0 or last:
                self.log_train()
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                self.evaluate()
            if self.step % cfg.save_interval == 0 or last:
                self.save()
            self.runlog.advance()
            if self.stop.signal is not None:
                break
        if self.last_saved != self.step:
            self.save()

    def close(self):
        self.manager.close()
        self.runlog.close()

    def drain(self) -> list[tuple[int, dict]]:
        """Read back pending metrics (a host sync); stop on NaN/inf before anything is saved."""
        if not self.pending:
            return []
        fetched = jax.device_get(self.pending)
        self.pending.clear()
        for k, m in fetched:
            if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                self.manager.wait_until_finished()
                ckpt = self.out / "checkpoints"
                where = f"step {self.last_saved} in {ckpt}" if self.last_saved is not None else "none"
                raise TrainingDiverged(
                    f"loss became {float(m['loss'])} (gradient norm {float(m['grad_norm'])}) at step {k}; training "
                    f"diverged and nothing after it was saved (last good checkpoint: {where}); lower "
                    "--learning-rate, raise --warmup-iters or set --grad-clip, then --init-from resume"
                )
        return fetched

    def log_train(self):
        fetched = self.drain()
        now = time.perf_counter()
        seconds = now - self.window["t"] - self.window["excluded"]
        tok_s = self.window["tokens"] / max(seconds, 1e-9)
        mfu = self.window["flops"] / max(seconds, 1e-9) / (self.peak * self.s.mesh.size) if self.peak else None
        self.runlog.train_row(
            {
                "step": self.step,
                "loss": float(np.mean([m["loss"] for _, m in fetched])),
                "lr": float(fetched[-1][1]["lr"]),
                "grad_norm": float(np.mean([m["grad_norm"] for _, m in fetched])),
                "tokens_per_s": tok_s,
                "ms_per_step": 1000 * seconds / max(self.window["steps"], 1),
                "mfu": mfu,
                "elapsed_s": now - self.t_start,
            }
        )
        self.window.update(t=now, excluded=0.0, steps=0, tokens=0, flops=0.0)

    def evaluate(self):
        t = time.perf_counter()
        self.val_loss = float(self.eval_step(self.state["params"], self.state["frozen"], self.batches.val))
        self.runlog.row(step=self.step, val_loss=self.val_loss, elapsed_s=time.perf_counter() - self.t_start)
        self.runlog.write(f"step {self.step}: val loss {self.val_loss:.4f}")
        self.window["excluded"] += time.perf_counter() - t

    def save(self):
        t = time.perf_counter()
        self.drain()
        meta = {**self.meta, "step": self.step, "val_loss": self.val_loss}
        items = checkpoint_items(self.state, with_frozen=self.s.lora is None)  # a LoRA base is recorded, not copied
        runs.save_run_step(self.manager, self.step, items, meta)
        self.last_saved = self.step
        self.window["excluded"] += time.perf_counter() - t

    def summary(self) -> dict:
        cfg, seconds = self.s.cfg, time.perf_counter() - self.t_start
        if self.stop.signal is not None:
            self.log(
                f"stopped by {self.stop.signal} at step {self.step}; checkpoint saved in {self.out / 'checkpoints'}; "
                f"continue with python train.py --init-from resume --out-dir {cfg.out_dir}"
            )
        else:
            shown = "n/a" if self.val_loss is None else f"{self.val_loss:.4f}"
            self.log(f"done: {self.step} steps in {seconds:.0f} s, val loss {shown}; run in {self.out}")
        return {
            "step": self.step,
            "val_loss": self.val_loss,
            "seconds": seconds,
            "out_dir": str(self.out),
            "stopped_by": self.stop.signal,
        }


@contextlib.contextmanager
def out_of_memory_said(s: Setup):
    """XLA's RESOURCE_EXHAUSTED (a step, the state or a compiled program too big for a device) as one line that
    names the batch and the flags that lower memory."""
    try:
        yield
    except Exception as e:
        if not distributed.is_out_of_memory(e):
            raise
        A, B, T = s.cfg.gradient_accumulation_steps, s.cfg.batch_size, s.config.block_size
        what = str(e).splitlines()[0].removeprefix("RESOURCE_EXHAUSTED: ").rstrip(". ")[:200]
        raise JaxlmError(
            f"out of device memory at --batch-size {B} ({A} micro-batch(es) of {B} x {T} tokens per step on "
            f"{s.mesh.size} device(s); XLA: {what}); lower --batch-size (raise --gradient-accumulation-steps to keep "
            "the tokens per step) or set --remat true; --mesh fsdp=N shards params and optimizer state over N devices"
        ) from None


def main(argv=None) -> int:
    """`python train.py [flags]`: parse, decide the host layout, train, say how to sample."""
    values, explicit = parse_train_flags(argv)
    single_process = values["coordinator_address"] is None and values["num_processes"] is None
    apply_layout(host_layout(values, single_process))  # before anything initialises JAX
    distributed.initialize(values["coordinator_address"], values["num_processes"], values["process_id"])
    if values["init_from"] == "resume":  # the stored run's config is the base the flags override
        previous = run_meta(values["out_dir"])
        if previous is None:
            raise JaxlmError(f"--init-from resume: {values['out_dir']} holds no checkpoint to resume")
        cfg = resume_config(values, explicit, previous[1])
    else:
        cfg = TrainConfig(**values)
    if cfg.tensorboard:
        import_tensorboardx_without_torch()
    with distributed.fail_fast_on_peer_loss():
        summary = train(cfg, explicit)
    if summary["stopped_by"] is None and summary["step"] is not None and jax.process_index() == 0:
        flag = "" if cfg.out_dir == "out" else f" --out-dir {cfg.out_dir}"
        print(f"sample from it: python sample.py{flag}")
    return 0


def import_tensorboardx_without_torch():
    """Import tensorboardX as the command does: without torch, which it imports only to accept torch tensors
    (seconds at start-up; a run logs floats). A command may change the process: the library does not."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        return
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        import tensorboardX  # noqa: F401
    finally:
        del sys.modules["torch"]
