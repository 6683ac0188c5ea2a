"""Generation options with transformers' meaning and validation, checked on the host before any work.

The mapping to `GenerationConfig`: `max_length` counts the prompt (the longest one, as HF does with
left padding), `max_new_tokens` wins when both are given, neither means 100 new tokens.
`do_sample=False` (the default, as transformers' for GPT-2) is greedy or beam search whatever the
temperature, and warns, as transformers does, when sampling options were set; `do_sample=True` samples and
needs temperature > 0; `do_sample=None` is the command line's rule (sample unless temperature is 0) for one
beam, and beam search (not beam sampling) for several. What HF's `validate` rejects
(greedy with num_return_sequences > 1, num_return_sequences > num_beams, a bad early_stopping) and
every value out of range is a JaxlmError naming the fix.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

from ..config import GPTConfig
from ..errors import JaxlmError
from .sampling import Sampling

DEFAULT_MAX_NEW_TOKENS = 100


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class GenerateOptions:
    """Resolved options of one call: what the loops compile for (`mode`, statics) and trace (values)."""

    mode: str  # "greedy", "sample" or "beam"
    sampling: Sampling
    max_new_tokens: int
    min_new_tokens: int
    num_beams: int
    num_return_sequences: int
    length_penalty: float
    early_stopping: bool | str
    repetition_penalty: float
    no_repeat_ngram_size: int


def resolve(
    c: GPTConfig,
    longest_prompt: int,
    *,
    max_new_tokens=None,
    max_length=None,
    min_new_tokens=0,
    do_sample=False,
    temperature=1.0,
    top_k=None,
    top_p=1.0,
    seed=0,
    num_beams=1,
    num_return_sequences=1,
    length_penalty=1.0,
    early_stopping=False,
    repetition_penalty=1.0,
    no_repeat_ngram_size=0,
) -> GenerateOptions:
    if do_sample not in (None, True, False):
        raise JaxlmError(f"do_sample must be True, False or None (jaxlm's temperature rule), got {do_sample!r}")
    if not _is_int(num_beams) or num_beams < 1:
        raise JaxlmError(f"num_beams must be an integer >= 1 (1: no beam search), got {num_beams!r}")
    if not _is_int(num_return_sequences) or num_return_sequences < 1:
        raise JaxlmError(f"num_return_sequences must be an integer >= 1, got {num_return_sequences!r}")
    if do_sample is True and not (_is_real(temperature) and temperature > 0):
        raise JaxlmError(f"do_sample=True needs a temperature > 0, got {temperature!r}; use do_sample=False for greedy")
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if num_beams > 1:
        if do_sample:
            raise JaxlmError("beam sampling (do_sample=True with num_beams > 1) is not supported; pass do_sample=False")
        mode = "beam"
    else:
        mode = "sample" if (do_sample if do_sample is not None else not sampling.greedy) else "greedy"
    if do_sample is False and not sampling.greedy and (temperature != 1.0 or top_k is not None or top_p != 1.0):
        warnings.warn(
            "do_sample=False: decoding is greedy (or beam search), so temperature, top_k and top_p are not used; "
            "pass do_sample=True to sample",
            UserWarning,
            stacklevel=3,
        )
    if num_return_sequences > 1:
        if mode == "greedy":
            raise JaxlmError(
                "greedy decoding (do_sample=False, num_beams=1) returns one sequence per prompt, not "
                f"num_return_sequences={num_return_sequences}; sample (do_sample=True) or use num_beams >= "
                f"{num_return_sequences}"
            )
        if mode == "beam" and num_return_sequences > num_beams:
            raise JaxlmError(
                f"num_return_sequences ({num_return_sequences}) cannot exceed num_beams ({num_beams}) in beam search; "
                f"raise num_beams to {num_return_sequences} or lower num_return_sequences"
            )
    if mode == "beam" and 2 * num_beams > c.vocab_size:
        raise JaxlmError(f"num_beams ({num_beams}) needs a vocabulary of at least {2 * num_beams} tokens")
    if (
        early_stopping not in (True, False, "never")
        or isinstance(early_stopping, numbers.Number)
        and not isinstance(early_stopping, bool)
    ):
        raise JaxlmError(f"early_stopping must be True, False or 'never' (as in transformers), got {early_stopping!r}")
    if not _is_real(length_penalty):
        raise JaxlmError(f"length_penalty must be a finite number (1.0: scores over length), got {length_penalty!r}")
    if not _is_real(repetition_penalty) or repetition_penalty <= 0:
        raise JaxlmError(
            f"repetition_penalty must be a number > 0 (1.0: none, above 1 penalizes), got {repetition_penalty!r}"
        )
    if not _is_int(no_repeat_ngram_size) or no_repeat_ngram_size < 0:
        raise JaxlmError(f"no_repeat_ngram_size must be an integer >= 0 (0: off), got {no_repeat_ngram_size!r}")
    if no_repeat_ngram_size > c.block_size:
        raise JaxlmError(
            f"no_repeat_ngram_size ({no_repeat_ngram_size}) is bigger than the model's block_size ({c.block_size}); "
            "no such n-gram can repeat"
        )
    if not _is_int(min_new_tokens) or min_new_tokens < 0:
        raise JaxlmError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    new = _new_tokens(c, longest_prompt, max_new_tokens, max_length)
    return GenerateOptions(
        mode=mode,
        sampling=sampling,
        max_new_tokens=new,
        min_new_tokens=int(min_new_tokens),
        num_beams=int(num_beams),
        num_return_sequences=int(num_return_sequences),
        length_penalty=float(length_penalty),
        early_stopping=early_stopping,
        repetition_penalty=float(repetition_penalty),
        no_repeat_ngram_size=int(no_repeat_ngram_size),
    )


def _new_tokens(c: GPTConfig, longest: int, max_new_tokens, max_length) -> int:
    if longest > c.block_size:
        raise JaxlmError(
            f"a prompt of {longest} tokens is longer than the model's block_size ({c.block_size}); shorten it"
        )
    if max_new_tokens is None and max_length is not None:
        if not _is_int(max_length) or max_length < 1:
            raise JaxlmError(f"max_length must be an integer >= 1 (prompt included), got {max_length!r}")
        if max_length <= longest:
            raise JaxlmError(
                f"max_length ({max_length}) counts the prompt and leaves no new tokens after the longest prompt "
                f"({longest} tokens); raise it above {longest} or pass max_new_tokens"
            )
        if max_length > c.block_size:
            raise JaxlmError(
                f"max_length ({max_length}) exceeds the model's block_size ({c.block_size}); lower it to at most "
                f"{c.block_size}"
            )
        return int(max_length) - longest
    if max_new_tokens is None:
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, max(c.block_size - longest, 1))
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise JaxlmError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if longest + max_new_tokens > c.block_size:
        raise JaxlmError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's block_size "
            f"({c.block_size}); lower max_new_tokens to at most {c.block_size - longest} or shorten the prompt"
        )
    return int(max_new_tokens)
