"""The LM loss: next-token cross-entropy, optionally masked, as the one function the train and eval steps take.

`lm_loss(config, lora=None)` returns `loss_fn(trainable, frozen, batch, rng) -> (loss, {"tokens": n})`: the
step differentiates `trainable` only and passes `frozen` through (nanodo's seam). Which params are which is
the loss's business: without LoRA the two are parts of one params tree (everything trains unless the caller
froze a part; `frozen` may be {}); with LoRA, `trainable` are the adapters and `frozen` the base params,
which the model reads in place (`lora_variables`): no merge, no copy, no gradients for the base.
`batch` has `tokens` int32 [B, T+1] and `mask` float32 [B, T] or None (1 where a target counts); `rng` is the
dropout key, or None for evaluation (dropout off); "tokens" is the number of targets counted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import GPTConfig
from ..kernels import PORTABLE, Kernels
from ..lora.adapters import LoraConfig
from ..utils.tree import combine
from .gpt import GPT


def cross_entropy(logits_BxTxV, targets_BxT, mask_BxT=None):
    """Mean token cross-entropy in float32; `mask_BxT` excludes positions (e.g. padding)."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    picked_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    nll_BxT = logz_BxT - picked_BxT
    if mask_BxT is None:
        return nll_BxT.mean()
    mask_BxT = mask_BxT.astype(jnp.float32)
    return (nll_BxT * mask_BxT).sum() / jnp.maximum(mask_BxT.sum(), 1.0)


def params_variables(trainable, frozen) -> dict:
    """The model's variables when the trainable and frozen trees are two parts of its params."""
    return {"params": combine(trainable, frozen)}


def lora_variables(adapters, base) -> dict:
    """The model's variables for `GPT(config, lora=...)`: the base params and the adapters beside them."""
    return {"params": base, "lora": adapters}


def lm_loss(config: GPTConfig, lora: LoraConfig | None = None, kernels: Kernels = PORTABLE):
    """loss_fn(trainable, frozen, batch, rng) -> (loss, {"tokens": targets counted}) of GPT(config, lora, kernels)."""
    model = GPT(config, lora=lora, kernels=kernels)
    variables = params_variables if lora is None else lora_variables

    def loss_fn(trainable, frozen, batch, rng):
        train = rng is not None
        logits_BxTxV = model.apply(
            variables(trainable, frozen), batch.tokens[..., :-1], train=train, rngs={"dropout": rng} if train else None
        )
        targets_BxT = batch.tokens[..., 1:]
        counted = targets_BxT.size if batch.mask is None else batch.mask.sum()
        return cross_entropy(logits_BxTxV, targets_BxT, batch.mask), {"tokens": jnp.asarray(counted, jnp.float32)}

    return loss_fn


def lora_loss(config: GPTConfig, lora: LoraConfig, kernels: Kernels = PORTABLE):
    """The LM loss with LoRA adapters as the trainable tree and the base as the frozen one: `lm_loss(config, lora)`."""
    return lm_loss(config, lora, kernels)
