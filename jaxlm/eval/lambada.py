"""LAMBADA (OpenAI's test file), scored as lm-evaluation-harness's `lambada_openai`.

Context = the text up to its last space, continuation = " " + the last word (so the context never
ends in a space and `_encode_pair` moves nothing). acc = every continuation token is the model's
argmax; perplexity = exp(-mean over examples of the continuation's summed log-likelihood), i.e. per
example, not per token, as lm-eval's `perplexity` aggregation does.
"""

from __future__ import annotations

import math

from .common import check_max_examples, pair_requests, require_bpe, score, scorer_for
from .files import LAMBADA, locate, read_lambada


def split_example(text: str) -> tuple[str, str]:
    context, _, last = text.rpartition(" ")
    return context, " " + last


def lambada(
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
    """lambada_openai: {"acc", "perplexity", "examples", "compiles"}."""
    check_max_examples(max_examples)
    require_bpe(tokenizer, config, "lambada")
    texts = read_lambada(locate(LAMBADA, path, data_dir))[:max_examples]
    scorer = scorer_for(params, config, batch_size, scorer)
    scored = score(scorer, pair_requests(tokenizer, map(split_example, texts), config.block_size), progress, "lambada")
    return {
        "acc": sum(s.is_greedy for s in scored) / len(scored),
        "perplexity": math.exp(-sum(s.total for s in scored) / len(scored)),
        "examples": len(scored),
        "compiles": scorer.compiles,
        "details": {"greedy": [s.is_greedy for s in scored], "loglik": [s.total for s in scored]},
    }
