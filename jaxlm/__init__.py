"""jaxlm: GPT-2 in JAX/Flax. The public API."""

from . import eval, lora, native  # jaxlm.eval (wikitext2, lambada, hellaswag, tasks), jaxlm.lora, jaxlm.native
from .checkpoint import load_run
from .config import PRESETS, TRAIN_PRESETS, GPTConfig, TrainConfig
from .errors import JaxlmError
from .generate import GenerateStats, Generator, generate
from .hf import to_hf
from .loader import load, load_lora, load_with_tokenizer, save
from .lora import LoraConfig
from .lora_loss import combine as lora_combine
from .lora_loss import lora_loss
from .model import GPT, cross_entropy, init_cache, init_params, logical_axes
from .peft_io import load_adapter, save_adapter
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
