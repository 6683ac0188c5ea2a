"""Training-run checkpoints: OUT_DIR/checkpoints is an Orbax CheckpointManager directory, one subdirectory per step
holding params, opt_state, progress (step, rng), frozen (when a run freezes part of the model and keeps it) and
meta (JSON: the configs, tokenizer, data, LoRA record). Orbax writes each step under a temporary name and renames
it when complete, so a run killed mid-save restarts from the previous step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from ..config import GPTConfig
from ..errors import JaxlmError
from ..lora import adapters as lora_lib
from ..model.gpt import param_shapes
from ..parallel.sharding import placed_shapes
from ..utils.tree import combine, partition
from .checkpoint import CheckpointError, _reason

RUN_ITEMS = ("params", "opt_state", "progress", "frozen", "meta")  # progress: step, rng; meta: JSON
RUN_FORMAT = "jaxlm-run"


def run_manager(directory, max_to_keep: int | None = None, *, read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` that saves asynchronously and keeps the last `max_to_keep` steps.

    `read_only`: one that creates, cleans and keeps nothing, for reading (jaxlm never saves through it). Not
    Orbax's own read_only option, which logs a warning each time a run is opened for loading.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep,
        create=not read_only,
        cleanup_tmp_directories=not read_only,  # leftovers of a save that was killed
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=RUN_ITEMS)


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
    target = placed_shapes(shapes, shardings)
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
    target = placed_shapes(shapes, shardings)
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
