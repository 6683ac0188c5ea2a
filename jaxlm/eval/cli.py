"""`python -m jaxlm.eval SOURCE --task ...`: load a model, run tasks from the registry, print a table.

Everything the user can get wrong (task names, flags, data files) is checked before the weights are
read, so a typo costs a second, not a model load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..config import ATTENTIONS, DTYPES
from ..cpu.allocator import keep_freed_memory
from ..errors import JaxlmError
from ..io import load as loader
from ..kernels import expected_platform, resolve
from ..lora import peft as peft_io
from ..tokenizer import from_spec
from ..utils.publish import write_file
from .files import locate
from .metrics import require_metric
from .registry import TASKS, Options, parse_tasks, runnable


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxlm.eval",
        description="Score a model on WikiText-2, LAMBADA and HellaSwag as the field's harnesses do, or on a task file "
        "(summarize, translate, qa) by greedy generation. Tasks: "
        + "; ".join(f"{t.name}: {t.summary}" for t in TASKS.values()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", help="what jaxlm.load accepts: an HF hub id or directory, a jaxlm checkpoint, a run dir")
    p.add_argument(
        "file", nargs="?", default=None, help="the data file of the one --task given (same as --task NAME=FILE)"
    )
    p.add_argument(
        "--adapter",
        default=None,
        help="a Hugging Face PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) for "
        "SOURCE, merged into it before scoring (None: SOURCE as it is)",
    )
    p.add_argument(
        "--task",
        default="all",
        help=f"comma-separated, from {', '.join(TASKS)} or all; NAME=FILE scores NAME on your own copy of its data "
        "(summarize, translate and qa need one: a JSONL of rows with the template's fields)",
    )
    p.add_argument(
        "--output",
        default=None,
        help="write all metrics as JSON here, and each generation task's predictions beside it as "
        "OUTPUT_STEM.TASK.jsonl (None: print the table only)",
    )
    p.add_argument("--max-examples", type=int, default=None, help="score the first N examples of each task (None: all)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="sequences per forward pass at most; on a CPU also at most 2048 padded tokens (two 1024-token "
        "windows), which score faster per token there than wider batches",
    )
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (logits and softmax stay float32)")
    p.add_argument(
        "--attention",
        default="auto",
        choices=ATTENTIONS,
        help="attention kernel: auto picks by platform and dtype (cuDNN on a GPU in bfloat16, splash on a TPU, "
        "jaxlm's reference form with the CPU's query blocks on a CPU); --output records what ran",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generation tasks: tokens generated per example at most (None: the task's own; a short-context "
        "model needs fewer)",
    )
    p.add_argument("--stride", type=int, default=512, help="WikiText-2 sliding-window stride in tokens")
    p.add_argument(
        "--data-dir",
        default=None,
        help="a folder holding the data files under their usual names "
        f"({', '.join(t.data for t in TASKS.values() if t.data)}); None: the bundled copies",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="leave glibc's malloc at its default of returning big freed blocks to the OS: a lower peak RSS, "
        "slower on a CPU (by default a CPU eval keeps them, as train.py does for small models; GPU and TPU "
        "hosts always use the default)",
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.file is not None:
        if "," in args.task or "=" in args.task or args.task == "all":
            raise JaxlmError(f"a data file ({args.file}) goes with one task: --task NAME FILE (or --task NAME=FILE)")
        args.task = f"{args.task}={args.file}"
    if args.max_examples is not None and args.max_examples < 1:
        raise JaxlmError(f"--max-examples must be >= 1 (or left out for all), got {args.max_examples}")
    if args.batch_size < 1:
        raise JaxlmError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise JaxlmError(f"--max-new-tokens must be >= 1 (or left out for the task's own), got {args.max_new_tokens}")
    if args.stride < 1:
        raise JaxlmError(f"--stride must be >= 1, got {args.stride}")
    chosen = parse_tasks(args.task)
    for task, file in chosen:
        if task.data or file:
            locate(task.data, file, args.data_dir)
        require_metric(task.name)  # before the weights are read
    explicit = "all" not in [s.strip() for s in args.task.split(",")]
    if not args.return_freed_memory and expected_platform() == "cpu":
        keep_freed_memory()  # before JAX starts: XLA:CPU's per-call buffers then stop page-faulting
    kernels = resolve(None, dtype=args.dtype, attention=args.attention)  # an impossible --attention: before loading

    if args.adapter:
        peft_io.check_adapter(args.adapter)  # a bad adapter fails before the base is loaded
    config, params, tok_spec = loader.load_with_tokenizer(args.source, adapter=args.adapter, dtype=args.dtype)
    tokenizer = from_spec(tok_spec)
    kept = runnable(chosen, tokenizer, explicit)
    skipped = [t.name for t, _ in chosen if all(k is not t for k, _ in kept)]
    if skipped:
        print(
            f"note: {', '.join(skipped)} skipped: they need GPT-2's BPE tokenizer, this model is char-level",
            file=sys.stderr,
        )

    options = Options(
        args.batch_size, args.max_examples, args.stride, args.data_dir, not args.no_progress, args.max_new_tokens,
        args.attention,
    )  # fmt: skip
    results, predictions = {}, {}
    for task, file in kept:
        t0 = time.perf_counter()
        metrics = task.run(params, config, tokenizer, file, options)
        metrics["seconds"] = round(time.perf_counter() - t0, 2)
        if "predictions" in metrics:
            predictions[task.name] = metrics.pop("predictions")
        results[task.name] = metrics
    print(format_table(results))
    if args.output:
        out = Path(args.output)
        report = {"source": str(args.source), "dtype": args.dtype, "config": config.to_dict(), "tasks": results}
        report["kernels"] = kernels.to_dict()  # what ran, and why
        write_json(out, report)
        print(f"wrote {out}")
        for name, rows in predictions.items():
            path = out.with_name(f"{out.stem}.{name}.jsonl")
            write_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            print(f"wrote {path} ({len(rows)} predictions)")
    return 0


def format_table(results: dict) -> str:
    rows = [("task", "metric", "value")]
    for name, metrics in results.items():
        shown = [m for m in (*TASKS[name].headline, "compiles", "seconds") if m in metrics]
        rows += [(name, m, _fmt(metrics[m])) for m in shown]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_json(path: Path, report: dict):
    write_file(path, json.dumps(report, indent=1) + "\n")
