"""Model configuration: one frozen dataclass with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import JaxlmError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class GPTConfig:
    """GPT-2 architecture plus how it is computed (dtypes, scan, remat).

    Field names follow nanoGPT; `jaxlm.hf` maps them to HF's `n_positions`, `layer_norm_epsilon`, ...
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # embedding, attention and residual dropout (HF's three pdrops, made one)
    layer_norm_epsilon: float = 1e-5
    dtype: str = "float32"  # compute dtype; softmax, logits and loss stay float32
    param_dtype: str = "float32"
    scan_layers: bool = True  # False unrolls the layer loop (same params, same math)
    remat: bool = False  # recompute each block's activations in the backward pass

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise JaxlmError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise JaxlmError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise JaxlmError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise JaxlmError(f"GPTConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def replace(self, **changes) -> GPTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise JaxlmError(f"unknown GPTConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise JaxlmError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count (the tied LM head counted once), from the config alone."""
        d, layer = self.n_embd, 12 * self.n_embd**2 + 13 * self.n_embd
        n = self.n_layer * layer + 2 * d + self.vocab_size * d + self.block_size * d
        return n if include_embedding else n - self.block_size * d

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L T D."""
        t = seq_len or self.block_size
        return 6 * self.num_params(include_embedding=False) + 12 * self.n_layer * t * self.n_embd


# OpenAI's four GPT-2 sizes, and small ones for tests and CPU training.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=256),
    "small-char": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65),
    "shakespeare-char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65),
}
