"""The LoRA side of the trainer's seam: `step` differentiates only state["params"] (the adapters) and calls
`loss_fn(combine(state["params"], state["frozen"]), batch, rng)`, state["frozen"] being the base params.

`combine` only pairs the two trees (no copy, no merge): the model adds s * dropout(x) A B per layer, so
the base weights are read in place and get neither gradients nor optimizer state.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..config import GPTConfig
from ..lora.adapters import LoraConfig
from .gpt import GPT, cross_entropy


def combine(adapters, base) -> dict:
    """(trainable adapters, frozen base) -> what `lora_loss`'s loss_fn takes."""
    return {"base": base, "lora": adapters}


def lora_loss(config: GPTConfig, lora: LoraConfig):
    """loss_fn(params, batch, rng) -> (loss, {"tokens": counted targets}), params = combine(adapters, base).

    `batch` has `tokens` int32 [B, T+1] and `mask` float32 [B, T] or None (1 where a target counts):
    the masked mean cross-entropy, with model and LoRA dropout drawn from `rng` (None: no dropout).
    """
    model = GPT(config, lora=lora)

    def loss_fn(params, batch, rng):
        tokens_BxT1 = batch.tokens
        train = rng is not None  # None: evaluation, dropout off (the train library's convention)
        logits_BxTxV = model.apply(
            {"params": params["base"], "lora": params["lora"]},
            tokens_BxT1[..., :-1],
            train=train,
            rngs={"dropout": rng} if train else None,
        )
        mask_BxT = batch.mask
        if mask_BxT is None:
            mask_BxT = jnp.ones(tokens_BxT1[..., 1:].shape, jnp.float32)
        loss = cross_entropy(logits_BxTxV, tokens_BxT1[..., 1:], mask_BxT)
        return loss, {"tokens": mask_BxT.sum()}

    return loss_fn
