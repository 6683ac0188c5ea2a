"""Task scoring: greedy batched generation with `jaxlm.generate`, scored with the field's libraries.

The entry point for `python -m jaxlm.eval --task NAME FILE` (one call per task):

    from jaxlm.eval.tasks import run_task
    config, params, tok_spec = jaxlm.load_with_tokenizer(run_dir_or_model)
    result = run_task("qa", params, config, jaxlm.tokenizer.from_spec(tok_spec), "nq_open.jsonl",
                      max_examples=100, batch_size=8, progress=True)
    result["metrics"]      # summarize: rouge1/rouge2/rougeL; translate: bleu/chrf; qa: exact_match/f1
    result["predictions"]  # one {"prediction", <reference field>} a row, in file order: write it as JSONL

NAME is one of GENERATION_TASKS (summarize, translate, qa); FILE is a JSONL of rows with the fields the task's template
needs (the bundled ../shared/data/{summarization,translation,qa}/ files), read as `jaxlm.data.sft` reads training
rows (a bad line is a JaxlmError naming it). The result also holds "task", "examples", "truncated_prompts"
and "max_new_tokens".

Each task prompts with the built-in template of `jaxlm.data.templates`, the very prompt `jaxlm.data.sft` fine-tunes
on, so a fine-tuned model is scored on what it learnt. Generation is greedy (temperature 0) and stops at
<|endoftext|>; a prediction ends at its first newline (every reference in the bundled task files is one
line) and is stripped of surrounding spaces. A prompt longer than block_size - max_new_tokens keeps its
last tokens (the template's cue, e.g. "TL;DR:", stays) and is counted in `truncated_prompts`.

Rows are sorted by prompt length into batches of `batch_size` (the last padded with a repeat), so the
jitted prefill and decode compile once per prompt-length bucket rather than once per batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from ..data import templates
from ..data.textfiles import jsonl_rows
from ..errors import JaxlmError
from ..generation.generator import Generator
from .metrics import bleu_chrf, rouge, squad


@dataclass(frozen=True)
class GenerationTask:
    name: str
    template: templates.Template
    reference: str  # the row field the prediction is scored against
    max_new_tokens: int


GENERATION_TASKS = {
    "summarize": GenerationTask("summarize", templates.BUILTIN["summarize"], "summary", 64),
    "translate": GenerationTask("translate", templates.BUILTIN["translate"], "reference", 128),
    "qa": GenerationTask("qa", templates.BUILTIN["qa"], "answers", 32),
}


def summarize(params, config, tokenizer, rows, **kwargs) -> dict:
    """ROUGE-1/2/L of greedy "TL;DR:" summaries against each row's "summary"."""
    return run(GENERATION_TASKS["summarize"], params, config, tokenizer, rows, **kwargs)


def translate(params, config, tokenizer, rows, **kwargs) -> dict:
    """Corpus BLEU and chrF of greedy translations against each row's "reference"."""
    return run(GENERATION_TASKS["translate"], params, config, tokenizer, rows, **kwargs)


def qa(params, config, tokenizer, rows, **kwargs) -> dict:
    """SQuAD exact match and F1 of greedy answers against each row's "answers" (closed-book without "context")."""
    return run(GENERATION_TASKS["qa"], params, config, tokenizer, rows, **kwargs)


def run_task(
    name: str,
    params,
    config,
    tokenizer,
    file,
    max_examples: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    *,
    max_new_tokens: int | None = None,
    mesh=None,
    attention: str = "auto",
) -> dict:
    """Score `params` on task `name` over the rows of the JSONL `file` (the first `max_examples` of them);
    `attention`: the prompts' attention kernel (`jaxlm.generation.Generator`)."""
    if name not in GENERATION_TASKS:
        raise JaxlmError(f"unknown task {name!r}; use one of {', '.join(GENERATION_TASKS)}")
    if max_examples is not None and max_examples < 1:
        raise JaxlmError(f"--max-examples must be >= 1, got {max_examples}")
    path = Path(file).expanduser()
    if not path.is_file():
        raise JaxlmError(f"{path}: no such task file; pass a .jsonl of {name} rows")
    rows = [row for _, row in itertools.islice(jsonl_rows(path), max_examples)]
    return run(
        GENERATION_TASKS[name],
        params,
        config,
        tokenizer,
        rows,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        mesh=mesh,
        progress=progress,
        attention=attention,
    )


def run(
    task: GenerationTask,
    params,
    config,
    tokenizer,
    rows: list[dict],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    mesh=None,
    progress: bool = False,
    attention: str = "auto",
) -> dict:
    """{"task", "examples", "truncated_prompts", "metrics", "predictions"}; predictions are one dict a row
    ({"prediction", and the reference field}) in the rows' order, for the caller to write as JSONL."""
    from tqdm import tqdm

    rows = list(rows)
    if not rows:
        raise JaxlmError(f"no rows to score for task {task.name}; pass a non-empty task file")
    if batch_size < 1:
        raise JaxlmError(f"batch_size must be >= 1, got {batch_size}")
    n_new = max_new_tokens or task.max_new_tokens
    room = config.block_size - n_new
    if room < 1:
        raise JaxlmError(f"max_new_tokens ({n_new}) leaves no room for a prompt in block_size {config.block_size}")
    prompts, truncated = [], 0
    for i, row in enumerate(rows):
        prompt, _ = templates.for_row(task.template, row).render(row, f"row {i}")
        ids = tokenizer.encode(prompt)
        truncated += len(ids) > room
        prompts.append(ids[-room:])
    refs = [row[task.reference] for row in rows]

    gen = Generator(params, config, mesh=mesh, attention=attention)
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    texts = [""] * len(rows)
    with tqdm(total=len(rows), desc=task.name, unit="ex", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = [prompts[i] for i in idx]
            batch += [batch[-1]] * (batch_size - len(batch))  # same batch shape: no recompile for the last one
            outs = gen(batch, max_new_tokens=n_new, temperature=0.0, eos_id=getattr(tokenizer, "eot_id", None))
            for i, out in zip(idx, outs, strict=False):
                texts[i] = _prediction(tokenizer, out)
            bar.update(len(idx))

    if task.name == "summarize":
        scores = rouge(texts, refs)
    elif task.name == "translate":
        scores = bleu_chrf(texts, refs)
    else:
        scores = squad(texts, refs)
    predictions = [{"prediction": t, task.reference: r} for t, r in zip(texts, refs, strict=True)]
    return {
        "task": task.name,
        "examples": len(rows),
        "truncated_prompts": truncated,
        "max_new_tokens": n_new,
        "metrics": scores,
        "predictions": predictions,
    }


def _prediction(tokenizer, ids: list[int]) -> str:
    eot = getattr(tokenizer, "eot_id", None)
    if eot is not None and eot in ids:
        ids = ids[: ids.index(eot)]
    return tokenizer.decode(ids).split("\n", 1)[0].strip()
