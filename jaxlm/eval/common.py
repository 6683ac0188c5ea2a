"""What the task runners share: the tokenizer check, the scorer, the progress bar."""

from __future__ import annotations

import contextlib

from ..errors import JaxlmError
from ..tokenizer import GPT2_EOT_ID
from .loglik import Scorer, encode_pair, pair_request


def is_bpe(tokenizer) -> bool:
    return getattr(tokenizer, "name", None) == "gpt2"


def require_bpe(tokenizer, config, task: str):
    """The published numbers are for GPT-2's BPE; any other tokenizer scores a different task."""
    if not is_bpe(tokenizer):
        raise JaxlmError(
            f"{task} needs a model with GPT-2's BPE tokenizer; this one is {getattr(tokenizer, 'name', tokenizer)!r} "
            "(char-level models can run --task wikitext2 only, reported in bits per byte)"
        )
    if config.vocab_size < GPT2_EOT_ID + 1:
        raise JaxlmError(f"{task}: the model's vocab_size {config.vocab_size} is smaller than GPT-2's 50257 tokens")


def scorer_for(params, config, batch_size: int, scorer: Scorer | None) -> Scorer:
    return scorer if scorer is not None else Scorer(params, config, batch_size=batch_size)


def score(scorer: Scorer, requests, progress: bool, desc: str):
    """`scorer.score(requests)` under a progress bar named `desc` (when `progress`)."""
    with progress_bar(progress, len(requests), desc) as bar:
        return scorer.score(requests, bar)


def pair_requests(tokenizer, pairs, block_size: int):
    """lm-eval's (context, continuation) requests: each pair encoded and truncated as the harness does."""
    return [pair_request(*encode_pair(tokenizer, context, cont, GPT2_EOT_ID), block_size) for context, cont in pairs]


def check_max_examples(max_examples):
    if max_examples is not None and max_examples < 1:
        raise JaxlmError(f"--max-examples must be >= 1 (or unset for all), got {max_examples}")


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar whose update(n) the scorer calls per batch; a no-op when disabled."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm  # not imported by `import jaxlm`

    with tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True) as bar:
        yield bar.update
