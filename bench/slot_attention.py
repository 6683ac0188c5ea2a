"""Why a serving step's attention on a CPU is jaxlm's kernel: `decode.step_rows`'s attention by form.

    python bench/slot_attention.py                          # 8, 32 and 64 rows at 64, 256 and 1024 positions
    python bench/slot_attention.py --rows 32 --positions 256

One layer of GPT-2 124M's shape (12 heads of 64): each of `rows` rows, in a cache of `rows` slots, attends to
all its `positions` (the longest a serving step meets at that --max-len). Forms: "chunks" (XLA's products, 64
cache positions at a time: `decode.attend_chunks`, what a GPU or TPU runs) and "native" (`jaxlm.cpu.native`'s
kernel, each row and head over its own slot: what a CPU with AVX2 and FMA runs). Prints the best of `--reps`
calls in ms and the cache bytes read per second (keys and values once); writes bench/results/slot_attention.json.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import record  # early: the run's start time and load average

from jaxlm.cpu import native
from jaxlm.generation import decode

H, K = 12, 64


def forms(positions_B, slots_B):
    return {
        "chunks": lambda q, k, v: decode.attend_chunks(q, k, v, positions_B=positions_B, chunk=64, slots_B=slots_B),
        "native": lambda q, k, v: decode._attend_native(q, k, v, positions_B=positions_B, slots_B=slots_B),
    }


def best_ms(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="8,32,64")
    p.add_argument("--positions", default="64,256,1024")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    why = native.attention_unavailable("float32")
    rng = np.random.default_rng(0)
    out = []
    print("| rows | positions | form | ms | GB/s of cache |\n|---|---|---|---|---|")
    for R in map(int, args.rows.split(",")):
        for S in map(int, args.positions.split(",")):
            k, v = (jnp.asarray(rng.standard_normal((R, H, S, K)), jnp.float32) for _ in "kv")
            q = jnp.asarray(rng.standard_normal((R, H, 1, K)), jnp.float32)
            slots, positions = jnp.arange(R, dtype=jnp.int32)[::-1], jnp.full((R,), S - 1, jnp.int32)
            for name, form in forms(positions, slots).items():
                if name == "native" and why:
                    continue
                ms = best_ms(jax.jit(form), (q, k, v), args.reps)
                gbps = round(2 * R * H * S * K * 4 / ms / 1e6, 1)
                print(f"| {R} | {S} | {name} | {ms:.2f} | {gbps} |", flush=True)
                out.append({"rows": R, "positions": S, "form": name, "ms": round(ms, 3), "cache_gbps": gbps})
    notes = (
        f"one layer (12 heads of 64, float32), every row attending to all its positions, slots in reverse "
        f"order; the best of {args.reps} calls. cache_gbps: keys and values bytes over the time."
    )
    if why:
        notes += f" The native form was not run: {why}."
    print(record.save("slot_attention", out, notes=notes))


if __name__ == "__main__":
    main()
