"""nanoGPT's model and training step in PyTorch: the same-run reference for bench_train's nanogpt-cpu case and
for bench/gpu.py's GPT-2 124M training.

    python bench/nanogpt_torch.py --iters 200 [--compile] [--seed S]                      # nanoGPT's CPU run
    python bench/nanogpt_torch.py --shape gpt2-124m --device cuda --bf16 --compile --iters 30 --batch-size 16

A compact transcription of karpathy/nanoGPT's model.py (LayerNorm with bias, fused c_attn,
scaled_dot_product_attention, exact GELU, tied head, 0.02 init) and train.py's step (AdamW betas
(0.9, 0.99) with weight decay on 2-D params, clip 1.0, warmup 100 then cosine to 1e-4 at --iters, random
windows from the train split), on the same tokens jaxlm trains on. On CUDA it trains as nanoGPT's train.py does
there: bfloat16 autocast around the forward pass (`--bf16`), TF32 matmuls, fused AdamW. Prints one JSON line: ms
per iteration (first 10 iterations excluded), tokens/s, peak GPU memory, and, as nanoGPT's estimate_loss does,
the mean val loss of 20 random batches, and the peak RSS. bench_train.py runs it as the nanogpt-cpu case's peer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.h, D // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, D)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, d: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.h:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# (dataset, tokenizer, n_layer, n_head, n_embd, block, batch): nanoGPT's README CPU flags for shakespeare_char, and
# GPT-2 124M at its full context on Tiny Shakespeare in GPT-2 BPE (bench/gpu.py's shape).
SHAPES = {
    "nanogpt-cpu": ("shakespeare_char", "char", 4, 4, 128, 64, 12),
    "gpt2-124m": ("shakespeare", "gpt2", 12, 12, 768, 1024, 16),
}


def run(
    iters: int,
    compile_model: bool = False,
    threads: int | None = None,
    seed: int = 1337,
    *,
    shape: str = "nanogpt-cpu",
    device: str = "cpu",
    bf16: bool = False,
    batch_size: int | None = None,
    dims: tuple[int, int, int, int] | None = None,
) -> dict:
    """Train for `iters` iterations; `dims` (n_layer, n_head, n_embd, block) replaces the shape's model (tests)."""
    from jaxlm import data

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dataset, tokenizer, L, H, D, T, B = SHAPES[shape]
    L, H, D, T = dims or (L, H, D, T)
    B = batch_size or B
    cuda = device.startswith("cuda")
    if cuda:  # nanoGPT's train.py on a GPU
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ds = data.resolve_dataset(dataset, tokenizer)
    model = NanoGPT(ds.vocab_size, T, L, H, D).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.99),
        **({"fused": True} if cuda else {}),
    )
    step_model = torch.compile(model) if compile_model else model
    splits = {k: torch.from_numpy(getattr(ds, k).astype(np.int64)) for k in ("train", "val")}
    gen = np.random.default_rng(seed)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def batch(split):
        tokens = splits[split]
        ix = torch.from_numpy(gen.integers(0, len(tokens) - T - 1, B))
        x = torch.stack([tokens[i : i + T] for i in ix])
        y = torch.stack([tokens[i + 1 : i + 1 + T] for i in ix])
        if cuda:  # nanoGPT's: pinned host memory, copied while the GPU works
            x, y = (t.pin_memory().to(device, non_blocking=True) for t in (x, y))
        return x, y

    def lr_at(it):  # nanoGPT's get_lr: linear warmup 100, cosine to 1e-4 at iters
        if it < 100:
            return 1e-3 * (it + 1) / 101
        ratio = min(1.0, (it - 100) / max(1, iters - 100))
        return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    times = []
    for it in range(iters):
        t = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        x, y = batch("train")
        with autocast:
            loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()  # waits for the step: each iteration's time is its own
        times.append(time.perf_counter() - t)
    steady = times[10:] if len(times) > 20 else times[len(times) // 2 :]
    with torch.no_grad(), autocast:  # nanoGPT's estimate_loss: mean over eval_iters=20 random val batches
        val_loss = float(np.mean([model(*batch("val")).item() for _ in range(20)]))
    seconds = float(np.mean(steady))
    return {
        "shape": shape,
        "n_layer": L,
        "n_embd": D,
        "block_size": T,
        "batch_size": B,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "bf16_autocast": bf16,
        "ms_per_iter": round(1000 * seconds, 2),
        "ms_per_iter_median": round(1000 * float(np.median(steady)), 2),
        "tokens_per_s": round(B * T / seconds),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "ms_per_step": round(1000 * seconds, 2),
        "steps": len(steady),
        "tokens_per_step": B * T,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "seed": seed,
        "threads": torch.get_num_threads(),
        "compile": compile_model,
        "loss": round(loss_value, 3),
        "val_loss": round(val_loss, 4),
        "torch": torch.__version__,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow first iterations)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, the core count)")
    p.add_argument("--seed", type=int, default=1337, help="init and batch seed")
    p.add_argument("--shape", choices=sorted(SHAPES), default="nanogpt-cpu", help="model, context, batch and data")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast around the forward pass (nanoGPT on GPU)")
    p.add_argument("--batch-size", type=int, help="sequences per iteration (default: the shape's)")
    args = p.parse_args()
    result = run(
        args.iters, args.compile, args.threads, args.seed,
        shape=args.shape, device=args.device, bf16=args.bf16, batch_size=args.batch_size,
    )  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
