"""Training throughput: tokens/s, ms/step and FLOP utilisation against the machine's measured matmul peak.

    python bench/bench_train.py                 # every case, each in its own process; prints a markdown table
    python bench/bench_train.py --case gpt2-f32 --steps 5

Each case runs jaxlm's real train step (jitted, donated, sharded over all devices -- on a CPU, each core is a
device for small models, as in train.py -- batches built on the host
from the prepared dataset while the previous step runs), after a warm-up step, with no eval or checkpoints.
Peak memory is the process's maximum resident set size. MFU uses GPTConfig.flops_per_token (6N + 12LTD per
token) over the peak measured here: the sustained FLOP/s of a 2048x2048 jitted matmul of the same dtype, run
for 3 s just before and just after the timed steps (a shared VM's speed drifts), averaged.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

# GPT-2 124M, batch 4 x 256 tokens; float32 and bfloat16 compute (params stay float32).
_GPT2 = dict(
    config="gpt2-124m", steps=4, dataset="shakespeare", batch_size=4, block_size=256, gradient_accumulation_steps=1
)

CASES = {
    # nanoGPT's README CPU run for shakespeare_char (4 layers, 128 wide, block 64, batch 12).
    "nanogpt-cpu": dict(config="nanogpt-cpu", steps=200, dataset="shakespeare_char"),
    # jaxlm's default `python train.py` model.
    "default": dict(config="shakespeare-char", steps=50, dataset="shakespeare_char"),
    "gpt2-f32": dict(_GPT2, dtype="float32"),
    "gpt2-bf16": dict(_GPT2, dtype="bfloat16"),
}


def matmul_peak(dtype: str, n: int = 2048, seconds: float = 3.0) -> float:
    import jax.numpy as jnp

    from jaxlm.train import measure_matmul_flops

    return measure_matmul_flops(n, jnp.dtype(dtype), seconds)


def run_case(name: str, steps: int | None = None, batch_size: int | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxlm.train as trainer
    from jaxlm import data, kernels
    from jaxlm.config import TrainConfig
    from jaxlm.parallel import sharding

    spec = dict(CASES[name])
    preset, steps = spec.pop("config"), steps or spec.pop("steps")
    spec.pop("steps", None)
    cfg = TrainConfig.preset(preset, **spec, **({"batch_size": batch_size} if batch_size else {}))
    trainer.apply_layout(trainer.host_layout(cfg.to_dict()))  # as train.py does
    ds = data.resolve_dataset(cfg.dataset, cfg.tokenizer)
    config = cfg.model_config(ds.vocab_size)
    mesh = sharding.make_mesh(cfg.mesh)
    A, B, T = cfg.gradient_accumulation_steps, cfg.batch_size, cfg.block_size
    tx = trainer.make_optimizer(cfg)
    with sharding.activate(mesh):
        _, shardings = trainer.model_layout(config, tx, mesh)
        k = kernels.resolve(mesh, dtype=config.dtype, dropout=config.dropout, attention=cfg.attention)  # as setup()
        loss_fn = trainer.lm_loss(config, kernels=k)
        step_fn = trainer.jit_train_step(loss_fn, tx, trainer.lr_schedule(cfg), shardings, mesh)
        state = trainer.new_state(config, tx, shardings, cfg.seed)
        batch_sh = trainer.batch_sharding(mesh)

        def batch(i):
            local = data.get_batch(ds, "train", cfg.seed, i, (A, B), T)
            return trainer.Batch(jax.make_array_from_process_local_data(batch_sh, local, (A, B, T + 1)))

        t = time.perf_counter()
        state, m = step_fn(state, batch(0))
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t
        nxt = batch(1)
        peak_dtype = "bfloat16" if config.dtype == "bfloat16" else "float32"
        peak_before = matmul_peak(peak_dtype)  # the VM's speed drifts: bracket the timed steps
        t = time.perf_counter()
        for i in range(1, steps + 1):
            state, m = step_fn(state, nxt)
            nxt = batch(i + 1)
        loss = float(m["loss"])
        seconds = (time.perf_counter() - t) / steps
    peak = (peak_before + matmul_peak(peak_dtype)) / 2
    cpu = jax.devices()[0].platform == "cpu"
    tokens = A * B * T
    flops = config.flops_per_token(T) * tokens / seconds
    return {
        "case": name,
        "params_M": round(config.num_params() / 1e6, 2),
        "tokens_per_step": tokens,
        "dtype": config.dtype,
        "ms_per_step": round(1000 * seconds, 2),
        "tokens_per_s": round(tokens / seconds),
        "tflops": round(flops / 1e12, 4),
        "matmul_peak_tflops": round(peak / 1e12, 4),
        # CPU "devices" share the host's cores, and the matmul peak is measured with all of them.
        "mfu_vs_matmul_peak": round(flops / (peak * (1 if cpu else jax.device_count())), 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "compile_s": round(compile_s, 1),
        "loss": round(loss, 3) if np.isfinite(loss) else loss,
        "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
        "jnp_ok": bool(jnp.isfinite(m["grad_norm"])),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=sorted(CASES), help="run one case in this process and print JSON")
    p.add_argument("--steps", type=int, help="timed steps (default per case)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default per case), e.g. half of it")
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.steps, args.batch_size)))
        return
    results = []
    for name in CASES:
        cmd = [sys.executable, __file__, "--case", name] + (["--steps", str(args.steps)] if args.steps else [])
        cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    cols = ["case", "params_M", "dtype", "tokens_per_step", "ms_per_step", "tokens_per_s", "tflops"]
    cols += ["matmul_peak_tflops", "mfu_vs_matmul_peak", "peak_rss_gib", "compile_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"\n{results[0]['device']}; {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
