"""Hugging Face PEFT LoRA adapters for GPT-2 <-> jaxlm adapters, both ways, without importing peft.

A PEFT adapter directory is `adapter_config.json` + `adapter_model.safetensors` with, per layer i and module,
`base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]
(torch Linear layout; GPT-2's Conv1D makes PEFT set fan_in_fan_out). jaxlm keeps A as [L, in, r] and B as
[L, r, *out] (Flax kernel layout), so conversion is a transpose and a stack. Whatever PEFT option would
change the math and jaxlm does not implement is refused by name, never ignored.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..config import GPTConfig
from ..errors import JaxlmError
from ..utils.files import read_json_object
from ..utils.publish import publishing
from .adapters import MODULES, LoraConfig, in_out, out_shape

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model.transformer."
_KEY = re.compile(
    r"^base_model\.model\.transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_([AB])\.weight$"
)
_PEFT_NAME = {"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}
_TARGET = {v: k for k, v in _PEFT_NAME.items()}

# adapter_config.json fields whose non-default values change what the adapter computes; jaxlm refuses them.
_UNSUPPORTED = {
    "use_dora": (False, "DoRA (use_dora)"),
    "modules_to_save": (None, "modules_to_save (fully trained extra modules)"),
    "layers_to_transform": (None, "layers_to_transform (adapters on some layers only)"),
    "layers_pattern": (None, "layers_pattern"),
    "rank_pattern": ({}, "rank_pattern (per-module ranks)"),
    "alpha_pattern": ({}, "alpha_pattern (per-module alphas)"),
    "lora_bias": (False, "lora_bias"),
    "use_qalora": (False, "QA-LoRA (use_qalora)"),
    "layer_replication": (None, "layer_replication"),
    "target_parameters": (None, "target_parameters"),
    "trainable_token_indices": (None, "trainable_token_indices"),
    "alora_invocation_tokens": (None, "aLoRA (alora_invocation_tokens)"),
    "megatron_config": (None, "megatron_config"),
    "use_bdlora": (None, "use_bdlora"),
    "arrow_config": (None, "arrow_config"),
    "kasa_config": (None, "kasa_config"),
    "velora_config": (None, "velora_config"),
    "monteclora_config": (None, "monteclora_config"),
}
# init_lora_weights values that also rewrite the base weights (PiSSA, OLoRA, ...) or add a variant (MiCA).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


class AdapterError(JaxlmError):
    """A PEFT adapter directory jaxlm cannot read, or one for another model."""


def save_adapter(out_dir, config: GPTConfig, lora: LoraConfig, adapters, base_source: str | None = None) -> Path:
    """Write a PEFT adapter directory atomically; `PeftModel.from_pretrained(base, out_dir)` loads it."""
    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise JaxlmError(f"{out} already exists and is not empty; choose a new output directory")
    tensors: dict[str, np.ndarray] = {}
    for target in lora.targets:
        block, name = MODULES[target]
        ab = adapters["h"][block][name]
        a_LxIxR = np.asarray(jax.device_get(ab["lora_a"]), np.float32)
        b_LxRxO = np.asarray(jax.device_get(ab["lora_b"]), np.float32).reshape(config.n_layer, lora.rank, -1)
        for i in range(config.n_layer):
            key = f"{_PREFIX}h.{i}.{_PEFT_NAME[target]}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a_LxIxR[i].T)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b_LxRxO[i].T)
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_source,
        "revision": None,
        "inference_mode": True,
        "r": lora.rank,
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.rslora,
        "target_modules": list(lora.targets),
        "fan_in_fan_out": True,
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    with publishing(out) as tmp:  # an empty `out` is replaced; anything else was refused above
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    return out


def read_adapter_config(adapter_dir) -> dict:
    path = Path(adapter_dir)
    if not path.is_dir():
        raise AdapterError(f"adapter {path}: no such directory; pass a PEFT adapter directory (save_pretrained)")
    return read_json_object(
        path / CONFIG_FILE,
        missing=f"{path} has no {CONFIG_FILE}; it is not a PEFT adapter directory",
        fix="re-save the adapter",
        error=AdapterError,
    )


def check_adapter(adapter_dir) -> dict:
    """Its adapter_config.json, if jaxlm implements every option it sets (fails fast, before any weights)."""
    cfg = read_adapter_config(adapter_dir)
    _check_options(cfg, Path(adapter_dir))
    return cfg


def load_adapter(adapter_dir, config: GPTConfig) -> tuple[LoraConfig, dict]:
    """(LoraConfig, adapters) from a PEFT LoRA adapter directory, checked against the base model's config.

    The adapters stay unmerged (float32, numpy): pass them to `lora.merge` or train them further.
    """
    path = Path(adapter_dir)
    cfg = check_adapter(path)
    tensors = _read_tensors(path)
    where = f"adapter {path}"
    base = cfg.get("base_model_name_or_path")
    for_base = f" (made for {base})" if base else ""

    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, x in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise AdapterError(
                f"{where}: unexpected tensor {key}{for_base}; jaxlm reads LoRA adapters for GPT-2 "
                "(GPT2LMHeadModel) modules c_attn, c_proj and c_fc only"
            )
        i, module, ab = int(m.group(1)), _TARGET[m.group(2)], m.group(3)
        if i >= config.n_layer:
            raise AdapterError(f"{where}: has layer {i} but the base model has {config.n_layer} layers{for_base}")
        found.setdefault(module, {}).setdefault(i, {})[ab] = x
    if not found:
        raise AdapterError(f"{where}: holds no LoRA weights for GPT-2 modules{for_base}")

    rank = cfg.get("r")
    targets = tuple(t for t in MODULES if t in found)
    try:
        lora = LoraConfig(
            rank=rank,
            alpha=cfg.get("lora_alpha", 8),
            dropout=float(cfg.get("lora_dropout") or 0.0),
            targets=targets,
            rslora=bool(cfg.get("use_rslora", False)),
        ).check(config)
    except JaxlmError as e:
        raise AdapterError(f"{path / CONFIG_FILE}: {e}") from None

    adapters: dict = {"h": {}}
    for t in targets:
        layers = found[t]
        d_in, d_out = in_out(config, t)
        for i in sorted(layers):
            for ab, want in (("A", (rank, d_in)), ("B", (d_out, rank))):
                if ab not in layers[i]:
                    continue
                got = layers[i][ab].shape
                if got != want:
                    raise AdapterError(
                        f"{where}: {_PEFT_NAME[t]} layer {i} lora_{ab} has shape {list(got)} but this base model "
                        f"with r={rank} needs {list(want)}{for_base}; the adapter is for another model shape"
                    )
        missing = [i for i in range(config.n_layer) if set(layers.get(i, {})) != {"A", "B"}]
        if missing:
            raise AdapterError(
                f"{where}: {_PEFT_NAME[t]} lacks lora_A/lora_B in layers {missing[:5]}; jaxlm adapts every "
                "layer (adapters on some layers only are not supported)"
            )
        a_LxIxR = np.stack([layers[i]["A"].T for i in range(config.n_layer)]).astype(np.float32)
        b_LxRxO = np.stack([layers[i]["B"].T for i in range(config.n_layer)]).astype(np.float32)
        block, name = MODULES[t]
        adapters["h"].setdefault(block, {})[name] = {
            "lora_a": a_LxIxR,
            "lora_b": b_LxRxO.reshape(config.n_layer, rank, *out_shape(config, t)),
        }
    return lora, adapters


def _check_options(cfg: dict, path: Path):
    where = path / CONFIG_FILE
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise AdapterError(f"{where}: peft_type {kind!r} is not supported; jaxlm reads LoRA adapters (LORA) only")
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise AdapterError(f"{where}: bias={bias!r} is not supported by jaxlm (biases stay frozen: bias='none')")
    for key, (default, what) in _UNSUPPORTED.items():
        value = cfg.get(key, default)
        if value not in (default, None, {}, [], False):
            raise AdapterError(f"{where}: {what} = {value!r} is not supported by jaxlm")
    init = cfg.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise AdapterError(
            f"{where}: init_lora_weights={init!r} is not supported by jaxlm (it changes the base weights or "
            "adds a variant); convert the adapter to plain LoRA first"
        )
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise AdapterError(f"{where}: r={rank!r} must be an integer")


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    f = path / WEIGHTS_FILE
    if not f.is_file():
        pickles = [p.name for p in path.glob("*.bin")]
        hint = f" (found {pickles[0]}: jaxlm never loads pickled weights)" if pickles else ""
        raise AdapterError(
            f"{path} has no {WEIGHTS_FILE}{hint}; re-save it with save_pretrained(safe_serialization=True)"
        )
    try:
        with safe_open(str(f), framework="np") as sf:
            return {k: sf.get_tensor(k) for k in sf.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"cannot read {f}: {str(e).splitlines()[0]}; the adapter file is corrupt") from None
