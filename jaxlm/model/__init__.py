"""GPT-2 as a pure function of (params, tokens): the Linen modules, their layer math, attention, the LM loss.

Knows nothing of files, Hugging Face, Orbax or command lines.
May import: jaxlm.errors, jaxlm.config, jaxlm.utils, jaxlm.cpu, jaxlm.kernels, jaxlm.lora.
"""

from .gpt import GPT, Cache, init_cache, init_params, layer_norm, logical_axes, param_shapes
from .loss import cross_entropy, lm_loss, lora_loss, lora_variables, params_variables

__all__ = [
    "GPT",
    "Cache",
    "cross_entropy",
    "init_cache",
    "init_params",
    "layer_norm",
    "lm_loss",
    "logical_axes",
    "lora_loss",
    "lora_variables",
    "param_shapes",
    "params_variables",
]
