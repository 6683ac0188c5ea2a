"""Decode speed: jaxlm.generate vs transformers PyTorch and HF's Flax GPT-2, GPT-2 124M shape, CPU, same run.

    python bench/bench_generate.py --hf-flax-python PATH   # PATH: a Python with transformers 4.57, flax, jax
    python bench/bench_generate.py --dtypes float32,bfloat16 --hf-flax-python PATH  # bf16 rows too

Greedy, 8-token prompt, 128 new tokens (no early stop), batch 1 and 8, float32 (and bfloat16), random
weights shared by jaxlm and PyTorch (jaxlm's init written out with `jaxlm.to_hf`); HF Flax runs
`jax.jit(model.generate)` on its own random init (bench/hf_flax_generate.py, a subprocess). Then
beam search with 4 beams, jaxlm against PyTorch (float32, batch 1). jaxlm's tokens/s is the decode
loop's (batch x steps / time; compile and prefill excluded, both reported); the peers' is the whole
`generate` call (their prefill of 8 tokens is about one step). The bandwidth bound is the parameter
bytes read per step over a measured read bandwidth (a jitted sum of a 512 MB array); a row at a
large fraction of it is bandwidth-bound, one far below it compute-bound. JAXLM_NATIVE=0 times decoding
without jaxlm's native kernels (XLA's products), as on a CPU without AVX-512. bfloat16 rows are asked for
with --dtypes: on a CPU without AVX-512 BF16 or AMX, PyTorch's bf16 generate is emulated and slow (on a
2-core AMD EPYC with AVX2 only, shared, its bf16 rows had not finished after 40 minutes). Writes
bench/results/generate.json (generate_native_off.json under JAXLM_NATIVE=0; another shape adds _LnDn).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import record  # early: the run's start time and load average

import jaxlm
from jaxlm.generation.generator import Generator

PROMPT, NEW = 8, 128
BEAMS = 4


def read_bandwidth(nbytes: int = 512 * 2**20, reps: int = 10) -> float:
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(lambda a: a.sum())
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def bench_jaxlm(gen: Generator, batch: int, reps: int, **options):
    prompts = [list(range(1000, 1000 + PROMPT))] * batch
    runs = []
    for _ in range(reps + 1):  # the first call compiles
        out = gen(prompts, max_new_tokens=NEW, temperature=0.0, eos_id=None, **options)
        runs.append(gen.stats)
    compile_s = runs[0].compile_s
    best = min(runs[1:], key=lambda s: s.decode_s)
    assert best.steps == NEW and all(len(r) == NEW for r in out)
    return best, compile_s, out


def bench_hf_flax(python: str, batch: int, dtype: str, reps: int, config) -> dict:
    """HF's Flax GPT-2 in its own venv: {"tok_per_s", "compile_s", versions}, or {"absent": why}."""
    script = Path(__file__).with_name("hf_flax_generate.py")
    cmd = [python, str(script), "--batch", str(batch), "--prompt", str(PROMPT), "--new", str(NEW)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd += ["--dtype", dtype, "--reps", str(reps), "--n-layer", str(config.n_layer), "--n-embd", str(config.n_embd)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    except OSError as e:
        return {"absent": f"--hf-flax-python could not be started ({e.strerror})"}
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"HF Flax bench failed, recorded as absent:\n{r.stderr[-2000:]}", file=sys.stderr)
        return {"absent": f"the HF Flax run failed: {last[:200]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_model_apply(config, params, batch: int, reps: int) -> float:
    """The same greedy loop through the training model (`GPT.apply` with its stacked KV cache): tok/s."""
    model = jaxlm.GPT(config)

    @jax.jit
    def run(params, tokens_BxP):
        cache = jaxlm.init_cache(config, batch, PROMPT + NEW)
        logits, cache = model.apply({"params": params}, tokens_BxP, cache=cache, cache_index=0, method=jaxlm.GPT.decode)

        def body(carry):
            i, tok_B, cache = carry
            logits, cache = model.apply(
                {"params": params}, tok_B[:, None], cache=cache, cache_index=PROMPT + i - 1, method=jaxlm.GPT.decode
            )
            return i + 1, jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

        start = (jnp.int32(1), jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache)
        return jax.lax.while_loop(lambda c: c[0] < NEW, body, start)[1]

    tokens = jnp.asarray([list(range(1000, 1000 + PROMPT))] * batch, jnp.int32)
    run(params, tokens).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run(params, tokens).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return batch * NEW / best


def bench_torch(model, batch: int, reps: int, threads: int, **options):
    import torch

    torch.set_num_threads(threads)
    ids = torch.arange(1000, 1000 + PROMPT)[None].repeat(batch, 1)
    mask = torch.ones_like(ids)
    best, out = float("inf"), None
    with torch.inference_mode():
        for i in range(reps + 1):
            t0 = time.perf_counter()
            out = model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, **options
            )
            if i:
                best = min(best, time.perf_counter() - t0)
    assert out.shape == (batch, PROMPT + NEW)
    return batch * NEW / best, out[:, PROMPT:].tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtypes", default="float32", help="e.g. float32,bfloat16 (see the docstring on bf16)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per row (best is reported)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    p.add_argument("--hf-flax-python", default=None, help="a Python with transformers 4.57 + flax (None: skip)")
    p.add_argument("--no-beams", action="store_true", help="skip the beam search rows")
    p.add_argument("--beam-dtypes", default="float32", help="dtypes of the beam search rows, e.g. float32,bfloat16")
    p.add_argument("--model-apply", action="store_true", help="also time the loop through GPT.apply's cache")
    p.add_argument("--n-layer", type=int, default=12, help="GPT-2 124M's; fewer to try the script quickly")
    p.add_argument("--n-embd", type=int, default=768, help="GPT-2 124M's (heads: n_embd / 64)")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")

    shape = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=max(args.n_embd // 64, 1))
    config = jaxlm.GPTConfig.preset("gpt2", **shape)
    params = jax.jit(jaxlm.init_params, static_argnums=0)(config, jax.random.key(0))
    f32_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - params["wpe"]["embedding"].nbytes
    model = None
    if not args.no_torch:
        import transformers

        with tempfile.TemporaryDirectory() as d:
            jaxlm.to_hf(config, params, f"{d}/gpt2")
            model = transformers.GPT2LMHeadModel.from_pretrained(f"{d}/gpt2").eval()
        model.generation_config.pad_token_id = 50256
    bandwidth = read_bandwidth()

    rows, flax_absent, flax_versions = [], set(), {}

    def row(what, b, stats, compile_s, torch_tps, flax, apply_tps, bound, same):
        peers = [x for x in (torch_tps, flax.get("tok_per_s")) if x]
        flax_absent.update([flax["absent"]] if "absent" in flax else [])
        flax_versions.update({f"HF Flax venv {k}": v for k, v in flax.items() if k in ("transformers", "flax", "jax")})
        out = {
            "decode": what,
            "batch": b,
            "jaxlm_tok_per_s": round(stats.tokens_per_s, 1),
            "jaxlm_ms_per_step": round(1e3 * stats.decode_s / stats.steps, 1),
            "jaxlm_of_bandwidth_bound_pct": round(100 * stats.tokens_per_s / bound, 1),
            "torch_tok_per_s": None if torch_tps is None else round(torch_tps, 1),
            "hf_flax_tok_per_s": flax.get("tok_per_s"),
            "jaxlm_over_best_peer": round(stats.tokens_per_s / max(peers), 2) if peers else None,
            "jaxlm_compile_s": round(compile_s, 1),
            "hf_flax_compile_s": flax.get("compile_s"),
            "jaxlm_prefill_ms": round(1e3 * stats.prefill_s),
            "same_tokens_as_torch": same,
        }
        if args.model_apply:
            out["gpt_apply_loop_tok_per_s"] = None if apply_tps is None else round(apply_tps, 1)
        rows.append(out)

    def same_as(theirs, ours, dtype):
        return None if theirs is None or dtype != "float32" else theirs == ours

    no_flax = {"absent": "no --hf-flax-python given"}
    for dtype in dtypes:
        gen = Generator(params, config, dtype=dtype)
        weight_bytes = f32_bytes * jnp.dtype(dtype).itemsize // 4
        for b in batches:
            stats, compile_s, ours = bench_jaxlm(gen, b, args.reps)
            torch_tps, theirs = (None, None)
            if model is not None:
                import torch

                # A cast copy: casting `model` itself in place and back would leave its weights bf16-rounded
                # (the beam row once compared against such a model and so "differed" from jaxlm).
                cast = model if dtype == "float32" else copy.deepcopy(model).to(getattr(torch, dtype))
                torch_tps, theirs = bench_torch(cast, b, args.reps, args.threads)
                del cast
            flax = bench_hf_flax(args.hf_flax_python, b, dtype, args.reps, config) if args.hf_flax_python else no_flax
            apply_tps = bench_model_apply(config, params, b, 1) if args.model_apply and dtype == "float32" else None
            bound = b * bandwidth / weight_bytes
            row(f"greedy {dtype}", b, stats, compile_s, torch_tps, flax, apply_tps, bound, same_as(theirs, ours, dtype))
        del gen
    for dtype in [] if args.no_beams else args.beam_dtypes.split(","):
        gen = Generator(params, config, dtype=dtype)
        stats, compile_s, ours = bench_jaxlm(gen, 1, args.reps, num_beams=BEAMS, min_new_tokens=NEW, do_sample=False)
        torch_tps, theirs = (None, None)
        if model is not None:
            import torch

            cast = model if dtype == "float32" else copy.deepcopy(model).to(getattr(torch, dtype))
            torch_tps, theirs = bench_torch(cast, 1, args.reps, args.threads, num_beams=BEAMS)
            del cast
        # tok/s of beam search: returned tokens (batch x new) per second, as for the peers
        bound = BEAMS * bandwidth / (f32_bytes * jnp.dtype(dtype).itemsize // 4) / BEAMS
        flax = {"absent": "beam search is not timed for HF Flax"}
        row(f"beam {BEAMS} {dtype}", 1, stats, compile_s, torch_tps, flax, None, bound, same_as(theirs, ours, dtype))

    products = {d: jaxlm.cpu.native.unavailable(d) for d in dtypes}
    for dtype, why in products.items():
        print(f"{dtype} decode products: {'jaxlm.cpu.native kernel' if why is None else f'XLA ({why})'}")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; weights read per step {f32_bytes / 1e6:.0f} MB (float32)\n")
    record.print_table(rows)
    notes = [
        f"GPT-2 shape {config.n_layer} layers x {config.n_embd} wide, random weights (jaxlm's init, written out "
        f"with `jaxlm.to_hf` for PyTorch; HF Flax runs its own random init); {PROMPT}-token prompt, {NEW} new "
        f"tokens without early stop; best of {args.reps} timed runs per row, each row's sides run one after "
        "another. jaxlm's tok/s is its decode loop's (compile and prefill excluded, both reported); the peers' "
        "is their whole `generate` call (a prefill of 8 tokens is about one step). Beam search counts returned "
        "tokens.",
        "Decode products: "
        + "; ".join(f"{d} {'jaxlm native kernel' if w is None else f'XLA ({w})'}" for d, w in products.items())
        + ".",
        f"The bandwidth bound is batch x read bandwidth / weight bytes per step ({f32_bytes / 1e6:.0f} MB in "
        f"float32; read bandwidth {bandwidth / 1e9:.1f} GB/s, the best of 10 jitted sums over 512 MB in this "
        "run): a row near 100% is bandwidth-bound, one far below it compute-bound.",
        f"PyTorch: {args.threads} threads" if model is not None else "PyTorch: not run (--no-torch).",
    ]
    if flax_absent:
        notes.append("HF Flax: " + "; ".join(sorted(flax_absent)) + ".")
    if args.hf_flax_python:
        notes.append("PATH: a Python of its own with transformers 4.57 (the last with Flax models), flax and jax.")
    name = "generate" + ("_native_off" if os.environ.get("JAXLM_NATIVE") == "0" else "")
    if (config.n_layer, config.n_embd) != (12, 768):
        name += f"_L{config.n_layer}_D{config.n_embd}"
    print(record.save(name, rows, notes="\n\n".join(notes), extra_versions=flax_versions))


if __name__ == "__main__":
    main()
