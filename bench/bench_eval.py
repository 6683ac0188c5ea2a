"""Evaluation speed: GPT-2 124M shape (random init), WikiText-2 at stride 512, jaxlm against
transformers PyTorch running the Hugging Face guide's loop on the same tokens in the same process;
then LAMBADA with jaxlm. Tokens/s counts scored tokens.

    python bench/bench_eval.py               # full WikiText-2 and LAMBADA
    python bench/bench_eval.py --windows 8 --lambada 64               # a quick look
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def torch_guide(model, ids, block, stride, max_windows):
    import torch

    ids = torch.tensor([ids])
    nll, n_tokens, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + block, ids.size(1))
        inp = ids[:, begin:end]
        target = inp.clone()
        target[:, : -(end - prev_end)] = -100
        with torch.inference_mode():
            loss = model(inp, labels=target).loss
        n = int((target[:, 1:] != -100).sum())
        nll, n_tokens, prev_end, windows = nll + float(loss) * n, n_tokens + n, end, windows + 1
        if end == ids.size(1) or windows == max_windows:
            break
    return math.exp(nll / n_tokens), n_tokens, windows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--windows", type=int, default=None, help="first N stride windows (None: all of WikiText-2)")
    p.add_argument("--lambada", type=int, default=None, help="first N LAMBADA examples (None: all 5153)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

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
    scorer = Scorer(params, config, batch_size=args.batch_size)
    scorer.score(requests[: args.batch_size])  # compile both shapes outside the timing
    scorer.score(requests[1 : args.batch_size + 1])
    t0 = time.perf_counter()
    scored = scorer.score(requests)
    jax_s = time.perf_counter() - t0
    n = sum(r.n_score for r in requests)
    jax_ppl = math.exp(-sum(s.total for s in scored) / n)

    t0 = time.perf_counter()
    torch_ppl, torch_n, _ = torch_guide(model, ids, 1024, 512, len(requests))
    torch_s = time.perf_counter() - t0
    assert torch_n == n, (torch_n, n)
    print(f"wikitext2 stride 512: {len(requests)} windows, {n} tokens scored")
    print(
        f"  jaxlm {args.dtype} batch {args.batch_size}: {jax_s:.1f} s, {n / jax_s:.0f} tok/s, ppl {jax_ppl:.4f}, "
        f"{scorer.compiles} compiles"
    )
    print(f"  torch float32 (guide loop, batch 1): {torch_s:.1f} s, {n / torch_s:.0f} tok/s, ppl {torch_ppl:.4f}")
    print(f"  speedup {torch_s / jax_s:.2f}x")

    t0 = time.perf_counter()
    r = lambada(params, config, tok, max_examples=args.lambada, batch_size=args.batch_size)
    print(
        f"lambada: {r['examples']} examples in {time.perf_counter() - t0:.1f} s (compiles included: "
        f"{r['compiles']}), acc {r['acc']:.4f}, perplexity {r['perplexity']:.1f}"
    )


if __name__ == "__main__":
    main()
