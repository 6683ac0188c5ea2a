"""The optimizer: AdamW with linear warmup then cosine decay (nanoGPT's), decay on matrices only, clipping."""

from __future__ import annotations

import jax
import optax

from ..config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr (nanoGPT's)."""
    if not cfg.decay_lr:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.learning_rate / (cfg.warmup_iters + 1),  # no wasted zero-lr first step
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_iters,
        decay_steps=max(cfg.decay_iters, cfg.warmup_iters + 1),  # decay ending inside warmup: drop to min_lr
        end_value=cfg.final_lr,
    )


# Leaf names that are matrices: Dense kernels, the token/position embeddings (the tied head with them), and
# LoRA's A and B (as PEFT trained by transformers' Trainer decays them).
DECAYED_LEAVES = ("kernel", "embedding", "lora_a", "lora_b")


def decay_mask(params):
    """True where weight decay applies: Dense kernels and the token/position embeddings (the matrices).

    Biases and LayerNorm scales/offsets do not decay. (nanoGPT's "dim >= 2" rule, by name here because
    scanned layers give every parameter a leading layer axis.) Works on any subtree of the params, so a
    trainable subset gets the same rule.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAYED_LEAVES, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=1e-8, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip else adamw
