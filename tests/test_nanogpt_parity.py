"""Training checked against nanoGPT: from the same weights, on the same batches, with nanoGPT's recipe (AdamW
betas (0.9, 0.99), weight decay on the matrices only, clipping at 1.0, warmup then cosine), jaxlm's train step
gives nanoGPT's losses step for step, and the same val loss after. The PyTorch side is bench/nanogpt_torch.py's
transcription of nanoGPT's model.py and train.py step (bench_train's same-run reference), with GPT-2's tanh GELU,
which jaxlm computes (nanoGPT uses the exact one: the only difference in the math)."""

import math
import sys
import types
from pathlib import Path

import jax
import numpy as np
import torch
from torch.nn import functional as F

import jaxlm
import jaxlm.train as trainer
from jaxlm.config import TrainConfig
from jaxlm.parallel import sharding

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import nanogpt_torch  # noqa: E402

STEPS, WARMUP, LR, MIN_LR = 12, 4, 1e-3, 1e-4
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, dropout=0.0, batch_size=4)


def _nanogpt_lr(it: int) -> float:
    """nanoGPT's get_lr: linear warmup, then cosine to min_lr at lr_decay_iters."""
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    ratio = (it - WARMUP) / (STEPS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def _torch_model(config, params):
    """nanoGPT's model holding jaxlm's params (HF GPT-2 names; Linear weights are [out, in])."""
    model = nanogpt_torch.NanoGPT(config.vocab_size, config.block_size, config.n_layer, config.n_head, config.n_embd)
    t = lambda x: torch.from_numpy(np.array(x, np.float32))  # noqa: E731
    D, h = config.n_embd, params["h"]
    with torch.no_grad():
        model.wte.weight.copy_(t(params["wte"]["embedding"]))  # the head is tied to it
        model.wpe.weight.copy_(t(params["wpe"]["embedding"]))
        model.ln_f.weight.copy_(t(params["ln_f"]["scale"]))
        model.ln_f.bias.copy_(t(params["ln_f"]["bias"]))
        for i, block in enumerate(model.h):
            for ln in ("ln_1", "ln_2"):
                getattr(block, ln).weight.copy_(t(h[ln]["scale"][i]))
                getattr(block, ln).bias.copy_(t(h[ln]["bias"][i]))
            for name, (group, mod) in {
                "c_attn": ("attn", "c_attn"), "attn_proj": ("attn", "c_proj"), "c_fc": ("mlp", "c_fc"),
                "mlp_proj": ("mlp", "c_proj"),
            }.items():  # fmt: skip
                kernel = np.asarray(h[group][mod]["kernel"][i]).reshape(D if name != "mlp_proj" else 4 * D, -1)
                getattr(block, name).weight.copy_(t(kernel.T))
                getattr(block, name).bias.copy_(t(np.asarray(h[group][mod]["bias"][i]).reshape(-1)))
    return model


def _xy(tokens_BxT1):
    """nanoGPT's (x, y): inputs and next-token targets as contiguous int64 tensors."""
    return (torch.from_numpy(np.ascontiguousarray(tokens_BxT1[:, :-1], np.int64)),
            torch.from_numpy(np.ascontiguousarray(tokens_BxT1[:, 1:], np.int64)))  # fmt: skip


def test_train_step_gives_nanogpts_losses_from_the_same_weights_and_batches(monkeypatch):
    monkeypatch.setattr(
        nanogpt_torch, "F", types.SimpleNamespace(**{**vars(F), "gelu": lambda x: F.gelu(x, approximate="tanh")})
    )
    cfg = TrainConfig(
        **TINY, learning_rate=LR, min_lr=MIN_LR, warmup_iters=WARMUP, max_iters=STEPS, beta2=0.99,
        weight_decay=0.1, grad_clip=1.0, dtype="float32",
    )  # fmt: skip
    config = cfg.model_config(TINY["vocab_size"])
    params = jax.device_get(jaxlm.init_params(config, jax.random.key(3)))
    rng = np.random.default_rng(0)
    # Rows of a counting pattern from random starts: learnable in a few steps, so the losses move a lot.
    starts = rng.integers(0, config.vocab_size, (STEPS + 2, cfg.batch_size, 1))
    batches = ((starts + 3 * np.arange(config.block_size + 1)) % config.vocab_size).astype(np.int32)

    mesh = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    tx, schedule = trainer.make_optimizer(cfg), trainer.lr_schedule(cfg)
    _, shardings = trainer.model_layout(config, tx, mesh)
    with sharding.activate(mesh):
        state = trainer.new_state(config, tx, shardings, seed=0, params=params)
        step = jax.jit(trainer.make_train_step(config, tx, schedule))
        ours = []
        for s in range(STEPS):
            state, metrics = step(state, batches[s][None])
            ours.append(float(metrics["loss"]))
        evaluate = jax.jit(trainer.make_eval_step(config))
        our_val = float(evaluate(state["params"], state["frozen"], batches[STEPS:]))

    torch.manual_seed(0)
    model = _torch_model(config, params)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": [p for p in model.parameters() if p.dim() < 2]}],
        lr=LR, betas=(0.9, 0.99), weight_decay=0.0,
    )  # fmt: skip
    theirs = []
    for s in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = _nanogpt_lr(s)
        loss = model(*_xy(batches[s]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        theirs.append(loss.item())
        assert float(schedule(s)) == np.float32(_nanogpt_lr(s)) or abs(float(schedule(s)) - _nanogpt_lr(s)) < 1e-9
    with torch.no_grad():
        their_val = float(
            np.mean(
                [
                    model(
                        torch.from_numpy(b[:, :-1].astype(np.int64)), torch.from_numpy(b[:, 1:].astype(np.int64))
                    ).item()
                    for b in batches[STEPS:]
                ]
            )
        )

    assert ours[-1] < ours[0] - 0.05  # it learns: the comparison below is not of two flat lines
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    assert abs(our_val - their_val) < 1e-5
