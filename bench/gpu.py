"""The GPU check, one command: HF parity, GPT-2 124M training, nanoGPT + torch.compile, decode vs transformers.

    python bench/gpu.py            # one H100 / H200, within 8 minutes; writes bench/results/gpu.json
    python bench/gpu.py --smoke    # all of it on the CPU at tiny sizes (tests/test_bench_gpu.py); writes nothing

1. parity: a random-init GPT-2 124M written by transformers' `save_pretrained`, loaded by `jaxlm.load`; max |logit|
   difference against transformers in PyTorch float32 on the same GPU, for jaxlm in float32 and in bfloat16 (next
   to PyTorch's own bfloat16 error), with the attention the kernel record picks there.
2. train: jaxlm's train step on GPT-2 124M, block 1024, bfloat16, --batch-size sequences per step, with cuDNN's
   fused attention and with XLA's (`--attention cudnn|xla`), remat off and on: tokens/s, MFU against the device's
   dense bf16 peak (`jaxlm.train.PEAK_FLOPS`), the process's peak GPU memory and the compiled program's own.
3. nanogpt: bench/nanogpt_torch.py, nanoGPT's model and step, `torch.compile`d, bf16 autocast, the same shapes.
4. decode: `jaxlm.Generator` against transformers' `generate` (PyTorch, same GPU, same weights), greedy, batch 1
   and 32, float32 and bfloat16: new tokens per second, the prompt's prefill included (compile excluded).

On the GPU each part (each training case too) runs in its own process: the peak memory is that part's, and JAX
never holds the GPU while PyTorch uses it; --smoke runs them one after another in one process. A part that fails
is recorded with its error and the rest still run. On the GPU machine this workplace lends, jaxlm runs from the
checkout (PYTHONPATH) with the jax, torch and transformers already there (docs/accelerators.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]  # record, nanogpt_torch; helpers.save_random_hf

# The model and the measured shapes: GPT-2 124M on the GPU; a 2-layer model on the CPU for --smoke.
SIZES = {
    "gpu": dict(
        n_layer=12, n_head=12, n_embd=768, block=1024, vocab=50257, batch=16, steps=20, torch_iters=40,
        decode_batches=(1, 32), decode_dtypes=("float32", "bfloat16"), prompt=64, new=256,
        attentions=("cudnn", "xla"), smoke=False,
    ),
    "smoke": dict(
        n_layer=2, n_head=2, n_embd=64, block=128, vocab=50257, batch=4, steps=2, torch_iters=3,
        decode_batches=(1, 4), decode_dtypes=("float32",), prompt=8, new=8,
        attentions=("reference", "xla"), smoke=True,  # no cuDNN on a CPU
    ),
}  # fmt: skip
PART_TIMEOUT_S = 300
BUDGET_S = 470  # the whole check within 8 minutes of a lent GPU: a part not started by then is recorded as such


# ---- the parts, each run in a process of its own --------------------------------------------------------------


def random_hf(size: dict, path: Path):
    from helpers import save_random_hf

    shape = dict(n_layer=size["n_layer"], n_head=size["n_head"], n_embd=size["n_embd"])
    return save_random_hf(path, **shape, n_positions=size["block"], vocab_size=size["vocab"])


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def part_parity(size: dict) -> list[dict]:
    import jax
    import numpy as np
    import torch

    import jaxlm
    from jaxlm.kernels import resolve

    rows = []
    with tempfile.TemporaryDirectory() as d:
        model = random_hf(size, Path(d)).to(torch_device())
        tokens = np.random.default_rng(0).integers(0, size["vocab"], (2, size["block"]))
        with torch.no_grad():
            ids = torch.from_numpy(tokens).to(torch_device())
            ref = model(ids).logits.float().cpu().numpy()
            torch_bf16 = model.to(torch.bfloat16)(ids).logits.float().cpu().numpy()
        for dtype in ("float32", "bfloat16"):
            config, params = jaxlm.load(d, dtype=dtype)
            kernels = resolve(jax.devices()[0], dtype=dtype)
            logits = jaxlm.GPT(config, kernels=kernels).apply({"params": params}, tokens)
            rows.append(
                {
                    "dtype": dtype,
                    "attention": kernels.attention,
                    "tokens": int(tokens.size),
                    "max_abs_logit_diff": float(np.abs(np.asarray(logits, np.float32) - ref).max()),
                    "torch_bf16_max_abs_logit_diff": float(np.abs(torch_bf16 - ref).max()) if dtype != "float32" else 0,
                }
            )
    return rows


def part_train(size: dict, attention: str, remat: bool) -> list[dict]:
    import jax
    import numpy as np

    import jaxlm.train as trainer
    from jaxlm import data
    from jaxlm.config import TrainConfig
    from jaxlm.kernels import resolve
    from jaxlm.parallel import sharding

    shape = dict(n_layer=size["n_layer"], n_head=size["n_head"], n_embd=size["n_embd"], block_size=size["block"])
    cfg = TrainConfig.preset(
        "gpt2-124m", dataset="shakespeare", batch_size=size["batch"], gradient_accumulation_steps=1,
        remat=remat, scan_layers=True, **shape,
    )  # fmt: skip
    ds = data.resolve_dataset(cfg.dataset, cfg.tokenizer)
    config = cfg.model_config(ds.vocab_size)
    mesh = sharding.make_mesh("data=1", fewer=True)
    kernels = resolve(mesh, dtype=config.dtype, dropout=config.dropout, attention=attention)
    B, T = cfg.batch_size, config.block_size
    tx = trainer.make_optimizer(cfg)
    with sharding.activate(mesh):
        shapes, shardings = trainer.model_layout(config, tx, mesh)
        loss_fn = trainer.lm_loss(config, kernels=kernels)
        step = trainer.jit_train_step(loss_fn, tx, trainer.lr_schedule(cfg), shardings, mesh)
        batch_sh = trainer.batch_sharding(mesh)

        def batch(i):
            return trainer.Batch(jax.device_put(data.get_batch(ds, "train", cfg.seed, i, (1, B), T), batch_sh))

        t = time.perf_counter()
        abstract = {k: trainer.abstract(shapes[k], shardings[k]) for k in shapes}
        compiled = step.lower(abstract, batch(0)).compile()
        compile_s = time.perf_counter() - t
        state = trainer.new_state(config, tx, shardings, cfg.seed)
        state, m = compiled(state, batch(0))  # warm-up
        jax.block_until_ready(m)
        nxt = batch(1)
        t = time.perf_counter()
        for i in range(1, size["steps"] + 1):
            state, m = compiled(state, nxt)
            nxt = batch(i + 1)
        loss = float(m["loss"])  # waits for the last step
        seconds = (time.perf_counter() - t) / size["steps"]
    device = jax.local_devices()[0]
    peak = trainer.peak_flops_per_device(device)
    flops = config.flops_per_token(T) * B * T / seconds
    stats = device.memory_stats() or {}
    return [
        {
            "attention": kernels.attention,
            "remat": remat,
            "batch": B,
            "block": T,
            "dtype": config.dtype,
            "ms_per_step": round(1000 * seconds, 2),
            "tokens_per_s": round(B * T / seconds),
            "tflops": round(flops / 1e12, 2),
            "mfu": round(flops / peak, 3) if peak else None,
            "peak_gib": round(stats["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in stats else None,
            "program_peak_gib": round(compiled.memory_analysis().peak_memory_in_bytes / 2**30, 2),
            "compile_s": round(compile_s, 1),
            "loss": round(loss, 3) if np.isfinite(loss) else str(loss),
        }
    ]


def part_nanogpt(size: dict) -> list[dict]:
    from nanogpt_torch import run

    gpu = torch_device() == "cuda"
    dims = (size["n_layer"], size["n_head"], size["n_embd"], size["block"])
    # torch.compile on a CPU needs a C++ toolchain and minutes: the smoke run checks the eager step
    kw = dict(shape="gpt2-124m", device=torch_device(), bf16=gpu, batch_size=size["batch"], dims=dims)
    return [run(size["torch_iters"], gpu, **kw)]


def part_decode(size: dict) -> list[dict]:
    import numpy as np
    import torch

    import jaxlm

    rows = []
    P, N = size["prompt"], size["new"]
    with tempfile.TemporaryDirectory() as d:
        model = random_hf(size, Path(d)).to(torch_device())
        for dtype in size["decode_dtypes"]:
            config, params = jaxlm.load(d)
            gen = jaxlm.Generator(params, config, dtype=dtype)
            hf = model.to(getattr(torch, dtype))
            for B in size["decode_batches"]:
                prompts = np.random.default_rng(B).integers(0, size["vocab"], (B, P))
                gen(prompts.tolist(), max_new_tokens=N, eos_id=None)  # compile
                ours = gen(prompts.tolist(), max_new_tokens=N, eos_id=None)
                jaxlm_s = gen.stats.prefill_s + gen.stats.decode_s  # as generate's below: prompt included
                ids = torch.from_numpy(prompts).to(torch_device())
                kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N, min_new_tokens=N)
                with torch.inference_mode():
                    hf.generate(ids, **kw)  # warm-up
                    _sync()
                    t = time.perf_counter()
                    theirs = hf.generate(ids, **kw)[:, P:].tolist()
                    _sync()
                    hf_s = time.perf_counter() - t
                same = np.mean([a == b for x, y in zip(ours, theirs, strict=True) for a, b in zip(x, y, strict=False)])
                rows.append(
                    {
                        "dtype": dtype,
                        "batch": B,
                        "prompt": P,
                        "new_tokens": N,
                        "jaxlm_tokens_per_s": round(B * N / jaxlm_s, 1),
                        "torch_tokens_per_s": round(B * N / hf_s, 1),
                        "jaxlm_prefill_ms": round(1000 * gen.stats.prefill_s, 2),
                        "same_greedy_tokens": round(float(same), 3),
                        "kernels": gen.kernels.describe(),
                    }
                )
    return rows


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def part_all(size: dict) -> list[dict]:
    """Every part in this process (--smoke), each row tagged with its part; a failing part raises."""
    rows = []
    for name, kwargs in plan(size):
        rows += [{"part": name, **kwargs, **row} for row in PARTS[name](size, **kwargs)]
    return rows


PARTS = {"parity": part_parity, "train": part_train, "nanogpt": part_nanogpt, "decode": part_decode, "all": part_all}


# ---- the orchestration ----------------------------------------------------------------------------------------


def plan(size: dict) -> list[tuple[str, dict]]:
    """(part, its arguments) in the order they run, one training case each: remat off first and the remat-on
    cases last, so a run that meets BUDGET_S has measured the rest (--smoke: each attention once, one with remat,
    as its compiles dominate the CPU's time)."""
    off, on = ([("train", {"attention": a, "remat": r}) for a in size["attentions"]] for r in (False, True))
    if size["smoke"]:
        return [("parity", {}), off[0], ("nanogpt", {}), ("decode", {}), on[1]]
    return [("parity", {}), *off, ("nanogpt", {}), ("decode", {}), *on]


def run_part(name: str, kwargs: dict, smoke: bool, timeout: float) -> list[dict]:
    """One part in a fresh process; a failure is a row holding its error (the other parts still run)."""
    cmd = [sys.executable, __file__, "--part", name, "--kwargs", json.dumps(kwargs)] + (["--smoke"] if smoke else [])
    env = dict(os.environ)
    if name != "train":  # PyTorch shares the GPU: JAX takes memory as it needs it, not 75% up front
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [{"part": name, **kwargs, "error": f"timed out after {timeout:.0f} s"}]
    lines = [line for line in r.stdout.splitlines() if line.startswith("ROWS ")]
    if r.returncode or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"part": name, **kwargs, "error": f"exit {r.returncode}: {tail}"}]
    seconds = round(time.perf_counter() - t, 1)
    return [{"part": name, **kwargs, **row, "part_s": seconds} for row in json.loads(lines[-1][5:])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU; prints the rows, writes nothing")
    p.add_argument("--part", choices=sorted(PARTS), help="run one part in this process and print its rows")
    p.add_argument("--kwargs", default="{}", help="the part's arguments (JSON), with --part")
    args = p.parse_args(argv)
    size = SIZES["smoke" if args.smoke else "gpu"]
    if args.part:
        print("ROWS " + json.dumps(PARTS[args.part](size, **json.loads(args.kwargs))), flush=True)
        return 0
    t, rows = time.perf_counter(), []
    for name, kwargs in [("all", {})] if args.smoke else plan(size):
        left = BUDGET_S - (time.perf_counter() - t)
        if args.smoke:  # every part in one process, on a CPU shared with the rest of the test suite
            rows += run_part(name, kwargs, True, 3 * PART_TIMEOUT_S)
        elif left < 20:
            rows.append({"part": name, **kwargs, "error": f"not run: the {BUDGET_S} s budget was spent"})
        else:
            rows += run_part(name, kwargs, False, min(PART_TIMEOUT_S, left))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    notes = f"bench/gpu.py in {time.perf_counter() - t:.0f} s; sizes {json.dumps(size)}"
    if args.smoke:
        print(json.dumps({"rows": rows, "notes": notes}))
        return 1 if any("error" in r for r in rows) else 0
    import record

    print(f"wrote {record.save('gpu', rows, notes=notes)}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
