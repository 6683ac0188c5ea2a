"""LoRA against full fine-tuning: step time, peak memory and optimizer-state bytes, each case in its own process.

    python bench/bench_lora.py                      # GPT-2 124M shape, batch 4 x 256, float32
    python bench/bench_lora.py --size tiny --steps 3  # the same on a 2-layer model, to try it

Both cases run jaxlm's real train step (jit_train_step, state donated) on a random-init model and random
tokens: full fine-tuning trains every param; LoRA r=8 on c_attn trains the adapters, the base passed through
as the frozen part. Step time is the median of the timed steps after a warm-up step; peak memory is the
process's maximum resident set size (a fresh process per case, so one case's memory never counts for the
other; it also holds the Python/XLA runtime and the compiler's own peak, which both cases pay); step memory is
what XLA's buffer assignment gives the compiled step (arguments + outputs + temporaries - donated aliases: the
device memory a GPU or TPU would need for the step); optimizer-state bytes are the sizes of the AdamW state's
arrays. The rows add the RSS peaks after building the state and after compiling. Writes
bench/results/lora.json (lora_tiny.json for --size tiny; a non-default --batch-size adds _bN).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=256),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, vocab_size=512, block_size=64),
}
CASES = ("full", "lora")


def run_case(case: str, size: str, steps: int, batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxlm.train as trainer
    from jaxlm import lora
    from jaxlm.config import TrainConfig
    from jaxlm.model import init_params
    from jaxlm.parallel import sharding
    from jaxlm.train import adapters as train_lora

    shape = SIZES[size]
    cfg = TrainConfig(
        **{k: shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size")},
        vocab_size=shape["vocab_size"],
        batch_size=batch,
        dtype="float32",
        dropout=0.0,
        scan_layers=True,
        warmup_iters=0,
    )
    trainer.apply_layout(trainer.host_layout(cfg.to_dict()))  # as train.py does
    config = cfg.model_config(shape["vocab_size"])
    mesh = sharding.make_mesh(cfg.mesh)
    tx = trainer.make_optimizer(cfg)
    B, T = cfg.batch_size, cfg.block_size
    with sharding.activate(mesh):
        if case == "full":
            _, shardings = trainer.model_layout(config, tx, mesh)
            step_fn = trainer.jit_train_step(trainer.lm_loss(config), tx, trainer.lr_schedule(cfg), shardings, mesh)
            state = trainer.new_state(config, tx, shardings, cfg.seed)
        else:
            lc = lora.LoraConfig(rank=8, alpha=16, targets=("c_attn",))
            _, shardings = train_lora.lora_layout(config, lc, tx, mesh)
            loss_fn = train_lora.lora_seam(config, lc)
            step_fn = trainer.jit_train_step(loss_fn, tx, trainer.lr_schedule(cfg), shardings, mesh)
            base = jax.jit(lambda k: init_params(config, k), out_shardings=shardings["frozen"])(jax.random.key(0))
            state = train_lora.new_lora_state(config, lc, tx, shardings, cfg.seed, base)
            del base
        opt_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(state["opt_state"]))
        trainable = lora.count(state["params"])
        rng = np.random.default_rng(0)
        batch_sh = trainer.batch_sharding(mesh)

        def batch_of():
            tokens = rng.integers(0, config.vocab_size, (1, B, T + 1), dtype=np.int32)
            return trainer.Batch(jax.device_put(jnp.asarray(tokens), batch_sh))

        peak_state_mb = _peak_rss_mb()
        t = time.perf_counter()
        compiled = step_fn.lower(state, batch_of()).compile()
        compile_s = time.perf_counter() - t
        peak_compile_mb = _peak_rss_mb()
        mem = compiled.memory_analysis()  # the step's own buffers, as XLA assigned them
        step_mb = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**20
        step_mb -= mem.alias_size_in_bytes / 2**20  # donated state: outputs reuse the inputs' buffers
        state, m = compiled(state, batch_of())  # warm-up
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            b = batch_of()
            t = time.perf_counter()
            state, m = compiled(state, b)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
    return {
        "case": case,
        "size": size,
        "trainable": trainable,
        "ms_per_step": 1000 * float(np.median(times)),
        "compile_s": compile_s,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_state_mb": peak_state_mb,
        "peak_rss_compile_mb": peak_compile_mb,
        "step_mb": step_mb,
        "temp_mb": mem.temp_size_in_bytes / 2**20,
        "opt_state_mb": opt_bytes / 1e6,
        "loss": float(m["loss"]),
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="gpt2")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up step")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--case", choices=CASES, default=None, help="run one case here and print its JSON")
    args = p.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args.size, args.steps, args.batch_size)))
        return
    import record  # the run's start time and load average

    results = {}
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--size", args.size, "--steps", str(args.steps)]
        cmd += ["--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[case] = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
    rows = []
    for case, r in results.items():
        rows.append(
            {
                "case": "full fine-tuning" if case == "full" else "LoRA r=8 on c_attn",
                "trainable_params": r["trainable"],
                "ms_per_step_median": round(r["ms_per_step"], 1),
                "peak_rss_mb": round(r["peak_rss_mb"]),
                "step_buffers_mb": round(r["step_mb"]),
                "step_temporaries_mb": round(r["temp_mb"]),
                "opt_state_mb": round(r["opt_state_mb"], 2),
                "peak_rss_after_state_mb": round(r["peak_rss_state_mb"]),
                "peak_rss_after_compile_mb": round(r["peak_rss_compile_mb"]),
                "compile_s": round(r["compile_s"], 1),
                "loss": round(r["loss"], 3),
            }
        )
    full, lo = rows
    ratio = {k: lo[k] / full[k] for k in full if isinstance(full[k], int | float) and full[k] and k != "loss"}
    record.print_table(rows)
    shape = SIZES[args.size]
    notes = (
        f"{args.size} shape ({shape['n_layer']} layers x {shape['n_embd']}, vocabulary {shape['vocab_size']}), "
        f"random init and random tokens, batch {args.batch_size} x {shape['block_size']}, float32, "
        f"{args.steps} timed steps after a warm-up step, each case in a fresh process. LoRA / full: step time "
        f"{ratio['ms_per_step_median']:.2f}x, peak RSS {ratio['peak_rss_mb']:.2f}x, step buffers "
        f"{ratio['step_buffers_mb']:.2f}x, optimizer state {100 * ratio['opt_state_mb']:.2f}%, trainable "
        f"parameters {100 * ratio['trainable_params']:.2f}%. Step buffers are XLA's buffer assignment for the "
        "compiled step (arguments + outputs + temporaries - donated aliases: the device memory a GPU or TPU "
        "would need); peak RSS also holds the runtime and the compiler's own peak, which both cases pay."
    )
    name = "lora" + ("" if args.size == "gpt2" else f"_{args.size}")
    name += "" if args.batch_size == 4 else f"_b{args.batch_size}"
    print(record.save(name, rows, notes=notes))


if __name__ == "__main__":
    main()
