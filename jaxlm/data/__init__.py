"""Training data: text as token windows, prompt/completion examples with loss masks, prompt templates, the
readers of raw text and JSONL files, and `python -m jaxlm.data prepare`.

May import: jaxlm.errors, jaxlm.config, jaxlm.tokenizer, jaxlm.utils, jaxlm.cli.
"""

from .sft import SFTData
from .tokens import BUILTIN, TokenData, bundled_shakespeare, get_batch, open_dataset, prepare, resolve_dataset

__all__ = [
    "BUILTIN",
    "SFTData",
    "TokenData",
    "bundled_shakespeare",
    "get_batch",
    "open_dataset",
    "prepare",
    "resolve_dataset",
]
