"""The task table: name -> runner. `--task` picks from it; a new task is one `register` call.

A task spec is `name` or `name=FILE`: FILE replaces the task's bundled data (a task with
`needs_file`, such as one scored on a user's own prompts and references, must be given one).
Every runner has the same signature, `run(params, config, tokenizer, file, options) -> metrics`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import JaxlmError
from .common import is_bpe
from .files import HELLASWAG, LAMBADA, WIKITEXT2
from .hellaswag import hellaswag
from .lambada import lambada
from .loglik import Scorer
from .perplexity import wikitext2
from .tasks import run_task


@dataclass(frozen=True)
class Options:
    batch_size: int = 8
    max_examples: int | None = None
    stride: int = 512
    data_dir: str | None = None
    progress: bool = False
    max_new_tokens: int | None = None  # generation tasks: None = the task's own (summarize 64, ...)
    attention: str = "auto"  # the attention kernel (jaxlm.kernels.resolve)


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[..., dict]  # run(params, config, tokenizer, file: Path | None, options: Options)
    summary: str
    bpe_only: bool = True  # GPT-2 BPE models only (the published numbers are in its tokens)
    needs_file: bool = False
    headline: tuple[str, ...] = ()  # metrics shown in the final table, in order
    data: str | None = None  # the bundled file's name (locate finds it, or FILE / --data-dir)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in TASKS or task.name == "all":
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def parse_tasks(spec: str) -> list[tuple[Task, Path | None]]:
    """`wikitext2,lambada=my.jsonl` -> [(task, None), (task, Path)]; `all`: every task needing no FILE."""
    chosen = []
    for item in (s.strip() for s in spec.split(",")):
        name, _, file = item.partition("=")
        if name == "all" and not file:
            chosen += [(t, None) for t in TASKS.values() if not t.needs_file]
            continue
        if name not in TASKS:
            raise JaxlmError(f"unknown task {name!r}; choose from {', '.join([*TASKS, 'all'])} (comma-separated)")
        task = TASKS[name]
        if task.needs_file and not file:
            raise JaxlmError(f"task {name} needs a data file: --task {name}=FILE")
        chosen.append((task, Path(file).expanduser() if file else None))
    seen = set()
    return [(t, f) for t, f in chosen if not (t.name in seen or seen.add(t.name))]


def runnable(chosen, tokenizer, explicit: bool) -> list:
    """Drop BPE-only tasks for a char-level model when they came from `all`; refuse them otherwise."""
    if is_bpe(tokenizer):
        return chosen
    bad = [t.name for t, _ in chosen if t.bpe_only]
    if bad and explicit:
        raise JaxlmError(
            f"{', '.join(bad)} need GPT-2's BPE tokenizer; this model is char-level: "
            "it can run --task wikitext2 only (bits per byte)"
        )
    return [(t, f) for t, f in chosen if not t.bpe_only]


def _common(o: Options, file, params, config) -> dict:
    return dict(
        max_examples=o.max_examples, path=file, data_dir=o.data_dir, progress=o.progress,
        scorer=Scorer(params, config, batch_size=o.batch_size, attention=o.attention),
    )  # fmt: skip


register(
    Task(
        "wikitext2",
        lambda p, c, tok, file, o: wikitext2(p, c, tok, stride=o.stride, **_common(o, file, p, c)),
        "WikiText-2 test: HF-guide token perplexity at --stride; lm-eval word/byte perplexity, bits per byte",
        bpe_only=False,
        data=WIKITEXT2,
        headline=("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"),
    )
)
register(
    Task(
        "lambada",
        lambda p, c, tok, file, o: lambada(p, c, tok, **_common(o, file, p, c)),
        "LAMBADA (OpenAI's test set) as lm-eval's lambada_openai: acc, perplexity",
        data=LAMBADA,
        headline=("acc", "perplexity"),
    )
)
register(
    Task(
        "hellaswag",
        lambda p, c, tok, file, o: hellaswag(p, c, tok, **_common(o, file, p, c)),
        "HellaSwag val (text form): acc, acc_norm (per character), acc_norm_tokens (per token)",
        data=HELLASWAG,
        headline=("acc", "acc_norm", "acc_norm_tokens"),
    )
)


def _generation(name: str):
    """A generation task (greedy decode, scored against references): its metrics, plus the predictions the
    command line writes as JSONL beside --output."""

    def run(p, c, tok, file, o: Options) -> dict:
        r = run_task(
            name,
            p,
            c,
            tok,
            file,
            max_examples=o.max_examples,
            batch_size=o.batch_size,
            progress=o.progress,
            max_new_tokens=o.max_new_tokens,
            attention=o.attention,
        )
        return {**r["metrics"], "examples": r["examples"], "truncated_prompts": r["truncated_prompts"],
                "max_new_tokens": r["max_new_tokens"], "predictions": r["predictions"]}  # fmt: skip

    return run


for _name, _summary, _headline in (
    ("summarize", "TL;DR: summaries scored with ROUGE-1/2/L (rouge-score, stemmed)", ("rouge1", "rouge2", "rougeL")),
    ("translate", "translations, scored with corpus BLEU and chrF (sacrebleu defaults)", ("bleu", "chrf")),
    ("qa", "answers after Q:/A: prompts, scored with SQuAD's exact match and F1", ("exact_match", "f1")),
):  # fmt: skip
    register(Task(_name, _generation(_name), _summary, bpe_only=False, needs_file=True, headline=_headline))
