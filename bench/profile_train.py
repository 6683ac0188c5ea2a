"""Where a training step's time goes: forward vs value_and_grad vs the whole step, and a per-op profile.

    XLA_FLAGS=--xla_force_host_platform_device_count=1 python bench/profile_train.py
    python bench/profile_train.py --config nanogpt-cpu --steps 20 --calls 40

Prints the median wall and process CPU milliseconds per call of the jitted forward + loss, its
value_and_grad and the real train step (`jit_train_step`, AdamW included), then a table of the step's
kernels from a `jax.profiler` trace, grouped by phase (forward, backward, optimizer: read from each
op's `jvp(...)` / `transpose(jvp(...))` metadata in the compiled HLO) and kind (YNNPACK dot or
reduction fusions, other dots, copy/transpose fusions, scatter/gather, elementwise fusions).
CPU time is printed beside wall time because on a shared machine the wall clock also counts waiting
for a core; kernel durations in the trace are wall time too, so read the table as shares. Writes
bench/results/profile_train.json (profile_train_CONFIG.json for another --config).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import resource
import statistics
import tempfile
import time


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _time(f, calls: int) -> tuple[float, float]:
    """(median wall ms, mean CPU ms) per call of f, after two warm-up calls."""
    import jax

    jax.block_until_ready(f())
    jax.block_until_ready(f())
    walls, c0 = [], _cpu_s()
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(f())
        walls.append(time.perf_counter() - t)
    return 1000 * statistics.median(walls), 1000 * (_cpu_s() - c0) / calls


def _kind(name: str, op_name: str) -> str:
    base = re.sub(r"\.\d+$", "", name)
    if base == "ynn_fusion":
        return "YNNPACK dot" if "dot_general" in op_name else "YNNPACK reduce/other"
    if base in ("dot", "dot_general"):
        return "dot (not YNNPACK)"
    if "transpose" in base or "copy" in base:
        return "copy/transpose fusion"
    if "scatter" in base or "gather" in base:
        return "scatter/gather"
    return "elementwise/reduce fusion"


def _hlo_ops(hlo_text: str) -> dict:
    """Instruction name -> its op_name metadata, from compiled HLO text."""
    ops = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = op.group(1) if op else ""
    return ops


def profile_table(trace_dir: str, ops: dict, steps: int) -> list[tuple[str, str, float, float, float]]:
    """[(phase, kind, kernels per step, ms per step, share)] from a perfetto trace of `steps` steps."""
    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    us, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["name"] not in ops:
            continue
        op = ops[e["name"]]
        phase = "backward" if "transpose(jvp" in op else ("forward" if "jvp(" in op else "optimizer")
        key = (phase, _kind(e["name"], op))
        us[key] += e.get("dur", 0)
        count[key] += 1
    total = sum(us.values())
    return [(p, k, count[(p, k)] / steps, v / steps / 1000, v / total) for (p, k), v in us.most_common()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="nanogpt-cpu", help="TrainConfig preset")
    p.add_argument("--dataset", default="shakespeare_char", help="only its vocabulary size is used")
    p.add_argument("--calls", type=int, default=40, help="timed calls of each function")
    p.add_argument("--steps", type=int, default=20, help="profiled steps")
    args = p.parse_args()

    import record  # the run's start time and load average

    from jaxlm.train.runtime import keep_freed_memory

    keep_freed_memory()  # as train.py does for small models: no page faults from freed step buffers
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxlm.train as trainer
    from jaxlm import data
    from jaxlm.config import TrainConfig
    from jaxlm.parallel import sharding

    cfg = TrainConfig.preset(args.config, dataset=args.dataset)
    config = cfg.model_config(data.resolve_dataset(cfg.dataset, cfg.tokenizer).vocab_size)
    mesh = sharding.make_mesh(cfg.mesh)
    tx = trainer.make_optimizer(cfg)
    loss_fn = trainer.lm_loss(config)
    A, B, T = cfg.gradient_accumulation_steps, cfg.batch_size, cfg.block_size
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (A, B, T + 1)).astype(np.int32)
    with sharding.activate(mesh):
        _, shardings = trainer.model_layout(config, tx, mesh)
        step_fn = trainer.jit_train_step(loss_fn, tx, trainer.lr_schedule(cfg), shardings, mesh)
        box = [trainer.new_state(config, tx, shardings, cfg.seed)]
        params = jax.tree.map(jnp.copy, box[0]["params"])  # the step donates its state
        batch = trainer.Batch(jax.device_put(tokens, trainer.batch_sharding(mesh)))
        one = trainer.Batch(jnp.asarray(tokens[0]))
        fwd = jax.jit(lambda p, b: loss_fn(p, None, b, None)[0])
        vg = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, None, b, None)[0]))

        def step():
            box[0], metrics = step_fn(box[0], batch)
            return metrics

        gflop = config.flops_per_token(T) * A * B * T / 1e9
        print(f"{gflop:.2f} GFLOP per step (6N + 12LTD per token)")
        timed = []
        functions = (("forward + loss", lambda: fwd(params, one)), ("value_and_grad", lambda: vg(params, one)))
        for name, f in (*functions, ("train step (jit_train_step, AdamW)", step)):
            wall, cpu = _time(f, args.calls)
            print(f"{name:16s} {wall:8.2f} ms wall {cpu:8.2f} ms CPU (median / mean of {args.calls})")
            timed.append({"table": "functions", "function": name, "wall_ms_median": round(wall, 2)})
            timed[-1]["cpu_ms_mean"] = round(cpu, 2)

        ops = _hlo_ops(step_fn.lower(box[0], batch).compile().as_text())
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(args.steps):
                    jax.block_until_ready(step())
            rows = profile_table(trace_dir, ops, args.steps)
    print(f"\nkernels of the step ({sum(r[2] for r in rows):.0f} per step, {jax.device_count()} device(s))")
    print("| phase | kind | kernels/step | ms/step | share |\n|---|---|---|---|---|")
    for phase, kind, n, ms, share in rows:
        print(f"| {phase} | {kind} | {n:.0f} | {ms:.2f} | {100 * share:.1f}% |")
    kernels = [
        {"table": "kernels of the step", "phase": ph, "kind": k, "kernels_per_step": round(n)}
        | {"ms_per_step": round(ms, 2), "share_pct": round(100 * share, 1)}
        for ph, k, n, ms, share in rows
    ]
    notes = (
        f"TrainConfig preset {args.config} ({gflop:.2f} GFLOP per step, 6N + 12LTD per token), "
        f"{jax.device_count()} device(s), random tokens; functions timed over {args.calls} calls after two "
        f"warm-up calls (wall: median, CPU: the process's mean per call); kernels from a `jax.profiler` trace of "
        f"{args.steps} steps, grouped by the compiled HLO's `jvp` / `transpose(jvp)` metadata (phase) and op "
        "(kind). Kernel durations are wall time: on a loaded machine read them as shares."
    )
    name = "profile_train" + ("" if args.config == "nanogpt-cpu" else f"_{args.config}")
    print(record.save(name, timed + kernels, notes=notes))


if __name__ == "__main__":
    main()
