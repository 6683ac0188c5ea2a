"""LAMBADA (OpenAI's test file), scored as lm-evaluation-harness's `lambada_openai`.

Context = the text up to its last space, continuation = " " + the last word (so the context never
ends in a space and `_encode_pair` moves nothing). acc = every continuation token is the model's
argmax; perplexity = exp(-mean over examples of the continuation's summed log-likelihood), i.e. per
example, not per token, as lm-eval's `perplexity` aggregation does.
"""

from __future__ import annotations

import math

from ..tokenizer import GPT2_EOT_ID
from .common import check_max_examples, progress_bar, require_bpe, scorer_for
from .files import LAMBADA, locate, read_lambada
from .loglik import encode_pair, pair_request


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
    requests = [pair_request(*encode_pair(tokenizer, *split_example(t), GPT2_EOT_ID), config.block_size) for t in texts]
    with progress_bar(progress, len(requests), "lambada") as bar:
        scored = scorer.score(requests, bar)
    return {
        "acc": sum(s.is_greedy for s in scored) / len(scored),
        "perplexity": math.exp(-sum(s.total for s in scored) / len(scored)),
        "examples": len(scored),
        "compiles": scorer.compiles,
        "details": {"greedy": [s.is_greedy for s in scored], "loglik": [s.total for s in scored]},
    }
