"""Orbax behind one small module: its API churns, so nothing else in jaxlm imports orbax.

A jaxlm checkpoint directory:
    jaxlm.json   {"format": "jaxlm", "version": 1, "config": GPTConfig fields, "tokenizer": spec|None,
                  "lora": {"config": LoraConfig fields, "base": {"source", "fingerprint"}} (with adapters only)}
    params/      the params pytree, written by Orbax (sharded arrays are written shard by shard);
                 with adapters: the frozen base they adapt
    adapters/    LoRA adapters (jaxlm.lora layout), when saved with them
It is written under a temporary name and renamed when complete, so a crash leaves no half checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from . import lora as lora_lib
from .config import GPTConfig
from .errors import JaxlmError, disk_full
from .heldstderr import HeldStderr
from .model import param_shapes
from .tree import combine, partition

META_FILE = "jaxlm.json"
FORMAT_VERSION = 1


class CheckpointError(JaxlmError):
    """A checkpoint directory that is missing, incomplete or does not match the model."""


def is_checkpoint(path) -> bool:
    return (Path(path) / META_FILE).is_file()


def save(
    path,
    config: GPTConfig,
    params,
    tokenizer=None,
    *,
    overwrite: bool = False,
    adapters=None,
    lora: lora_lib.LoraConfig | None = None,
    base_source: str | None = None,
) -> Path:
    """Write params + config (+ tokenizer spec) to `path` atomically; returns the final path.

    With `adapters` and their `lora` config, `params` is the base they adapt; `base_source` (e.g. "gpt2")
    and a fingerprint of the base weights are recorded, for PEFT's base_model_name_or_path and checks.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; choose another path or pass overwrite=True")
    if (adapters is None) != (lora is None):
        raise JaxlmError("save adapters together with their LoRA config: pass both adapters= and lora=")
    lora_meta = None
    if lora is not None:
        _check_adapters(config, lora, adapters, "adapters")
        lora_meta = {
            "config": lora.to_dict(),
            "base": {"source": base_source, "fingerprint": lora_lib.fingerprint(params)},
        }
    tmp = path.with_name(f".{path.name}.partial")
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _sync("jaxlm_save_mkdir")
    held = HeldStderr()
    try:
        with held:  # a failed Orbax write prints tracebacks from its threads; the user gets one line
            try:
                checkpointer = ocp.StandardCheckpointer()
                checkpointer.save(tmp / "params", params)
                checkpointer.wait_until_finished()
                if adapters is not None:
                    checkpointer.save(tmp / "adapters", adapters)
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
            if lora_meta is not None:
                meta["lora"] = lora_meta
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


def load_adapters(path, shardings=None):
    """(LoraConfig, adapters, {"source", "fingerprint"} of the base) of a checkpoint saved with adapters,
    or None when it holds none."""
    path = Path(path).absolute()
    meta = read_meta(path)
    if "lora" not in meta:
        return None
    config = _config(meta, path)
    try:
        lora = lora_lib.LoraConfig.from_dict(meta["lora"]["config"])
    except (JaxlmError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / META_FILE} holds an invalid LoRA config: {e}") from None
    adapters = restore_pytree(path / "adapters", lora_lib.shapes(config, lora), shardings)
    return lora, adapters, dict(meta["lora"].get("base") or {})


def _check_adapters(config: GPTConfig, lora, adapters, what: str):
    want = lora_lib.shapes(config, lora)
    got = jax.tree.map(lambda x: tuple(x.shape), adapters)
    if jax.tree.map(lambda s: tuple(s.shape), want) != got:
        raise JaxlmError(f"{what} do not match the LoRA config and model (rank {lora.rank}, {lora.targets})")


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


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# Training runs: OUT_DIR/checkpoints is an Orbax CheckpointManager directory, one subdirectory per step
# holding the items below. Orbax writes each step under a temporary name and renames it when complete,
# so a run killed mid-save restarts from the previous step.

RUN_ITEMS = ("params", "opt_state", "progress", "frozen", "meta")  # progress: step, rng; meta: JSON
RUN_FORMAT = "jaxlm-run"


class _QuietFailedSaves(logging.Filter):
    """Drop the tracebacks Orbax logs for a failed background save: the same error is re-raised to the caller
    at the next save or wait, which reports it (as one line when the disk is full)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and "orbax" in record.pathname)


_quiet_failed_saves = _QuietFailedSaves()


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
    absl_logger.addFilter(_quiet_failed_saves)  # once: adding the same filter again is a no-op
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns that a read-only manager is read-only
    try:
        return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=RUN_ITEMS)
    finally:
        absl_logger.setLevel(level)


def open_run(run_dir, max_to_keep: int | None = None, *, read_only: bool = False) -> ocp.CheckpointManager:
    """The checkpoint manager of a training run directory (the one place that opens one)."""
    ckpt = Path(run_dir) / "checkpoints"
    if read_only and not ckpt.is_dir():
        raise JaxlmError(f"{run_dir} holds no checkpoints/; it is not a training run")
    return run_manager(ckpt, max_to_keep, read_only=read_only)


def save_run_step(manager: ocp.CheckpointManager, step: int, trees: dict, meta: dict):
    """Start writing `trees` (params, opt_state, progress[, frozen]) and `meta` as `step`; returns before the
    write ends."""
    items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)), force=True)


# Out of space: Orbax's async write fails in a background thread and re-raises at the next save or wait, as a
# ValueError carrying tensorstore's text ("... [os_error_code='28']"); a metrics write fails as an OSError.
def out_of_space(run_dir, reason: str) -> CheckpointError:
    """The error a run ends with when its disk is full: partial saves removed, the last complete step named."""
    ckpt = Path(run_dir) / "checkpoints"
    failed = sorted(p.name.split(".")[0] for p in ckpt.glob(f"*{ocp.utils.TMP_DIR_SUFFIX}*")) if ckpt.is_dir() else []
    if jax.process_index() == 0:
        for p in ckpt.glob(f"*{ocp.utils.TMP_DIR_SUFFIX}*") if ckpt.is_dir() else ():
            shutil.rmtree(p, ignore_errors=True)  # frees what it took; resume would ignore it anyway
    found = latest_run_meta(run_dir) if ckpt.is_dir() else None
    what = f"checkpoint step {', '.join(failed)}" if failed else "run files"
    last = f"the last complete checkpoint is step {found[0]}" if found else "no checkpoint is complete yet"
    why = reason if "no space left" in reason else f"no space left ({reason})"
    return CheckpointError(
        f"cannot write the {what} in {run_dir}: {why}; free space, then continue with --init-from resume; {last}"
    )


def latest_run_meta(run_dir, step: int | None = None) -> tuple[int, dict] | None:
    """(step, meta) of a run's latest (or given) complete checkpoint; None when it has none."""
    if not (Path(run_dir) / "checkpoints").is_dir():
        return None
    manager = open_run(run_dir, read_only=True)
    try:
        step = manager.latest_step() if step is None else step
        return None if step is None else (step, restore_run_step(manager, step)["meta"])
    finally:
        manager.close()


def restore_run(run_dir, step: int, abstract: dict) -> dict:
    """The items named in `abstract` (plus "meta") of a run's checkpoint `step`."""
    manager = open_run(run_dir, read_only=True)
    try:
        return restore_run_step(manager, step, abstract)
    finally:
        manager.close()


def read_run_config(run_dir) -> GPTConfig:
    """The GPTConfig of a training run's latest checkpoint (its JSON meta; no arrays are read)."""
    return GPTConfig.from_dict(_run_meta_or_error(run_dir)[1]["model"])


def load_run(run_dir, shardings=None, step: int | None = None):
    """(GPTConfig, params, tokenizer_spec) of a training run's latest (or given) checkpoint.

    `shardings` (a pytree matching the params) places arrays as they are read (default: the first device).
    """
    step, meta = _run_meta_or_error(run_dir, step)
    if "lora" in meta:
        raise JaxlmError(
            f"{run_dir} is a LoRA run (its checkpoints hold adapters, not the base); load it merged with "
            "jaxlm.load(RUN), or its adapters with load_run_adapters"
        )
    config = GPTConfig.from_dict(meta["model"])
    shapes = param_shapes(config)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    frozen_paths = set(meta.get("frozen_paths", ()))
    trainable, frozen = partition(target, lambda path: path not in frozen_paths)
    r = restore_run(run_dir, step, {"params": trainable, **({"frozen": frozen} if frozen else {})})
    return config, combine(r["params"], r.get("frozen", {})), meta.get("tokenizer")


def load_run_adapters(run_dir, shardings=None, step: int | None = None):
    """(GPTConfig, LoraConfig, adapters, {"source", "fingerprint"} of the base, tokenizer_spec) of a LoRA
    run's latest (or given) checkpoint; None for a run that trained the model's own params."""
    step, meta = _run_meta_or_error(run_dir, step)
    if "lora" not in meta:
        return None
    config = GPTConfig.from_dict(meta["model"])
    try:
        lora = lora_lib.LoraConfig.from_dict(meta["lora"]["config"])
    except (JaxlmError, KeyError, TypeError) as e:
        raise CheckpointError(f"{run_dir} records an invalid LoRA config: {e}") from None
    shapes = lora_lib.shapes(config, lora)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    adapters = restore_run(run_dir, step, {"params": target})["params"]
    return config, lora, adapters, dict(meta["lora"].get("base") or {}), meta.get("tokenizer")


def _run_meta_or_error(run_dir, step: int | None = None) -> tuple[int, dict]:
    if not (Path(run_dir) / "checkpoints").is_dir():
        raise JaxlmError(f"{run_dir} holds no checkpoints/; it is not a training run")
    found = latest_run_meta(run_dir, step)
    if found is None:
        raise JaxlmError(f"{run_dir} holds no complete checkpoint yet; train longer or pick another run")
    return found


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
