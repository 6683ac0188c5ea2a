"""`load(source)`: one entry point for HF hub ids, HF directories and jaxlm checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import jax
from jax.sharding import PartitionSpec as P

from ..errors import JaxlmError
from ..lora import adapters as lora
from ..lora import peft as peft_io
from ..model.gpt import crop_context
from . import checkpoint, hf, runs

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve(source) -> tuple[str, Path]:
    """Classify a source as ("jaxlm" | "hf" | "run", local path), downloading hub ids."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise JaxlmError(f"{path} is a file; pass a model directory, a run directory or a hub id")
        if checkpoint.is_checkpoint(path):
            return "jaxlm", path
        if hf.is_hf_dir(path):
            return "hf", path
        if (path / "checkpoints").is_dir():
            return "run", path
        raise JaxlmError(
            f"{path} holds neither a jaxlm checkpoint (jaxlm.json), an HF model (config.json) "
            "nor a training run (checkpoints/)"
        )
    if str(source).startswith((".", "/", "~")) or str(source).count("/") > 1 or not _HUB_ID.match(str(source)):
        raise JaxlmError(f"{source}: no such directory (and not a Hugging Face hub id)")
    return "hf", hf.download(str(source))


def load(source, *, adapter=None, shardings=None, progress=None, **config_overrides):
    """(config, params) from a hub id (`gpt2`, `gpt2-medium`, ..., `user/repo`), a local HF
    directory (config.json + model.safetensors), a jaxlm checkpoint or a training run directory.

    `adapter`: a PEFT LoRA adapter directory for this base, merged into the params (W + s A B); a jaxlm
    checkpoint saved with adapters is merged too. Unmerged: `jaxlm.load_adapter(DIR, config)`.
    `config_overrides` set how the model computes (dtype, param_dtype, scan_layers, remat, dropout);
    `shardings` places params onto devices as they are read (default: the first device).
    """
    config, params, _ = load_with_tokenizer(
        source, adapter=adapter, shardings=shardings, progress=progress, **config_overrides
    )
    return config, params


def load_with_tokenizer(source, *, adapter=None, shardings=None, progress=None, **config_overrides):
    """Like `load`, plus the tokenizer spec stored with the model (GPT-2 BPE for HF models)."""
    config, params, tok, adapted = _load_base(source, shardings, progress, config_overrides)
    if adapted is not None and adapter is not None:
        raise JaxlmError(f"{source} already carries LoRA adapters; drop --adapter or load its base instead")
    if adapter is not None:
        lora_config, adapters = peft_io.load_adapter(adapter, config)
        adapted = lora_config, adapters
    if adapted is not None:
        params = _merge(params, *adapted, shardings)
    return config, params, tok


def _merge(base, lora_config, adapters, shardings):
    if shardings is None:
        adapters = jax.tree.map(jax.numpy.asarray, adapters)
        return jax.jit(lora.merge, static_argnums=2)(base, adapters, lora_config)
    adapters = jax.device_put(adapters, jax.sharding.NamedSharding(jax.tree.leaves(shardings)[0].mesh, P()))
    return jax.jit(lora.merge, static_argnums=2, out_shardings=shardings)(base, adapters, lora_config)


def _load_base(source, shardings, progress, config_overrides):
    """(config, params, tokenizer spec, (LoraConfig, adapters) stored with a jaxlm checkpoint or None)."""
    kind, path = resolve(source)
    if kind == "hf":
        config, params = hf.load_hf_dir(path, progress=progress, **config_overrides)
        params = _place(params, shardings)
        return config, params, {"kind": "gpt2"}, None
    adapted = None
    if kind == "run":
        stored = runs.load_run_adapters(path)
        if stored is None:
            config, params, tok = runs.load_run(path, shardings=shardings)
        else:  # a LoRA run: its base, reloaded from where it came from, and its adapters
            config, lora_config, adapters, base, tok = stored
            params = load_lora_base(base, config, shardings, run=path)
            adapted = lora_config, adapters
    else:
        config, params, tok = checkpoint.load(path, shardings=shardings)
        stored = checkpoint.load_adapters(path)
        adapted = None if stored is None else stored[:2]
    if config_overrides:
        config = config.replace(**config_overrides)
        params = jax.tree.map(lambda x: x.astype(config.param_dtype), params)
    return config, params, tok, adapted


def lora_base_record(source, params) -> dict:
    """What a LoRA run records of its frozen base: where it came from and a fingerprint of its weights."""
    path = Path(source).expanduser()
    return {"source": str(path.resolve()) if path.exists() else str(source), "fingerprint": lora.fingerprint(params)}


def load_lora_base(record: dict, config, shardings=None, *, run=None):
    """The frozen base params of a LoRA run (`config`: the run's model), reloaded from `record["source"]` and
    checked against `record["fingerprint"]`: adapters trained on other weights would be silently wrong."""
    source, want = record.get("source"), record.get("fingerprint")
    what = f"the LoRA run {run}" if run is not None else "the LoRA run"
    if not source:
        raise JaxlmError(f"{what} records no base source; it cannot be loaded")
    try:
        base_config, params, _ = load_with_tokenizer(source)
    except JaxlmError as e:
        raise JaxlmError(f"{what}: its base {source} cannot be loaded ({e})") from None
    if base_config.block_size > config.block_size:  # the run cropped the positions (--block-size)
        base_config, params = crop_context(base_config, params, config.block_size)
    if base_config.architecture() != config.architecture():
        raise JaxlmError(
            f"{what} was trained on a base of another shape ({config.arch_summary()}) than {source} holds now "
            f"({base_config.arch_summary()})"
        )
    params = jax.tree.map(lambda x: jax.numpy.asarray(x, config.param_dtype), params)
    got = lora.fingerprint(params)
    if want is not None and got is not None and got != want:
        raise JaxlmError(
            f"{what} was trained on other base weights than {source} holds now (fingerprint {want[:12]} recorded, "
            f"{got[:12]} found); restore the base it was trained on, or start a new run from this one"
        )
    return _place(params, shardings)


def read_config(source, **config_overrides):
    """The GPTConfig of `source` (as `load` takes it) without reading the weights: e.g. to build the
    `shardings` to load it with. A hub id is downloaded (then cached)."""
    kind, path = resolve(source)
    if kind == "hf":
        return hf.read_config(path, **config_overrides)
    config = runs.read_run_config(path) if kind == "run" else checkpoint.read_config(path)
    return config.replace(**config_overrides) if config_overrides else config


def _place(params, shardings):
    if shardings is None:
        return jax.tree.map(jax.numpy.asarray, params)
    return jax.tree.map(jax.device_put, params, shardings)


def save(
    path, config, params, tokenizer=None, *, overwrite: bool = False, adapters=None, lora=None, base_source=None
) -> Path:
    """A jaxlm checkpoint directory (Orbax params + config JSON); `load(path)` needs nothing else.

    With `adapters` and their `lora` (LoraConfig), `params` is the base: `load(path)` gives the merged params,
    `python -m jaxlm.convert path OUT --to peft` the PEFT adapter; `base_source` names the base (e.g. gpt2).
    """
    return checkpoint.save(
        path, config, params, tokenizer, overwrite=overwrite, adapters=adapters, lora=lora, base_source=base_source
    )


def load_lora(source):
    """(config, base params, LoraConfig, adapters, {"source", "fingerprint"} of the base), unmerged, from a
    jaxlm checkpoint saved with adapters or a LoRA training run."""
    kind, path = resolve(source)
    if kind == "run":
        stored = runs.load_run_adapters(path)
        if stored is not None:
            config, lora_config, adapters, base, _ = stored
            return config, load_lora_base(base, config, run=path), lora_config, adapters, base
    stored = checkpoint.load_adapters(path) if kind == "jaxlm" else None
    if stored is None:
        raise JaxlmError(
            f"{source} holds no LoRA adapters; train with --lora-rank or save a checkpoint with "
            "jaxlm.save(..., adapters=, lora=)"
        )
    config, params, _ = checkpoint.load(path)
    return (config, params, *stored)
