"""Greedy decode speed of Hugging Face's Flax GPT-2 (`jax.jit(model.generate)`), run by bench_generate.py
in a Python that has transformers 4.57 (the last with Flax models) via --hf-flax-python.

    python bench/hf_flax_generate.py --batch 1 --prompt 8 --new 128 --dtype float32

Prints one JSON line: tok/s of the best timed call, the first call's seconds (compile included) and the
versions of this Python's transformers, flax and jax.
"""

import argparse
import json
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import transformers

p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--batch", type=int, default=1)
p.add_argument("--prompt", type=int, default=8)
p.add_argument("--new", type=int, default=128)
p.add_argument("--reps", type=int, default=2)
p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
p.add_argument("--n-layer", type=int, default=12)
p.add_argument("--n-embd", type=int, default=768)
args = p.parse_args()

cfg = transformers.GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=max(args.n_embd // 64, 1))
dtype = jnp.dtype(args.dtype)
model = transformers.FlaxGPT2LMHeadModel(cfg, seed=0, dtype=dtype)
if args.dtype == "bfloat16":
    model.params = model.to_bf16(model.params)
ids = jnp.asarray(np.arange(1000, 1000 + args.prompt)[None].repeat(args.batch, 0), jnp.int32)
# No EOS: every row runs all new tokens, as on the other sides.
gen = jax.jit(
    lambda params, ids: (
        model.generate(
            ids, params=params, max_length=args.prompt + args.new, do_sample=False, eos_token_id=None, pad_token_id=0
        ).sequences
    )
)
t0 = time.perf_counter()
out = jax.block_until_ready(gen(model.params, ids))
compile_s = time.perf_counter() - t0
best = float("inf")
for _ in range(args.reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(gen(model.params, ids))
    best = min(best, time.perf_counter() - t0)
assert out.shape == (args.batch, args.prompt + args.new), out.shape
print(
    json.dumps(
        {
            "tok_per_s": round(args.batch * args.new / best, 2),
            "compile_s": round(compile_s, 1),
            "transformers": transformers.__version__,
            "flax": flax.__version__,
            "jax": jax.__version__,
        }
    )
)
