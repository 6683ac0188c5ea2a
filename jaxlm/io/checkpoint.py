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
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from ..config import GPTConfig
from ..errors import JaxlmError, disk_full
from ..lora import adapters as lora_lib
from ..model.gpt import param_shapes
from ..parallel.sharding import placed_shapes
from ..utils.files import read_json_object
from ..utils.publish import publishing

CHECKPOINT_FILE = "jaxlm.json"
FORMAT_VERSION = 1


class CheckpointError(JaxlmError):
    """A checkpoint directory that is missing, incomplete or does not match the model."""


def is_checkpoint(path) -> bool:
    return (Path(path) / CHECKPOINT_FILE).is_file()


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
    leader = jax.process_index() == 0
    try:
        with publishing(path, overwrite=True, shared=True, leader=leader) as tmp:
            _sync("jaxlm_save_mkdir")
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(tmp / "params", params)
                checkpointer.wait_until_finished()
                if adapters is not None:
                    checkpointer.save(tmp / "adapters", adapters)
                    checkpointer.wait_until_finished()
            if leader:
                meta = {
                    "format": "jaxlm",
                    "version": FORMAT_VERSION,
                    "config": config.to_dict(),
                    "tokenizer": tokenizer.to_spec() if tokenizer is not None else None,
                }
                if lora_meta is not None:
                    meta["lora"] = lora_meta
                (tmp / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    except Exception as e:
        if disk_full(e):  # the old checkpoint at `path` (if any) is untouched
            raise CheckpointError(f"cannot write {path}: {disk_full(e)}; free some space and save again") from None
        raise
    _sync("jaxlm_save_rename")
    return path


def read_meta(path) -> dict:
    path = Path(path)
    meta = read_json_object(
        path / CHECKPOINT_FILE,
        missing=f"{path} is not a jaxlm checkpoint: {CHECKPOINT_FILE} is missing",
        fix="re-create the checkpoint",
        error=CheckpointError,
    )
    if meta.get("format") != "jaxlm" or "config" not in meta:
        raise CheckpointError(f"{path / CHECKPOINT_FILE} is not a jaxlm checkpoint description")
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
        raise CheckpointError(f"{path / CHECKPOINT_FILE} holds an invalid LoRA config: {e}") from None
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
        raise CheckpointError(f"{path / CHECKPOINT_FILE} holds an invalid model config: {e}") from None


def restore_pytree(directory, abstract, shardings=None):
    """Restore a pytree written by Orbax onto `shardings` (default: the first local device)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is missing; the checkpoint is incomplete")
    target = placed_shapes(abstract, shardings)
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
