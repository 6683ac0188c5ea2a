"""Runs every benchmark at its default size, one after another, then rewrites docs/benchmarks.md.

    python bench/run_all.py                          # all of them
    python bench/run_all.py --list                   # the commands, without running them
    python bench/run_all.py --only generate,eval     # some of them, by result name
    python bench/run_all.py --hf-flax-python PATH    # with HF's Flax GPT-2 as a decode peer

Each command writes its own result in bench/results/ (the name in RUNS); one that fails is reported and the
rest still run, and the page is rewritten from whatever results there are. Run it on a quiet machine: the
results record the load average, but nothing corrects for it. PATH is a Python with transformers 4.57 (the
last with Flax models), flax and jax, e.g. `python -m venv hfflax && hfflax/bin/pip install
"transformers==4.57.*" flax jax`; without it the decode results record HF Flax as absent.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# (result name, environment, script and arguments): every benchmark at its default size.
RUNS = [
    ("hf_parity", {}, ["hf_parity.py"]),
    ("sft_padding", {}, ["sft_padding.py"]),
    ("generate", {}, ["bench_generate.py"]),
    # XLA's products where jaxlm's native kernels would run; skipped where they do not (the run above is that).
    ("generate_native_off", {"JAXLM_NATIVE": "0"}, ["bench_generate.py", "--no-torch"]),
    ("decode_linear", {}, ["decode_linear.py"]),
    ("slot_attention", {}, ["slot_attention.py"]),
    ("train", {}, ["bench_train.py"]),
    ("profile_train", {}, ["profile_train.py"]),
    ("lora", {}, ["bench_lora.py"]),
    ("eval", {}, ["bench_eval.py"]),
    ("eval_head", {}, ["eval_head.py"]),
    ("profile_eval", {}, ["profile_eval.py"]),
    ("serve", {}, ["bench_serve.py"]),
    ("serve_soak", {}, ["soak_serve.py"]),
]


def native_runs() -> bool:
    """Whether jaxlm's native decode kernels run here for some dtype (else a native-off run repeats the default)."""
    from jaxlm.cpu import native

    return any(native.unavailable(d) is None for d in ("float32", "bfloat16"))


def command(env: dict, argv: list[str]) -> str:
    return shlex.join([*(f"{k}={v}" for k, v in env.items()), "python", f"bench/{argv[0]}", *argv[1:]])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the commands and exit")
    p.add_argument("--only", help="comma-separated result names from RUNS")
    p.add_argument("--hf-flax-python", help="a Python with transformers 4.57 + flax, for bench_generate's HF Flax peer")
    args = p.parse_args()
    runs = RUNS
    if args.only:
        names = args.only.split(",")
        if unknown := [n for n in names if n not in {r[0] for r in RUNS}]:
            p.error(f"unknown result {unknown[0]!r}: pick from {', '.join(r[0] for r in RUNS)}")
        runs = [r for r in RUNS if r[0] in names]
    plan = []
    for name, env, argv in runs:
        if name.endswith("_native_off") and not args.list and not native_runs():
            print(f"skip {name}: jaxlm's native kernels do not run on this CPU, so `generate` already used XLA's")
            continue
        if argv[0] == "bench_generate.py" and args.hf_flax_python and "--no-torch" not in argv:
            argv = [*argv, "--hf-flax-python", args.hf_flax_python]
        plan.append((name, env, argv))
    if args.list:
        for name, env, argv in plan:
            print(f"{name}: {command(env, argv)}")
        return 0
    failed = []
    for name, env, argv in plan:
        print(f"== {name}: {command(env, argv)}", flush=True)
        t = time.time()
        r = subprocess.run([sys.executable, str(BENCH / argv[0]), *argv[1:]], cwd=ROOT, env={**os.environ, **env})
        print(f"== {name}: {'ok' if r.returncode == 0 else f'FAILED (exit {r.returncode})'}, {time.time() - t:.0f} s")
        if r.returncode:
            failed.append(name)
    subprocess.run([sys.executable, str(ROOT / "docs" / "make_benchmarks.py")], cwd=ROOT, check=True)
    if failed:
        print(f"failed: {', '.join(failed)} (their earlier results, if any, are still on the page)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
