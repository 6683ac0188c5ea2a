"""Why `jaxlm.generation.decode._linear` takes the form it takes: x @ W.T over GPT-2 124M's 48 layer kernels, by form.

    python bench/decode_linear.py                       # float32 and bfloat16, 1, 2, 8 and 32 rows, every form
    python bench/decode_linear.py --dtypes bfloat16 --rows 1,8
    python bench/decode_linear.py --rows 1,8,32,64,128 --forms matmul,jaxlm,native

Each row times one jitted program that applies all 48 kernels ([out, in], the decode layout) to their own
inputs, each product behind an optimization barrier so XLA cannot fuse it into a neighbour, and prints the
median ms and the weight bytes read per second. Forms: "matmul" (einsum, float32 accumulation), "fused"
(a multiply-reduce, products in float32), "jaxlm" (whatever `decode._linear` picks for that dtype and
row count on unpacked weights in a CPU program, `products="cpu_fused"`: XLA's forms) and "native"
(`jaxlm.cpu.native`'s AVX-512 kernel on packed weights, which decoding uses where it runs). A decode step of
the 124M model reads these kernels plus the 50257 x 768 head.
Writes bench/results/decode_linear.json (decode_linear_native_off.json under JAXLM_NATIVE=0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import record  # early: the run's start time and load average
from jax import lax

from jaxlm.cpu import native
from jaxlm.generation import decode

D = 768
KERNELS = [(3 * D, D), (D, D), (4 * D, D), (D, 4 * D)] * 12  # qkv, attn proj, fc, mlp proj; 12 layers

FORMS = {
    "matmul": lambda x, w: jnp.einsum("nd,od->no", x, w, preferred_element_type=jnp.float32),
    "fused": lambda x, w: jnp.sum(w.astype(jnp.float32) * x[:, None, :].astype(jnp.float32), axis=-1),
    "jaxlm": lambda x, w: decode._linear(x, w, out_dtype=jnp.float32, products="cpu_fused"),
    # jaxlm.cpu.native's kernel on weights packed as decode.prepare packs them
    "native": lambda x, w: native.linear(x, w, 16 * w.shape[0]),
}


def time_form(form, dtype: str, rows: int, reps: int) -> float:
    """Median ms of one program applying `form` to every kernel."""
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal(s) * 0.02, dtype) for s in KERNELS]
    if form is FORMS["native"]:
        ws = [jnp.asarray(native.pack(np.asarray(w))) for w in ws]
    xs = [jnp.asarray(rng.standard_normal((rows, s[1])), dtype) for s in KERNELS]

    @jax.jit
    def run(xs, ws):
        return sum(
            lax.optimization_barrier(form(lax.optimization_barrier(x), w)).sum() for x, w in zip(xs, ws, strict=True)
        )

    run(xs, ws).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(xs, ws).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rows", default="1,2,8,32", help="rows of x (batch x tokens of one step)")
    p.add_argument("--forms", default=",".join(FORMS), help=f"of {', '.join(FORMS)}")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    print("| dtype | rows | form | ms | GB/s of weights |\n|---|---|---|---|---|")
    rows, skipped = [], {}
    for dtype in args.dtypes.split(","):
        nbytes = sum(o * i for o, i in KERNELS) * jnp.dtype(dtype).itemsize
        for n in map(int, args.rows.split(",")):
            for name in args.forms.split(","):
                if name == "native" and (why := native.unavailable(dtype)):
                    skipped[dtype] = why
                    continue
                ms = time_form(FORMS[name], dtype, n, args.reps)
                print(f"| {dtype} | {n} | {name} | {ms:.2f} | {nbytes / ms / 1e6:.1f} |", flush=True)
                gbps = round(nbytes / ms / 1e6, 1)
                rows.append({"dtype": dtype, "rows": n, "form": name, "ms": round(ms, 2), "weights_gbps": gbps})
    notes = (
        f"GPT-2 124M's 48 layer kernels in one jitted program, each product behind an optimization barrier; "
        f"the median of {args.reps} calls. weights_gbps is the kernels' bytes read per second."
    )
    if skipped:
        notes += " The native form was not run: " + "; ".join(f"{d}: {w}" for d, w in skipped.items()) + "."
    name = "decode_linear" + ("_native_off" if os.environ.get("JAXLM_NATIVE") == "0" else "")
    print(record.save(name, rows, notes=notes))


if __name__ == "__main__":
    main()
