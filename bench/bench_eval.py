"""Evaluation speed: GPT-2 124M shape (random init), WikiText-2 at stride 512, jaxlm against
transformers PyTorch running the Hugging Face guide's loop on the same tokens in the same process;
then LAMBADA with jaxlm. Tokens/s counts scored tokens.

    python bench/bench_eval.py                              # the first 16 windows and 32 LAMBADA examples
    python bench/bench_eval.py --windows all --lambada all  # all of WikiText-2 and LAMBADA (about an hour)

Writes bench/results/eval.json (eval_keep_freed_memory.json with --keep-freed-memory; a non-default dtype or
batch size adds its own suffix).
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def torch_windows(ids, block, stride, max_windows):
    """The HF guide's windows: (begin, end, prev_end) per forward pass, in its order."""
    out, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + block, len(ids))
        out.append((begin, end, prev_end))
        prev_end = end
        if end == len(ids) or len(out) == max_windows:
            break
    return out


def torch_guide_window(model, ids_1xN, begin, end, prev_end):
    """One iteration of the guide's loop: (summed NLL, tokens) of the window's new tokens."""
    import torch

    inp = ids_1xN[:, begin:end]
    target = inp.clone()
    target[:, : -(end - prev_end)] = -100
    with torch.inference_mode():
        loss = model(inp, labels=target).loss
    n = int((target[:, 1:] != -100).sum())
    return float(loss) * n, n


def _count(text: str) -> int | None:
    return None if text == "all" else int(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=_count, default=16, help="first N stride windows ('all': all 561)")
    p.add_argument("--lambada", type=_count, default=32, help="first N LAMBADA examples ('all': all 5153)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="padded tokens per forward at most (None: the library's default, 2048 on a CPU; 0: no limit)",
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed blocks, as `python -m jaxlm.eval` sets it (process-wide: both sides get it)",
    )
    args = p.parse_args()
    if args.keep_freed_memory:
        from jaxlm.cpu.allocator import keep_freed_memory

        keep_freed_memory()

    import record  # early: the run's start time and load average
    import torch
    from helpers import save_random_hf

    import jaxlm
    from jaxlm.eval import Scorer, lambada
    from jaxlm.eval.files import WIKITEXT2, locate, read_wikitext
    from jaxlm.eval.perplexity import hf_rows_text, stride_requests
    from jaxlm.tokenizer import from_spec

    with tempfile.TemporaryDirectory() as d:
        model = save_random_hf(d, seed=0)  # GPT-2 124M shape
        config, params, tok = jaxlm.load_with_tokenizer(d, dtype=args.dtype)
    tok = from_spec(tok)
    ids = tok.encode(hf_rows_text(read_wikitext(locate(WIKITEXT2))))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; WikiText-2: {len(ids)} tokens")

    requests = stride_requests(ids, 1024, 512, limit=args.windows)
    windows = torch_windows(ids, 1024, 512, len(requests))
    ids_1xN = torch.tensor([ids])
    scorer = Scorer(params, config, batch_size=args.batch_size, batch_tokens=args.batch_tokens)
    scorer.score(requests[: args.batch_size])  # compile both shapes outside the timing
    scorer.score(requests[1 : args.batch_size + 1])
    # Interleaved batch by batch (jaxlm, then torch on the same windows), so the VM's drift in speed
    # over minutes falls on both alike. The guide's first window scores 1023 tokens, the rest `stride`.
    jax_s = torch_s = jax_nll = torch_nll = 0.0
    torch_n = 0
    for lo in range(0, len(requests), args.batch_size):
        t0 = time.perf_counter()
        scored = scorer.score(requests[lo : lo + args.batch_size])
        jax_s += time.perf_counter() - t0
        jax_nll -= sum(s.total for s in scored)
        t0 = time.perf_counter()
        for w in windows[lo : lo + args.batch_size]:
            nll, k = torch_guide_window(model, ids_1xN, *w)
            torch_nll, torch_n = torch_nll + nll, torch_n + k
        torch_s += time.perf_counter() - t0
    n = sum(r.n_score for r in requests)
    assert torch_n == n, (torch_n, n)
    jax_ppl, torch_ppl = math.exp(jax_nll / n), math.exp(torch_nll / n)
    malloc = "freed memory kept" if args.keep_freed_memory else "glibc default malloc"
    rows = [
        {
            "task": "wikitext2 stride 512",
            "impl": f"jaxlm {args.dtype}, batch {args.batch_size} ({scorer.rows_for(1024)} x 1024 tokens per forward)",
            "tokens_scored": n,
            "seconds": round(jax_s, 1),
            "tok_per_s": round(n / jax_s, 1),
            "perplexity": round(jax_ppl, 4),
            "compiles": scorer.compiles,
        },
        {
            "task": "wikitext2 stride 512",
            "impl": "transformers PyTorch float32, HF guide loop (batch 1)",
            "tokens_scored": n,
            "seconds": round(torch_s, 1),
            "tok_per_s": round(n / torch_s, 1),
            "perplexity": round(torch_ppl, 4),
        },
    ]
    print(f"wikitext2 stride 512: {len(requests)} windows, {n} tokens scored, interleaved by batch; {malloc}")
    print(f"  speedup {torch_s / jax_s:.2f}x")

    t0 = time.perf_counter()
    lam = Scorer(params, config, batch_size=args.batch_size, batch_tokens=args.batch_tokens)
    r = lambada(params, config, tok, max_examples=args.lambada, scorer=lam)
    rows.append(
        {
            "task": f"lambada ({r['examples']} examples)",
            "impl": f"jaxlm {args.dtype}, batch {args.batch_size}",
            "seconds": round(time.perf_counter() - t0, 1),  # compiles included
            "compiles": r["compiles"],
            "accuracy": round(r["acc"], 4),
            "perplexity": round(r["perplexity"], 1),
        }
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    record.print_table(rows)
    notes = (
        f"GPT-2 124M shape, random init (`save_pretrained`), the same weights on both sides. WikiText-2 test split "
        f"at stride 512 on a 1024 block: {len(requests)} windows, {n} tokens scored; jaxlm and the guide's "
        f"PyTorch loop ({torch.get_num_threads()} threads) take turns batch by batch, so the machine's drift "
        f"falls on both alike: jaxlm is **{torch_s / jax_s:.2f}x** PyTorch here. Compilation is outside the "
        f"WikiText-2 timing and inside LAMBADA's seconds. Memory: {malloc} (process-wide, both sides); peak RSS "
        f"of the process (both models) {peak:,.0f} MB."
    )
    name = "eval" + ("_keep_freed_memory" if args.keep_freed_memory else "")
    name += "" if args.dtype == "float32" else f"_{args.dtype}"
    name += "" if args.batch_size == 8 else f"_b{args.batch_size}"
    print(record.save(name, rows, notes=notes))


if __name__ == "__main__":
    main()
