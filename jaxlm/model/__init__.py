"""GPT-2 as a pure function of (params, tokens): the Linen modules, their layer math, attention, the LM loss.

Knows nothing of files, Hugging Face, Orbax or command lines.
May import: jaxlm.errors, jaxlm.config, jaxlm.cpu, jaxlm.kernels, jaxlm.lora, jaxlm.utils.
"""

from .gpt import GPT, Cache, cross_entropy, init_cache, init_params, layer_norm, logical_axes, param_shapes
from .loss import combine, lora_loss

__all__ = [
    "GPT",
    "Cache",
    "combine",
    "cross_entropy",
    "init_cache",
    "init_params",
    "layer_norm",
    "logical_axes",
    "lora_loss",
    "param_shapes",
]
