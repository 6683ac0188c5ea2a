"""transformers' PyTorch GPT-2 training step on bench_train's gpt2-f32 shapes: the same-run peer for that case.

    python bench/hf_train_torch.py --steps 5 [--threads N]

GPT-2 124M (`GPT2LMHeadModel`, random init, float32, dropout 0.0 as jaxlm's gpt2-124m preset), batch 4 x 256
random tokens, loss from `labels=`, backward, gradient clipping at 1.0, AdamW with weight decay: the step a
transformers user writes. Prints one JSON line: ms per step, mean and median (first two steps excluded:
warm-up), the last loss and the process's peak RSS. bench_train.py runs it as gpt2-f32's peer.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch


def run(steps: int, threads: int | None, batch: int = 4, block: int = 256) -> dict:
    import transformers

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps + 2):
        x = torch.from_numpy(rng.integers(0, cfg.vocab_size, (batch, block + 1)).astype(np.int64))
        t = time.perf_counter()
        loss = model(x[:, :-1], labels=x[:, :-1]).loss  # HF shifts the labels inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t)
    steady = times[2:]
    return {
        "ms_per_step": round(1000 * float(np.mean(steady)), 1),
        "ms_per_step_median": round(1000 * float(np.median(steady)), 1),
        "steps": len(steady),
        "loss": round(float(loss), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "ms_per_step_each": [round(1000 * s, 1) for s in steady],
        "threads": torch.get_num_threads(),
        "tokens_per_step": batch * block,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps after two warm-up steps")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, the core count)")
    args = p.parse_args()
    print(json.dumps(run(args.steps, args.threads)))


if __name__ == "__main__":
    main()
