"""Training throughput: tokens/s, ms/step and FLOP utilisation against the machine's measured matmul peak.

    python bench/bench_train.py                      # the default cases and their peers, each in its own process
    python bench/bench_train.py --cases nanogpt-cpu  # one case and its peer
    python bench/bench_train.py --case gpt2-f32 --steps 5   # one case in this process: prints its JSON only

Each case runs jaxlm's real train step (jitted, donated, sharded over all devices -- on a CPU, each core is a
device for small models, as in train.py -- batches built on the host
from the prepared dataset while the previous step runs), after a warm-up step, with no eval or checkpoints.
Peak memory is the process's maximum resident set size. MFU uses GPTConfig.flops_per_token (6N + 12LTD per
token) over the peak measured here: the sustained FLOP/s of a 2048x2048 jitted matmul of the same dtype, run
for 3 s just before and just after the timed steps (a shared VM's speed drifts), averaged.

Right after a case, in the same command, its peer runs the same shapes for the same number of steps:
nanoGPT's model and step in PyTorch eager (bench/nanogpt_torch.py) after nanogpt-cpu, transformers'
PyTorch GPT-2 step (bench/hf_train_torch.py) after gpt2-f32; their MFU is against the case's peak. Writes
bench/results/train.json (train_CASE.json for --cases CASE; --batch-size N adds _bN).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

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
# The default sitting: bfloat16 compute is for GPUs and TPUs (slower than float32 on a CPU without AVX-512
# BF16 or AMX, and with no peer here), so gpt2-bf16 runs when asked for (--cases gpt2-bf16).
DEFAULT = ("nanogpt-cpu", "default", "gpt2-f32")
# case -> (peer, its script, its arguments given the timed steps): run right after the case, same shapes.
PEERS = {
    "nanogpt-cpu": ("nanoGPT, PyTorch eager", "nanogpt_torch.py", lambda steps: ["--iters", str(steps)]),
    "gpt2-f32": ("transformers PyTorch", "hf_train_torch.py", lambda steps: ["--steps", str(steps)]),
}


def matmul_peak(dtype: str, n: int = 2048, seconds: float = 3.0) -> float:
    import jax.numpy as jnp

    from jaxlm.train import measure_matmul_flops

    return measure_matmul_flops(n, jnp.dtype(dtype), seconds)


def run_case(name: str, steps: int | None = None, batch_size: int | None = None) -> dict:
    import jax
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
        "impl": "jaxlm",
        "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
        "params_M": round(config.num_params() / 1e6, 2),
        "dtype": config.dtype,
        "tokens_per_step": tokens,
        "steps": steps,
        "ms_per_step": round(1000 * seconds, 2),
        "tokens_per_s": round(tokens / seconds),
        "tflops": round(flops / 1e12, 4),
        "matmul_peak_tflops": round(peak / 1e12, 4),
        # CPU "devices" share the host's cores, and the matmul peak is measured with all of them.
        "mfu_pct": round(100 * flops / (peak * (1 if cpu else jax.device_count())), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "compile_s": round(compile_s, 1),
        "loss": round(loss, 3) if np.isfinite(loss) else None,
        "flops_per_token": config.flops_per_token(T),
    }


def run_peer(case: dict, steps: int) -> dict:
    """The case's peer in its own process, as a row beside the case's (same tokens per step, FLOPs and peak)."""
    peer, script, args = PEERS[case["case"]]
    cmd = [sys.executable, str(Path(__file__).with_name(script)), *args(steps)]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    ms = out["ms_per_step"]  # the mean of its steady steps, as the case's
    flops = case["flops_per_token"] * case["tokens_per_step"] / (ms / 1000)
    return {
        "case": case["case"],
        "impl": peer,
        "device": f"{out['threads']} torch threads",
        "params_M": case["params_M"],
        "dtype": case["dtype"],
        "tokens_per_step": out["tokens_per_step"],
        "steps": out["steps"],
        "ms_per_step": ms,
        "tokens_per_s": round(out["tokens_per_step"] / (ms / 1000)),
        "tflops": round(flops / 1e12, 4),
        "matmul_peak_tflops": case["matmul_peak_tflops"],
        "mfu_pct": round(100 * flops / (case["matmul_peak_tflops"] * 1e12), 1),
        "peak_rss_mb": out["peak_rss_mb"],
        "compile_s": None,
        "loss": out["loss"],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=sorted(CASES), help="run one case in this process and print its JSON only")
    p.add_argument("--cases", default=",".join(DEFAULT), help=f"of {', '.join(CASES)}; each with its peer")
    p.add_argument("--no-peers", action="store_true", help="run the jaxlm cases only")
    p.add_argument("--steps", type=int, help="timed steps (default per case)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default per case), e.g. half of it")
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.steps, args.batch_size)))
        return
    import record  # the run's start time and load average

    cases = args.cases.split(",")
    if unknown := [c for c in cases if c not in CASES]:
        p.error(f"unknown case {unknown[0]!r}: pick from {', '.join(CASES)}")
    rows, peerless = [], []
    for name in cases:
        cmd = [sys.executable, __file__, "--case", name] + (["--steps", str(args.steps)] if args.steps else [])
        cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        case = json.loads(out.strip().splitlines()[-1])
        rows.append({k: v for k, v in case.items() if k != "flops_per_token"})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if name in PEERS and not args.no_peers and not args.batch_size:
            rows.append(run_peer(case, case["steps"]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        else:
            peerless.append(name)
    record.print_table(rows)
    notes = [
        "Each jaxlm case runs in its own process: the real jitted, donated train step, batches built on the "
        "host while the previous step runs, after one warm-up step (its time is compile_s). ms_per_step is the "
        "mean over the timed steps for every row (the peers exclude their first steps: nanoGPT 10 of 20 or "
        "more, transformers 2, as warm-up). FLOPs per token are GPTConfig.flops_per_token (6N + 12LTD), the "
        "same for a case's peer; mfu_pct is against the sustained 2048x2048 jitted matmul of the case's "
        "dtype, measured 3 s before and after its timed steps and averaged (the peer's row uses its case's).",
        "Peers run the same shapes in PyTorch eager with torch's default threads, random init of their own: "
        "nanoGPT's model and step (bench/nanogpt_torch.py, same tokens) after nanogpt-cpu, transformers' "
        "GPT2LMHeadModel step with AdamW and clipping on random tokens (bench/hf_train_torch.py) after gpt2-f32.",
    ]
    if peerless:
        why = "--no-peers" if args.no_peers else ("--batch-size" if args.batch_size else "no peer is defined")
        notes.append(f"No peer for {', '.join(peerless)} ({why}).")
    name = "train" + ("" if cases == list(DEFAULT) else "_" + "_".join(cases))
    name += f"_b{args.batch_size}" if args.batch_size else ""
    print(record.save(name, rows, notes="\n\n".join(notes)))


if __name__ == "__main__":
    main()
