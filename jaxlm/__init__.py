"""jaxlm: GPT-2 in JAX/Flax. The public API."""

from . import eval  # jaxlm.eval.wikitext2, .lambada, .hellaswag
from .config import PRESETS, TRAIN_PRESETS, GPTConfig, TrainConfig
from .errors import JaxlmError
from .generate import GenerateStats, Generator, generate
from .hf import to_hf
from .loader import load, load_with_tokenizer, save
from .model import GPT, cross_entropy, init_cache, init_params, logical_axes
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
    "cross_entropy",
    "eval",
    "generate",
    "get_tokenizer",
    "init_cache",
    "init_params",
    "load",
    "load_run",
    "load_with_tokenizer",
    "logical_axes",
    "save",
    "to_hf",
    "train",
]


def __getattr__(name):
    # Imported on first use: importing the trainer (and with it jaxlm.data) here would make
    # `python -m jaxlm.data` warn that the module was imported before it ran.
    if name in ("train", "load_run"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'jaxlm' has no attribute {name!r}")
