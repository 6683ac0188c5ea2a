"""Where an eval forward's time goes: GPT-2 124M shape (random init), WikiText-2-sized windows of 1024
tokens scoring their last 512 (the stride-512 case), one `jax.profiler` trace, kernels grouped by what
they compute (read from each op's name metadata in the compiled HLO).

    python bench/profile_eval.py                  # batch 1, 3 traced batches
    python bench/profile_eval.py --batch-size 8

Freed memory is kept as `python -m jaxlm.eval` keeps it. Kernel durations are wall time: on a busy machine
read the table as shares. Writes bench/results/profile_eval.json (profile_eval_bN.json for --batch-size N).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import tempfile
import time

from profile_train import _hlo_ops

GROUPS = (  # (group, substring of the op_name metadata), first match wins
    ("attention: q k^T, mask, softmax, p v", ("bhts", "bhtk", "_where", "attn/reduce", "attn/exp", "attn/div")),
    ("LM head on scored positions", ("vd,nd",)),
    ("c_attn (q, k, v)", ("c_attn",)),
    ("c_proj (attention out, MLP out)", ("c_proj",)),
    ("c_fc + GELU", ("c_fc", "mlp/")),
    ("LayerNorm", ("ln_",)),
    ("layer weights sliced from the stacked arrays", ("dynamic_slice", "dynamic_index")),
    ("residual adds, embeddings, the layer loop", ("GPT/",)),
    ("log-softmax and argmax over the vocabulary", ("_score",)),  # what is left outside the model
)


def _group(name: str, op: str) -> str:
    for group, keys in GROUPS:
        if any(k in op for k in keys):
            return group
    return "attention: q k^T, mask, softmax, p v" if name.startswith("ynn_fusion") and not op else "other"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--batches", type=int, default=3, help="traced batches")
    args = p.parse_args()

    import record  # the run's start time and load average

    from jaxlm.cpu.allocator import keep_freed_memory

    keep_freed_memory()
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlm.config import GPTConfig
    from jaxlm.eval.loglik import Request, Scorer
    from jaxlm.model import GPT

    c = GPTConfig.preset("gpt2")
    params = nn.unbox(jax.jit(lambda k: GPT(c).init(k, jnp.zeros((1, 8), jnp.int32)))(jax.random.key(0))["params"])
    B = args.batch_size
    rng = np.random.default_rng(0)
    reqs = [Request(tuple(rng.integers(0, c.vocab_size, c.block_size + 1).tolist()), 512) for _ in range(B)]
    scorer = Scorer(params, c, batch_size=B)
    scorer.score(reqs)
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        scorer.score(reqs)
        walls.append((time.perf_counter() - t0) / B)
    wall = sorted(walls)[1]
    print(f"{B} x {c.block_size} tokens per batch: {wall:.2f} s per window (median of 3)")

    T, H = c.block_size, 512
    shapes = (np.zeros((B, T), np.int32), np.zeros((B, H), np.int32), np.zeros((B, H), np.int32))
    ops = _hlo_ops(scorer._fn.lower(params, *shapes).compile().as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.batches):
                scorer.score(reqs)
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    us = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in ops:
            us[_group(e["name"], ops[e["name"]])] += e.get("dur", 0)
    total = sum(us.values())
    per_window = 1e3 * args.batches * B
    print(f"kernels: {total / per_window:.0f} ms per window\n\n| kernels | ms per window | share |\n|---|---:|---:|")
    rows = []
    for group, v in us.most_common():
        print(f"| {group} | {v / per_window:.0f} | {v / total:.1%} |")
        rows.append({"table": "kernels of the scorer's forward", "kernels": group})
        rows[-1] |= {"ms_per_window": round(v / per_window, 1), "share_pct": round(100 * v / total, 1)}
    rows += attention_alone(c, jax, jnp)
    notes = (
        f"GPT-2 124M shape, random init; windows of {c.block_size} random tokens scoring their last 512, batch "
        f"{B}: {wall:.2f} s wall per window (median of 3), {total / per_window:.0f} ms of kernels per window "
        f"(summed over the threads, from a trace of {args.batches} batches). Kernels grouped by the op_name "
        "metadata of the compiled HLO; durations are wall time, so on a loaded machine read them as shares. "
        "Attention alone: one layer, 12 heads x 1024 tokens, the median of 7 interleaved calls each."
    )
    print(record.save("profile_eval" + ("" if B == 1 else f"_b{B}"), rows, notes=notes))


def attention_alone(c, jax, jnp):
    """One layer's attention at 12 heads x 1024 tokens: jaxlm's (by query blocks, and the one-product form
    an explicit mask takes) against PyTorch's fused CPU kernel."""
    import torch

    from jaxlm.kernels import resolve
    from jaxlm.model.attention import attend

    shape = (1, c.n_head, c.block_size, c.n_embd // c.n_head)
    q = jax.random.normal(jax.random.key(0), shape)
    f = jax.jit(lambda q, k, v: attend(q, k, v, kernels=resolve("cpu")))  # a CPU program's record
    causal = jnp.tril(jnp.ones((c.block_size, c.block_size), bool))[None]
    one = jax.jit(lambda q: attend(q, q, q, causal))
    qt = torch.randn(shape)
    run = {
        "jaxlm attend (XLA, causal by query blocks)": lambda: f(q, q, q).block_until_ready(),
        "jaxlm attend, one product (explicit mask)": lambda: one(q).block_until_ready(),
        "torch scaled_dot_product_attention": lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, qt, qt, is_causal=True
        ),
    }
    ms = {k: [] for k in run}
    with torch.inference_mode():
        for g in run.values():
            g()
        for _ in range(7):  # interleaved
            for k, g in run.items():
                t0 = time.perf_counter()
                g()
                ms[k].append(1e3 * (time.perf_counter() - t0))
    out = []
    for k, v in ms.items():
        print(f"{k}: {sorted(v)[3]:.1f} ms per layer (median of 7)")
        out.append({"table": "one layer's attention alone, 1 x 12 heads x 1024 tokens", "attention": k})
        out[-1]["ms_per_layer_median"] = round(sorted(v)[3], 1)
    return out


if __name__ == "__main__":
    main()
