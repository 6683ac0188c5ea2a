"""HellaSwag validation (the bundled text form), scored three ways from one set of log-likelihoods.

Each of the 10,042 tasks is a context line "activity label: ctx" and four endings; ending i is scored
as the continuation " " + ending of that context (lm-eval's `_encode_pair`). The prediction is the
argmax over the four of: acc, the summed log-likelihood (lm-eval); acc_norm, that sum divided by the
ending's length in characters (lm-eval); acc_norm_tokens, the mean per token (karpathy/build-nanogpt).
Neither published setup is this text form exactly (lm-eval capitalises ctx_b, build-nanogpt drops the
activity label), so expect about a point of difference from their numbers.
"""

from __future__ import annotations

import numpy as np

from .common import check_max_examples, pair_requests, require_bpe, score, scorer_for
from .files import HELLASWAG, locate, read_hellaswag


def hellaswag(
    params,
    config,
    tokenizer,
    *,
    batch_size: int = 8,
    max_examples: int | None = None,
    path=None,
    data_dir=None,
    progress: bool = False,
    scorer=None,
) -> dict:
    """{"acc", "acc_norm", "acc_norm_tokens", "examples", "compiles"}."""
    check_max_examples(max_examples)
    require_bpe(tokenizer, config, "hellaswag")
    tasks = read_hellaswag(locate(HELLASWAG, path, data_dir))[:max_examples]
    scorer = scorer_for(params, config, batch_size, scorer)
    pairs = [(context, " " + ending) for context, _, endings in tasks for ending in endings]
    requests = pair_requests(tokenizer, pairs, config.block_size)
    scored = score(scorer, requests, progress, "hellaswag")
    sums_Nx4 = np.array([s.total for s in scored]).reshape(-1, 4)
    tokens_Nx4 = np.array([r.n_score for r in requests], np.float64).reshape(-1, 4)
    chars_Nx4 = np.array([[max(len(e), 1) for e in endings] for _, _, endings in tasks], np.float64)
    gold_N = np.array([label for _, label, _ in tasks])
    return {
        "acc": float((sums_Nx4.argmax(1) == gold_N).mean()),
        "acc_norm": float(((sums_Nx4 / chars_Nx4).argmax(1) == gold_N).mean()),
        "acc_norm_tokens": float(((sums_Nx4 / tokens_Nx4).argmax(1) == gold_N).mean()),
        "examples": len(tasks),
        "compiles": scorer.compiles,
        "details": {  # per task: the predicted ending under each rule
            "acc": sums_Nx4.argmax(1).tolist(),
            "acc_norm": (sums_Nx4 / chars_Nx4).argmax(1).tolist(),
            "acc_norm_tokens": (sums_Nx4 / tokens_Nx4).argmax(1).tolist(),
        },
    }
