"""LoRA adapters for GPT-2: the config and target names, init, merge and count, and Hugging Face PEFT I/O.

`jaxlm.lora.init`, `.merge`, `.shapes`, `.logical_axes`, `.count`, `LoraConfig`; `jaxlm.lora.peft` reads and
writes PEFT adapter directories. The model adds the adapters' update itself (`jaxlm.model`); the LM loss
takes them as its trainable variables (`jaxlm.model.lm_loss(config, lora=...)`).
May import: jaxlm.errors, jaxlm.config, jaxlm.utils.
"""

from .adapters import (
    ALIASES,
    MODULES,
    LoraConfig,
    count,
    delta,
    describe,
    fingerprint,
    in_out,
    init,
    logical_axes,
    merge,
    normalize_targets,
    out_shape,
    shapes,
)
from .peft import AdapterError, check_adapter, load_adapter, read_adapter_config, save_adapter

__all__ = [
    "ALIASES",
    "MODULES",
    "AdapterError",
    "LoraConfig",
    "check_adapter",
    "count",
    "delta",
    "describe",
    "fingerprint",
    "in_out",
    "init",
    "load_adapter",
    "logical_axes",
    "merge",
    "normalize_targets",
    "out_shape",
    "read_adapter_config",
    "save_adapter",
    "shapes",
]
