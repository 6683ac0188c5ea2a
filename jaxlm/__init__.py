"""jaxlm: GPT-2 in JAX/Flax. The public API (every name here is documented in docs/python-api.md)."""

from . import eval, lora
from .config import PRESETS, TRAIN_PRESETS, GPTConfig, TrainConfig
from .cpu import native
from .errors import JaxlmError
from .generation.generator import GenerateStats, Generator, generate
from .io.hf import to_hf
from .io.load import load, load_lora, load_with_tokenizer, save
from .io.runs import load_run
from .lora import LoraConfig, load_adapter, save_adapter
from .model import GPT, cross_entropy, init_cache, init_params, logical_axes
from .model.loss import lora_loss
from .model.loss import lora_variables as lora_combine
from .tokenizer import CharTokenizer, GPT2Tokenizer, get_tokenizer

__all__ = [
    "GPT",
    "GPTConfig",
    "PRESETS",
    "TRAIN_PRESETS",
    "TrainConfig",
    "CharTokenizer",
    "GPT2Tokenizer",
    "GenerateStats",
    "Generator",
    "JaxlmError",
    "LoraConfig",
    "cross_entropy",
    "eval",
    "generate",
    "get_tokenizer",
    "init_cache",
    "init_params",
    "load",
    "load_adapter",
    "load_lora",
    "load_run",
    "load_with_tokenizer",
    "logical_axes",
    "lora",
    "native",
    "lora_combine",
    "lora_loss",
    "save",
    "save_adapter",
    "to_hf",
]
