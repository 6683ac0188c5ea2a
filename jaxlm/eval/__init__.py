"""Evaluation: WikiText-2 perplexity, LAMBADA and HellaSwag, scored as the field's harnesses score them.

`jaxlm.eval.wikitext2(params, config, tokenizer)`, `.lambada(...)`, `.hellaswag(...)` return dicts of
metrics; `python -m jaxlm.eval SOURCE --task all` runs them from the command line. All three rest on
one primitive, `Scorer` (loglik.py). Generation tasks (summarize, translate, qa) are in `jaxlm.eval.tasks`,
scored by `jaxlm.eval.metrics` (rouge-score, sacrebleu: the `jaxlm[tasks]` extra; SQuAD's EM/F1).

May import: every package below it in docs/design.md's order (errors, config, tokenizer, utils, cli, cpu,
kernels, lora, model, parallel, data, io, generation); never train or serve.
"""

from .hellaswag import hellaswag
from .lambada import lambada
from .loglik import Request, Scored, Scorer, encode_pair, pair_request, rolling_requests
from .perplexity import wikitext2
from .registry import TASKS, Options, Task, parse_tasks, register

__all__ = [
    "Options",
    "Request",
    "Scored",
    "Scorer",
    "TASKS",
    "Task",
    "encode_pair",
    "hellaswag",
    "lambada",
    "pair_request",
    "parse_tasks",
    "register",
    "rolling_requests",
    "wikitext2",
]
