"""The eval scorer's LM head alone: log p(target) and the argmax test on scored rows, GPT-2 124M's head
(768 x 50257, random), float32, by form and chunk size, the forms timed in turn.

    python bench/eval_head.py                # 512 and 1024 scored rows (one and two stride-512 windows)
    python bench/eval_head.py --rows 512 --rounds 9

Forms: "plain" is the textbook one ([N, V] logits, jax.nn.logsumexp, jnp.argmax); "jaxlm, vocab C" is
`jaxlm.cpu.eval_head.score_targets` as the scorer runs it on a CPU (groups of CPU_HEAD_ROWS rows) with C
vocabulary entries per chunk (the scorer's: CPU_VOCAB_CHUNK); "jaxlm, rows 64" the previous CPU form
(row chunks of 64, each against the whole vocabulary); "jaxlm, one piece" no chunks at all. Prints the
median ms per call of each and writes bench/results/eval_head.json.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="512,1024", help="comma-separated scored-row counts")
    p.add_argument("--chunks", default="512,1024,2048", help="comma-separated vocabulary entries per chunk")
    p.add_argument("--rounds", type=int, default=5, help="timed calls of each form (alternated)")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import record  # the run's start time and load average

    from jaxlm.cpu.eval_head import CPU_HEAD_ROWS, CPU_VOCAB_CHUNK, score_targets

    D, V = 768, 50257
    rng = np.random.default_rng(0)
    wte_VxD = jnp.asarray((0.02 * rng.standard_normal((V, D))).astype(np.float32))

    def plain(h_NxD, w_VxD, t_N):
        logits_NxV = jnp.einsum("nd,vd->nv", h_NxD, w_VxD)
        picked_N = jnp.take_along_axis(logits_NxV, t_N[:, None], -1)[:, 0]
        return picked_N - jax.nn.logsumexp(logits_NxV, -1), jnp.argmax(logits_NxV, -1) == t_N

    forms = {
        "plain": jax.jit(plain),
        "jaxlm, one piece": jax.jit(lambda h, w, t: score_targets(h, w, t, None)),
        "jaxlm, rows 64": jax.jit(lambda h, w, t: score_targets(h, w, t, 64, w.shape[0])),
    }
    for c in (int(x) for x in args.chunks.split(",")):
        forms[f"jaxlm, vocab {c}"] = jax.jit(lambda h, w, t, c=c: score_targets(h, w, t, CPU_HEAD_ROWS, c))
    print(
        f"{jax.default_backend()}, {jax.device_count()} device(s); the scorer's CPU form: "
        f"groups of {CPU_HEAD_ROWS} rows, {CPU_VOCAB_CHUNK} vocabulary entries per chunk"
    )
    rows = []
    for n in (int(x) for x in args.rows.split(",")):
        h_NxD = jnp.asarray(rng.standard_normal((n, D)).astype(np.float32))
        t_N = jnp.asarray(rng.integers(0, V, n).astype(np.int32))
        want = jax.block_until_ready(forms["plain"](h_NxD, wte_VxD, t_N))
        for name, f in forms.items():  # compile, and check every form against the plain one
            lp, greedy = jax.block_until_ready(f(h_NxD, wte_VxD, t_N))
            np.testing.assert_allclose(np.asarray(lp), np.asarray(want[0]), rtol=1e-6, atol=1e-5, err_msg=name)
            assert (np.asarray(greedy) == np.asarray(want[1])).all(), name
        times = {name: [] for name in forms}
        for _ in range(args.rounds):
            for name, f in forms.items():
                t = time.perf_counter()
                jax.block_until_ready(f(h_NxD, wte_VxD, t_N))
                times[name].append(1000 * (time.perf_counter() - t))
        print(f"\n{n} scored rows ({2 * n * D * V / 1e9:.1f} GFLOP of head matmul): median ms per call")
        for name, ts in times.items():
            print(f"  {name:18s} {statistics.median(ts):8.1f}")
            rows.append({"scored_rows": n, "form": name, "ms_per_call_median": round(statistics.median(ts), 1)})
    notes = (
        f"GPT-2 124M's head (768 x 50257, random), float32, {args.rounds} timed calls of each form, the forms "
        f"alternated; every form checked against the plain one first. The scorer's CPU form: groups of "
        f"{CPU_HEAD_ROWS} rows, {CPU_VOCAB_CHUNK} vocabulary entries per chunk. One call at 512 rows is "
        f"{2 * 512 * D * V / 1e9:.1f} GFLOP of head matmul."
    )
    print(record.save("eval_head", rows, notes=notes))


if __name__ == "__main__":
    main()
