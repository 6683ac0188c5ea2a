"""Orbax behind one small module: its API churns, so nothing else in jaxlm imports orbax.

A jaxlm checkpoint directory:
    jaxlm.json   {"format": "jaxlm", "version": 1, "config": GPTConfig fields, "tokenizer": spec|None}
    params/      the params pytree, written by Orbax (sharded arrays are written shard by shard)
It is written under a temporary name and renamed when complete, so a crash leaves no half checkpoint.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from .config import GPTConfig
from .errors import JaxlmError, disk_full
from .model import param_shapes

META_FILE = "jaxlm.json"
FORMAT_VERSION = 1


class CheckpointError(JaxlmError):
    """A checkpoint directory that is missing, incomplete or does not match the model."""


def is_checkpoint(path) -> bool:
    return (Path(path) / META_FILE).is_file()


def save(path, config: GPTConfig, params, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Write params + config (+ tokenizer spec) to `path` atomically; returns the final path."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; choose another path or pass overwrite=True")
    tmp = path.with_name(f".{path.name}.partial")
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _sync("jaxlm_save_mkdir")
    held = _HeldStderr()
    try:
        with held:  # a failed Orbax write prints tracebacks from its threads; the user gets one line
            try:
                checkpointer = ocp.StandardCheckpointer()
                checkpointer.save(tmp / "params", params)
                checkpointer.wait_until_finished()
            except BaseException:
                checkpointer.close()
                held.settle()
                raise
        if jax.process_index() == 0:
            meta = {
                "format": "jaxlm",
                "version": FORMAT_VERSION,
                "config": config.to_dict(),
                "tokenizer": tokenizer.to_spec() if tokenizer is not None else None,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    except BaseException as e:
        if jax.process_index() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):  # the old checkpoint at `path` (if any) is untouched
            raise CheckpointError(f"cannot write {path}: {disk_full(e)}; free some space and save again") from None
        held.replay()  # any other failure keeps Orbax's diagnostics
        raise
    held.replay()
    if jax.process_index() == 0:
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    _sync("jaxlm_save_rename")
    return path


def read_meta(path) -> dict:
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a jaxlm checkpoint: {META_FILE} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file} is corrupt ({e}); re-create the checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != "jaxlm" or "config" not in meta:
        raise CheckpointError(f"{meta_file} is not a jaxlm checkpoint description")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer jaxlm (format {meta['version']}); upgrade jaxlm")
    return meta


def load(path, shardings=None):
    """Read (config, params, tokenizer_spec) from a jaxlm checkpoint directory.

    `shardings`: optional pytree of `jax.sharding.Sharding` matching params; arrays are then
    restored straight onto those devices (a checkpoint written on one mesh restores onto another).
    """
    path = Path(path).absolute()
    meta = read_meta(path)
    config = _config(meta, path)
    params = restore_pytree(path / "params", param_shapes(config), shardings)
    return config, params, meta.get("tokenizer")


def read_config(path) -> GPTConfig:
    """The GPTConfig of a jaxlm checkpoint directory (its jaxlm.json; the params are not read)."""
    path = Path(path).absolute()
    return _config(read_meta(path), path)


def _config(meta: dict, path: Path) -> GPTConfig:
    try:
        return GPTConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / META_FILE} holds an invalid model config: {e}") from None


def restore_pytree(directory, abstract, shardings=None):
    """Restore a pytree written by Orbax onto `shardings` (default: the first local device)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is missing; the checkpoint is incomplete")
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    try:
        return ocp.StandardCheckpointer().restore(directory, target)
    except Exception as e:  # TensorStore reports a missing or truncated array file as a bare Exception
        raise CheckpointError(
            f"cannot restore {directory}: {_reason(e)}; the checkpoint is corrupt or does not match its config "
            "(re-create it, or restore it from a copy)"
        ) from None


def _reason(e: BaseException) -> str:
    """One short line from an Orbax/TensorStore error: the innermost cause (which names the array and
    what is wrong with its file), without TensorStore's multi-kilobyte spec dumps."""
    while (e.__cause__ or e.__context__) is not None and "TensorStore" in str(e):
        e = e.__cause__ or e.__context__
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    msg = msg.split(" [tensorstore_spec")[0].split(" See full TensorStore details")[0]
    return msg if len(msg) <= 300 else msg[:300] + "..."


class _QuietDiskFull(logging.Filter):
    """asyncio logs Orbax's failed write tasks when they are collected, possibly at exit, after
    the save has already reported the full disk in one line: drop those records only."""

    def filter(self, record):
        return not (record.exc_info and record.exc_info[1] is not None and disk_full(record.exc_info[1]))


logging.getLogger("asyncio").addFilter(_QuietDiskFull())


class _Stamped(io.StringIO):
    def __init__(self, held):
        super().__init__()
        self.held = held

    def write(self, text):
        self.held.last = time.monotonic()
        return super().write(text)


class _HeldStderr:
    """Holds what is written to file descriptor 2 (Python and C++ alike) in memory while active;
    `replay()` writes it out. A pipe drained by a thread, not a file: the disk may be the thing that is full."""

    def __enter__(self):
        self.data, self.saved, self.reader = bytearray(), None, None
        self.threads = set(threading.enumerate())
        sys.stderr.flush()
        self.last = time.monotonic()
        self.py, sys.stderr = sys.stderr, _Stamped(self)  # Python's writes, also where sys.stderr is not fd 2
        self.hook, sys.unraisablehook = sys.unraisablehook, self._unraisable  # errors in TensorStore callbacks
        try:
            self.saved = os.dup(2)
        except (OSError, ValueError):  # no usable fd 2: hold nothing
            return self
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self.reader = threading.Thread(target=self._drain, args=(read_fd,), daemon=True)
        self.reader.start()
        return self

    def _unraisable(self, u):
        sys.stderr.write("".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))

    def _drain(self, fd):
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read1(65536):
                self.data += chunk
                self.last = time.monotonic()

    def settle(self, timeout: float = 5.0):
        """After a failure: let the writer's threads end (they print as they die), collect its
        failed asyncio tasks (logged when collected), all while still held."""
        deadline = time.monotonic() + timeout
        for t in set(threading.enumerate()) - self.threads - {self.reader}:
            t.join(max(0.0, deadline - time.monotonic()))
        gc.collect()
        # TensorStore's late callbacks still print into a closed event loop: wait for a quiet half second.
        while time.monotonic() - self.last < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)

    def __exit__(self, *exc):
        held_py, sys.stderr, sys.unraisablehook = sys.stderr, self.py, self.hook
        self.data += held_py.getvalue().encode()
        if self.saved is not None:
            sys.stderr.flush()
            os.dup2(self.saved, 2)  # closes the pipe's last write end: the reader sees EOF
            os.close(self.saved)
            if self.reader is not None:
                self.reader.join(timeout=5)
            self.saved = None

    def replay(self):
        if self.data:
            sys.stderr.write(self.data.decode(errors="replace"))
            sys.stderr.flush()
            self.data = bytearray()


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# Training runs: OUT_DIR/checkpoints is an Orbax CheckpointManager directory, one subdirectory per step
# holding the items below. Orbax writes each step under a temporary name and renames it when complete,
# so a run killed mid-save restarts from the previous step.

RUN_ITEMS = ("params", "opt_state", "progress", "meta")  # progress: step, rng; meta: JSON (configs, tokenizer)


def run_manager(directory, max_to_keep: int | None = None, *, read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` that saves asynchronously and keeps the last `max_to_keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep,
        save_interval_steps=0 if read_only else 1,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,  # leftovers of a save that was killed
        enable_async_checkpointing=True,
    )
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns that a read-only manager is read-only
    try:
        return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=RUN_ITEMS)
    finally:
        absl_logger.setLevel(level)


def save_run_step(manager: ocp.CheckpointManager, step: int, trees: dict, meta: dict):
    """Start writing `trees` (params, opt_state, progress) and `meta` as `step`; returns before the write ends."""
    items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)), force=True)


def read_run_config(run_dir) -> GPTConfig:
    """The GPTConfig of a training run's latest checkpoint (its JSON meta; no arrays are read)."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints").is_dir():
        raise JaxlmError(f"{run_dir} holds no checkpoints/; it is not a training run")
    manager = run_manager(run_dir / "checkpoints", read_only=True)
    try:
        step = manager.latest_step()
        if step is None:
            raise JaxlmError(f"{run_dir} holds no complete checkpoint yet; train longer or pick another run")
        meta = restore_run_step(manager, step)["meta"]
    finally:
        manager.close()
    return GPTConfig.from_dict(meta["model"])


def restore_run_step(manager: ocp.CheckpointManager, step: int, abstract: dict | None = None) -> dict:
    """{"meta": dict, plus the items named in `abstract`} of `step`; `abstract` maps item names to pytrees of
    ShapeDtypeStructs carrying the target shardings."""
    items = {name: ocp.args.StandardRestore(tree) for name, tree in (abstract or {}).items()}
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonRestore()))
    except Exception as e:  # TensorStore reports a missing or truncated array file as a bare Exception
        raise CheckpointError(
            f"cannot restore step {step} from {manager.directory}: {_reason(e)}; the checkpoint is corrupt or "
            "does not match this model"
        ) from None
    return {name: restored[name] for name in (*items, "meta")}
