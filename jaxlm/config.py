"""Model configuration: one frozen dataclass with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import JaxlmError

DTYPES = ("float32", "bfloat16")  # compute and parameter dtypes (float16 would need loss scaling: not offered)
ARCH_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")


def check_dtype(dtype, what: str = "dtype") -> str:
    """`dtype` if jaxlm computes in it, else a one-line error naming the choices."""
    if dtype == "float16":
        raise JaxlmError(f"{what} float16 is not supported (jaxlm has no loss scaling for it); use bfloat16")
    if dtype not in DTYPES:
        raise JaxlmError(f"{what} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


# Attention kernels a command may ask for (`--attention`); `jaxlm.kernels.resolve` decides what "auto" means.
ATTENTIONS = ("auto", "reference", "xla", "cudnn", "splash")
FUSED_ATTENTIONS = ("xla", "cudnn", "splash")  # jax's and the fused kernels: none of them has attention dropout


def check_attention(attention: str, dropout: float = 0.0) -> str:
    """`attention` if a command may ask for it with this dropout, else a one-line error naming the fix."""
    if attention not in ATTENTIONS:
        raise JaxlmError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if attention in FUSED_ATTENTIONS and dropout > 0:
        raise JaxlmError(
            f"--attention {attention} has no attention dropout but dropout is {dropout}; "
            "use --attention auto (the reference form) or --dropout 0"
        )
    return attention


def _field(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GPTConfig:
    """GPT-2 architecture plus how it is computed (dtypes, scan, remat).

    Field names follow nanoGPT; `jaxlm.io.hf` maps them to HF's `n_positions`, `layer_norm_epsilon`, ...
    """

    vocab_size: int = _field(50257, "vocabulary size")
    block_size: int = _field(1024, "context length (tokens)")
    n_layer: int = _field(12, "transformer blocks")
    n_head: int = _field(12, "attention heads")
    n_embd: int = _field(768, "embedding width")
    dropout: float = _field(0.0, "dropout rate")  # embedding, attention and residual dropout (HF's three pdrops)
    layer_norm_epsilon: float = _field(1e-5, "LayerNorm epsilon")
    dtype: str = _field("float32", "compute dtype; softmax, logits and loss stay float32")
    param_dtype: str = _field("float32", "parameter dtype")
    scan_layers: bool = _field(True, "scan over the layers (compiles faster; unrolled runs faster on CPU)")
    remat: bool = _field(False, "recompute activations in the backward pass (less memory, more compute)")

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
            check_dtype(getattr(self, name), f"GPTConfig.{name}")

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

    def architecture(self) -> dict:
        """The fields that make two models the same model (the rest is how it computes)."""
        return {k: getattr(self, k) for k in ARCH_FIELDS}

    def arch_summary(self) -> str:
        """`vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128`, for messages and logs."""
        return ", ".join(f"{k}={v}" for k, v in self.architecture().items())

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
    # What `python train.py` trains by default (TrainConfig's model defaults): minutes on a 2-core CPU.
    "char-4x128": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=65, scan_layers=False),
}


# ---------------------------------------------------------------------------------------------
# Training configuration: nanoGPT's knob names, typed, with presets and a generated command line.


def _opt(default, help: str, **meta):
    return dataclasses.field(default=default, metadata={"help": help, **meta})


TRAIN_MODEL = "char-4x128"  # the GPTConfig preset whose values are TrainConfig's model defaults


def _model_opt(name: str, **override):
    """A TrainConfig field for GPTConfig's field `name`: its default from the TRAIN_MODEL preset, its help
    from GPTConfig (both overridable), tagged so `MODEL_FLAGS` and `model_config` find it."""
    spec = next(f for f in dataclasses.fields(GPTConfig) if f.name == name)
    default = override.pop("default", PRESETS[TRAIN_MODEL].get(name, spec.default))
    return _opt(default, override.pop("help", spec.metadata["help"]), model=True, **override)


@dataclass(frozen=True)
class TrainConfig:
    """Everything `python train.py` takes; the defaults are the default preset (char-level Shakespeare)."""

    # where
    out_dir: str = _opt("out", "run directory: checkpoints/, metrics.jsonl, TensorBoard events, loss.png")
    init_from: str = _opt(
        "scratch",
        "scratch | resume (continue the run in --out-dir) | an HF GPT-2 (gpt2, gpt2-medium, ..., a local HF dir) "
        "| a jaxlm checkpoint or run dir",
    )
    overwrite: bool = _opt(False, "replace a run in --out-dir that holds a different model")
    # data
    dataset: str = _opt(
        "shakespeare_char",
        "shakespeare_char | shakespeare (bundled Tiny Shakespeare, chars | GPT-2 BPE), a prepared dir "
        "(python -m jaxlm.data prepare), or a .txt file / folder of .txt / .jsonl (prepared on first use)",
    )
    tokenizer: str = _opt("gpt2", "tokenizer for raw-text --dataset sources", choices=("gpt2", "char"))
    # model (ignored for --init-from resume / pretrained, except dropout, dtype, remat and a smaller block_size)
    n_layer: int = _model_opt("n_layer")
    n_head: int = _model_opt("n_head")
    n_embd: int = _model_opt("n_embd")
    block_size: int = _model_opt("block_size")
    dropout: float = _model_opt("dropout")
    vocab_size: int | None = _model_opt("vocab_size", default=None, help="vocabulary size (none: the tokenizer's)")
    dtype: str = _model_opt("dtype", help="compute dtype; params and optimizer stay float32", choices=DTYPES)
    remat: bool = _model_opt("remat")
    scan_layers: bool = _model_opt("scan_layers")
    # optimisation
    batch_size: int = _opt(16, "sequences per micro-batch (global, all devices)")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    max_iters: int = _opt(2400, "optimizer steps")
    learning_rate: float = _opt(2e-3, "peak learning rate")
    min_lr: float | None = _opt(None, "final learning rate (none: learning_rate / 10)")
    warmup_iters: int = _opt(100, "linear warmup steps")
    lr_decay_iters: int | None = _opt(None, "step where cosine decay reaches min_lr (none: max_iters)")
    decay_lr: bool = _opt(True, "warmup + cosine decay; false: constant learning_rate")
    weight_decay: float = _opt(0.1, "AdamW decoupled weight decay (kernels and embeddings only)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip gradients to this global norm (0: off)")
    seed: int = _opt(1337, "seed for init, data order and dropout")
    # eval, logging, checkpoints
    eval_interval: int = _opt(250, "evaluate on the val split every N steps")
    eval_iters: int = _opt(20, "val batches per evaluation")
    log_interval: int = _opt(10, "log train loss every N steps")
    checkpoint_interval: int | None = _opt(None, "save every N steps (none: eval_interval); always at the end")
    keep_checkpoints: int = _opt(3, "checkpoints to keep")
    tensorboard: bool = _opt(True, "write TensorBoard event files")
    # LoRA (needs a pretrained --init-from; only the adapters train, the base stays frozen)
    lora_rank: int = _opt(0, "LoRA rank r (0: off, full fine-tuning)")
    lora_alpha: float = _opt(16.0, "LoRA alpha: the update is scaled by alpha / r")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA adapters' input (PEFT's lora_dropout)")
    lora_targets: str = _opt("c_attn", "PEFT module names to adapt: c_attn,attn.c_proj,c_fc,mlp.c_proj (c_proj: both)")
    lora_rslora: bool = _opt(False, "rsLoRA: scale by alpha / sqrt(r)")
    adapter: str | None = _opt(None, "a PEFT LoRA adapter dir to continue training (sets rank, alpha and targets)")
    # hardware
    mesh: str | None = _opt(None, "device mesh, e.g. data=2,fsdp=4 (none: all devices on data)")
    peak_flops: float | None = _opt(None, "peak FLOP/s per device for MFU (none: known per device kind)")
    attention: str = _opt(
        "auto",
        "attention kernel: auto (by the mesh's platform: cuDNN on a GPU in bfloat16, splash on a TPU, jaxlm's "
        "reference form on a CPU or with dropout) | reference | xla | cudnn | splash",
        choices=ATTENTIONS,
    )
    # multi-process jobs (not stored with the run: a resumed run may be placed differently)
    coordinator_address: str | None = _opt(
        None,
        "host:port of process 0 for a multi-process run (none: single process, or found by the launcher "
        "on TPU pods / SLURM)",
    )
    num_processes: int | None = _opt(None, "processes in the job (with --coordinator-address)")
    process_id: int | None = _opt(None, "this process's index, 0 .. num_processes-1 (with --coordinator-address)")

    def __post_init__(self):
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps")
        positive += ("eval_interval", "eval_iters", "log_interval", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise JaxlmError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise JaxlmError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        for name in ("checkpoint_interval", "vocab_size", "lr_decay_iters", "peak_flops"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise JaxlmError(f"--{_flag(name)} must be at least 1 (or none), got {value}")
        if not self.learning_rate > 0:
            raise JaxlmError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.learning_rate:
            raise JaxlmError(f"--min-lr must be in [0, learning_rate={self.learning_rate}], got {self.min_lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise JaxlmError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.dataset:
            raise JaxlmError(
                "--dataset is required: prepare a corpus with `python -m jaxlm.data prepare SRC OUT` and pass "
                "--dataset OUT (or a .txt/.jsonl file or folder)"
            )
        if not self.out_dir or not self.init_from:
            raise JaxlmError("--out-dir and --init-from must not be empty")
        self._check_lora()
        check_attention(self.attention, self.dropout)
        self.model_config(self.vocab_size or 1)  # n_embd % n_head, dropout range, dtype: fail before any work

    def _check_lora(self):
        lora_on = self.lora_rank > 0 or self.adapter is not None
        if self.lora_rank < 0:
            raise JaxlmError(f"--lora-rank must be positive (or 0 for no LoRA), got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise JaxlmError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise JaxlmError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.adapter is not None and self.lora_rank > 0:
            raise JaxlmError("--adapter sets the LoRA rank, alpha and targets; drop --lora-rank")
        if lora_on and self.init_from == "scratch":
            what = "--adapter" if self.adapter is not None else "--lora-rank"
            raise JaxlmError(f"{what} adapts a pretrained model; pass --init-from gpt2 (or an HF dir, checkpoint, run)")

    @property
    def lora(self) -> bool:
        """Whether this run trains LoRA adapters (fresh ones, or those of --adapter)."""
        return self.lora_rank > 0 or self.adapter is not None

    @property
    def final_lr(self) -> float:
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr

    @property
    def decay_iters(self) -> int:
        return self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters

    @property
    def save_interval(self) -> int:
        return self.eval_interval if self.checkpoint_interval is None else self.checkpoint_interval

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The GPTConfig of a model trained from scratch (vocab_size from the tokenizer unless set)."""
        fields = {k: getattr(self, k) for k in MODEL_FLAGS}
        return GPTConfig(**{**fields, "vocab_size": self.vocab_size or vocab_size})

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _JOB_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def preset(cls, name: str, **overrides) -> TrainConfig:
        if name not in TRAIN_PRESETS:
            raise JaxlmError(f"unknown training preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
        return cls(**{**TRAIN_PRESETS[name], **overrides})


_JOB_FIELDS = ("coordinator_address", "num_processes", "process_id")
# TrainConfig's fields that describe the model (GPTConfig's names): the one list a model is built from.
MODEL_FLAGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("model"))

DEFAULT_TRAIN_PRESET = "shakespeare-char"

# Training presets: overrides of TrainConfig's defaults (which are "shakespeare-char"), a line each for the
# model, the optimisation, then evaluation and output. None sets scan_layers or remat: on a GPU or TPU those
# follow the platform (jaxlm.train.setup.for_platform), on a CPU TrainConfig's defaults.
# fmt: off
TRAIN_PRESETS: dict[str, dict] = {
    # Default: char-level Tiny Shakespeare tuned to finish in minutes on a 2-core CPU.
    "shakespeare-char": {},
    # nanoGPT's README CPU command for shakespeare_char (config/train_shakespeare_char.py + CPU flags).
    "nanogpt-cpu": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0,
        batch_size=12, max_iters=2000, lr_decay_iters=2000, learning_rate=1e-3, min_lr=1e-4, beta2=0.99,
        warmup_iters=100, eval_interval=250, eval_iters=20, log_interval=10, out_dir="out-nanogpt-cpu",
    ),
    # GPT-2 124M from scratch on a real corpus (nanoGPT's train_gpt2.py: ~0.5M tokens per step).
    "gpt2-124m": dict(
        dataset="", tokenizer="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, dtype="bfloat16",
        batch_size=12, gradient_accumulation_steps=40, max_iters=600000, learning_rate=6e-4, min_lr=6e-5,
        warmup_iters=2000, weight_decay=0.1, beta2=0.95, eval_interval=1000, eval_iters=200, log_interval=10,
        out_dir="out-gpt2",
    ),
    # Fine-tune OpenAI's GPT-2 on Tiny Shakespeare (BPE), nanoGPT's finetune_shakespeare recipe.
    "finetune-gpt2": dict(
        init_from="gpt2", dataset="shakespeare", block_size=256, dropout=0.1,
        batch_size=4, gradient_accumulation_steps=8, max_iters=200, learning_rate=3e-5, decay_lr=False,
        warmup_iters=0, eval_interval=50, eval_iters=20, out_dir="out-finetune",
    ),
}
# fmt: on


def _flag(name: str) -> str:
    return name.replace("_", "-")
