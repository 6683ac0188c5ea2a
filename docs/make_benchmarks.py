"""Writes docs/benchmarks.md from the benchmark results in bench/results/*.json (see bench/record.py).

python docs/make_benchmarks.py            # rewrite docs/benchmarks.md
python docs/make_benchmarks.py --check    # exit 1 if docs/benchmarks.md is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "benchmarks.md"

# bench script -> (section title, what it measures in one line). The page's sections follow this order.
SCRIPTS = {
    "bench_generate.py": (
        "Decode speed",
        "Greedy and beam-search decoding of the GPT-2 124M shape: jaxlm.generate against transformers' PyTorch "
        "`generate` and Hugging Face's Flax GPT-2 (`jax.jit(model.generate)`), all in one run.",
    ),
    "decode_linear.py": (
        "Decode products by form",
        "x @ W.T over the 124M shape's 48 layer kernels in each form decoding can take (XLA's matmul, a "
        "multiply-reduce, what jaxlm picks, jaxlm's native kernel where the CPU runs it).",
    ),
    "slot_attention.py": (
        "A serving step's attention by form",
        "One layer of the 124M shape: rows at their own lengths in their own cache slots, XLA's chunked "
        "products against jaxlm's CPU kernel.",
    ),
    "bench_train.py": (
        "Training throughput",
        "jaxlm's real train step per case (tokens/s, ms/step, utilisation of the matmul peak measured around "
        "it, peak memory), each followed in the same command by its peer: nanoGPT's step in PyTorch, "
        "transformers' PyTorch GPT-2 step.",
    ),
    "profile_train.py": (
        "Where a training step's time goes",
        "Forward, value_and_grad and the whole train step (wall and CPU ms), then the step's kernels from a "
        "`jax.profiler` trace grouped by phase and kind.",
    ),
    "bench_lora.py": (
        "LoRA against full fine-tuning",
        "Step time, peak memory, XLA step buffers and optimizer state of LoRA r=8 on c_attn against full "
        "fine-tuning, each case in its own process.",
    ),
    "bench_eval.py": (
        "Evaluation speed",
        "WikiText-2 perplexity at stride 512: jaxlm's scorer against the Hugging Face guide's PyTorch loop on "
        "the same tokens, batch by batch in turn in one process; then LAMBADA with jaxlm.",
    ),
    "eval_head.py": (
        "The eval scorer's LM head",
        "log p(target) and the argmax test over GPT-2's 50257-entry head, by form and chunk size.",
    ),
    "profile_eval.py": (
        "Where an eval forward's time goes",
        "One `jax.profiler` trace of the scorer on 1024-token windows, kernels grouped by what they compute; "
        "then one layer's attention alone, jaxlm against PyTorch's fused kernel.",
    ),
    "hf_parity.py": (
        "Parity with transformers",
        "Max |logit| and |loss| difference between jaxlm and transformers' PyTorch GPT-2 on random-init "
        "checkpoints written by `save_pretrained` (no timing).",
    ),
    "sft_padding.py": (
        "Padding in prompt/completion batches",
        "Padding targets per step with length buckets against padding every row to block_size, over the "
        "bundled task files (counts, no timing).",
    ),
    "bench_serve.py": (
        "Serving",
        "N concurrent streaming clients (128 new tokens, greedy) against `python -m jaxlm.serve` and `transformers "
        "serve` (continuous batching on and off) on the same random GPT-2 124M, one after the other; jaxlm's "
        "offline Generator at the same batch; the engine's decode step against the matmul peak.",
    ),
    "soak_serve.py": (
        "Serving soak",
        "Thousands of requests with random lengths and settings, some clients disconnecting mid-stream and some "
        "sending malformed bodies: every well-formed answer checked, slots freed, memory before and after.",
    ),
    "gpu.py": (
        "The GPU check",
        "HF parity, GPT-2 124M training (cuDNN and XLA attention, remat off/on) against nanoGPT with "
        "torch.compile, and decode against transformers, on one GPU (docs/accelerators.md).",
    ),
}
# Scripts with a section that bench/run_all.py does not run on this kind of machine, and why.
NOT_IN_RUN_ALL = {"gpu.py": "it needs a GPU: run it on one (docs/accelerators.md)"}
# bench/*.py files that write no result of their own, and why.
HELPERS = {
    "record.py": "writes a result: the machine, versions, commit, command, date and rows",
    "run_all.py": "runs every benchmark at its default size, then regenerates this page",
    "hf_flax_generate.py": "the HF Flax peer, run by bench_generate.py in a Python of its own",
    "hf_train_torch.py": "the transformers PyTorch training peer, run by bench_train.py",
    "nanogpt_torch.py": "the nanoGPT PyTorch training peer, run by bench_train.py",
}

INTRO = """\
# Benchmarks

Generated by `python docs/make_benchmarks.py` from the results in `bench/results/`; do not edit by hand
(`tests/test_benchmarks_doc.py` fails when this page and the results disagree).

**How a result is made.** Every script in `bench/` keeps its command line and ends by writing one JSON
result per run, `bench/results/NAME.json` (`bench/record.py`): the exact command (led by any environment
variable that changes what is measured, such as `JAXLM_NATIVE` or `XLA_FLAGS`), the date, the commit, the
run's wall time, the load average at its start and end (the machine may be shared), the machine (CPU model
and flags, cores, devices, whether jaxlm's native decode kernels run, and the float32 matmul peak and read
bandwidth measured in the same run), the Python, jax and peer library versions, notes, and its rows.
Where a flag changes what is compared, the result's name says so (`generate_native_off`), so several runs of
one script can sit side by side.

**Tables never mix machines.** Each section below is one run of one command on one machine, and the peers
in its table (transformers' PyTorch GPT-2, nanoGPT, Hugging Face's Flax GPT-2) were measured in that same
command, interleaved where the section says so. Sections may come from different machines or days: read
their machine lines before comparing across them. A peer that could not run is shown as `-` and the notes
say why; nothing is copied in from elsewhere.

**Reproduce.** `python bench/run_all.py` runs every benchmark at its default size, one after another, then
rewrites this page (`--list` prints the commands; `--only generate,eval` runs some; `--hf-flax-python PATH`
names a Python with transformers 4.57 + flax for the HF Flax peer). One benchmark: its command below, then
`python docs/make_benchmarks.py`. Speed and memory targets live here, never in timed tests.
"""


def _script(command: str) -> str:
    """bench/NAME.py of a recorded command (environment assignments come first)."""
    words = shlex.split(command)
    return Path(words[words.index("python") + 1]).name


def load(results: Path) -> list[dict]:
    """Every result, in the page's order: by script (SCRIPTS' order, unknown scripts last), then name."""
    out = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    order = {s: i for i, s in enumerate(SCRIPTS)}
    return sorted(out, key=lambda r: (order.get(_script(r["command"]), len(order)), r["name"]))


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        # the scripts round what they record; large numbers get thousands separators and no decimals
        return f"{x:,.0f}" if x != x or abs(x) >= 1000 else str(x)
    return str(x).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> list[str]:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    numeric = [all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows) for c in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return lines


def tables(rows: list[dict]) -> list[str]:
    """One table, or one per value of the rows' "table" key (in order of first appearance)."""
    if not any("table" in r for r in rows):
        return table(rows) + [""]
    lines = []
    for name in dict.fromkeys(r.get("table", "") for r in rows):
        part = [{k: v for k, v in r.items() if k != "table"} for r in rows if r.get("table", "") == name]
        lines += ([f"*{name}*", ""] if name else []) + table(part) + [""]
    return lines


def machine_line(m: dict) -> str:
    flags = ", ".join(m.get("cpu_flags") or []) or "none of those recorded"
    devices = f"{m.get('device_count', '?')} x {m.get('device_kind', '?')} ({m.get('platform', '?')})"
    out = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores (flags: {flags}); devices: {devices}"
    if "matmul_f32_gflops" in m:
        out += f"; float32 matmul {m['matmul_f32_gflops']} GFLOP/s, read {m.get('read_gbps', '?')} GB/s"
    native = m.get("native_kernels")
    if native:
        runs = [f"{d} {why}" if why == "in use" else f"{d} not run ({why})" for d, why in native.items()]
        out += "; jaxlm native decode kernels: " + ", ".join(runs)
    return out


def software_line(r: dict) -> str:
    m = r["machine"]
    parts = [f"Python {m.get('python', '?')}", f"jax {m.get('jax', '?')}", f"jaxlib {m.get('jaxlib', '?')}"]
    parts += [f"{k} {v}" for k, v in r.get("versions", {}).items()]
    return ", ".join(parts)


def _slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def section(r: dict) -> list[str]:
    title, about = SCRIPTS.get(_script(r["command"]), (r["name"], ""))
    load = r.get("load_avg", {})
    run = f"{r['date']}, commit `{r.get('commit') or 'unknown'}`"
    if "duration_s" in r:
        run += f", {r['duration_s']:.0f} s"
    if load:
        start, end = load.get("start", ["?"])[0], load.get("end", ["?"])[0]
        run += f"; load average (1 min) {start} at the start, {end} at the end"
    lines = [f"## {title}: `{r['name']}`", ""] + ([about, ""] if about else [])
    lines += [
        f"- Command: `{r['command']}`",
        f"- Run: {run}",
        f"- Machine: {machine_line(r['machine'])}",
        f"- Software: {software_line(r)}",
        "",
    ]
    lines += tables(r["rows"])
    if r.get("notes"):
        lines += [r["notes"].strip(), ""]
    return lines


def render(results: Path = RESULTS) -> str:
    rs = load(results)
    lines = [INTRO, "## Contents", ""]
    for r in rs:
        title = SCRIPTS.get(_script(r["command"]), (r["name"],))[0]
        heading = f"{title}: `{r['name']}`"
        lines.append(f"- [{heading}](#{_slug(heading)}) ({r['date']}, {r['machine'].get('cpu', '?')})")
    missing = [s for s in SCRIPTS if s not in {_script(r["command"]) for r in rs}]
    if missing:
        lines += ["", "No result yet: " + ", ".join(f"`python bench/{s}`" for s in missing) + "."]
    lines.append("")
    for r in rs:
        lines += section(r)
    return "\n".join(lines).rstrip("\n") + "\n"


# Pages that show one result's section between `<!-- NAME-table -->` and `<!-- /NAME-table -->` (result NAME).
EMBEDS = {ROOT / "docs" / "serving.md": "serve"}


def embedded(page: str, name: str, results: Path = RESULTS) -> str:
    """`page` with result `name`'s section (its heading one level down) between its markers."""
    start, end = f"<!-- {name}-table -->", f"<!-- /{name}-table -->"
    if start not in page or end not in page:
        return page
    found = [r for r in load(results) if r["name"] == name]
    body = [("#" + line if line.startswith("## ") else line) for line in section(found[0])] if found else []
    before, rest = page.split(start, 1)
    return before + start + "\n" + "\n".join(body) + end + rest.split(end, 1)[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="fail if the page is out of date")
    p.add_argument("--results", type=Path, default=RESULTS, help="the results folder (default bench/results)")
    p.add_argument("--out", type=Path, default=OUT, help="the page (default docs/benchmarks.md)")
    args = p.parse_args()
    pages = {args.out: render(args.results)}
    if args.out == OUT:  # the real page: the pages that embed a result follow it (not a test's scratch page)
        pages |= {p: embedded(p.read_text(), name, args.results) for p, name in EMBEDS.items() if p.is_file()}
    if args.check:
        stale = [p.name for p, text in pages.items() if not p.is_file() or p.read_text() != text]
        if stale:
            print(f"{', '.join(stale)} is out of date: run python docs/make_benchmarks.py", file=sys.stderr)
            return 1
        return 0
    for page, text in pages.items():
        if not page.is_file() or page.read_text() != text:
            page.write_text(text)
            print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
