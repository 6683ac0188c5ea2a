"""Benchmark results as data: every bench script ends with `record.save(NAME, rows, ...)`.

A result is `bench/results/NAME.json`: the machine it ran on (CPU model and flags, cores, accelerator, the
float32 matmul peak and read bandwidth measured in the same run), jax/jaxlib versions, the commit, the exact
command, the date, and its rows (a list of flat dicts; each row names what it measured and the peers it was
compared with in the same run). `python docs/make_benchmarks.py` renders bench/results/*.json into
docs/benchmarks.md. A table never mixes machines: one result file is one run of one command.

The machine is shared on some hosts, so a result also records the load average when this module was
imported (the run's start) and when it was saved, the run's wall time, the environment variables that
change what is measured (they lead the recorded command) and the versions of the peer libraries the
run imported.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
# CPU flags worth naming: what the native kernels and XLA:CPU's fast paths depend on.
_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "asimd", "sve")
# Environment variables that change what a benchmark measures: recorded as part of its command.
ENV = (
    "JAXLM_NATIVE",
    "XLA_FLAGS",
    "JAX_PLATFORMS",
    "JAX_ENABLE_X64",
    "JAX_DEFAULT_MATMUL_PRECISION",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
)
# Libraries whose versions a result names when the run imported them (the peers and jaxlm's own stack).
_LIBRARIES = ("flax", "optax", "numpy", "torch", "transformers", "peft")
# Taken at import, i.e. at the start of the run: a bench script imports this module first.
_START = {"time": time.time(), "load": os.getloadavg(), "env": {k: os.environ[k] for k in ENV if k in os.environ}}


def _cpu() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cpu_flags": [f for f in _FLAGS if f in flags], "cores": cores}


def read_bandwidth(nbytes: int = 512 * 2**20, reps: int = 10) -> float:
    """Bytes/s of a jitted sum over `nbytes` (the memory read bound a decode step is held to)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        f(x).block_until_ready()
    return nbytes * reps / (time.perf_counter() - t0)


def machine(measure: bool = True) -> dict:
    """What this run ran on; with `measure`, the float32 matmul peak and read bandwidth measured now."""
    import jax
    import jaxlib

    device = jax.devices()[0]
    out = {
        **_cpu(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
    }
    if device.platform == "cpu":
        from jaxlm.cpu import native

        # "in use": jaxlm's native decode kernels run for that dtype; else why not (no AVX-512, JAXLM_NATIVE=0).
        out["native_kernels"] = {d: native.unavailable(d) or "in use" for d in ("float32", "bfloat16")}
    if measure:
        from jaxlm.train.metrics import measure_matmul_flops

        out["matmul_f32_gflops"] = round(measure_matmul_flops() / 1e9, 1)
        out["read_gbps"] = round(read_bandwidth() / 1e9, 1)
    return out


def _commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        # "dirty": tracked code that a run executes has changed; results, docs and tests do not count.
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"]
        dirty = subprocess.run([*status, ":!docs", ":!tests", ":!*.md"], cwd=ROOT, capture_output=True)
        return r.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if r.returncode == 0 else None
    except OSError:
        return None


_START["commit"] = _commit()  # the code that runs is the code at the start, whatever a sitting commits meanwhile


def versions(extra: dict | None = None) -> dict:
    """Versions of the libraries this process imported (of _LIBRARIES), plus `extra` (e.g. a peer's venv)."""
    out = {}
    for lib in _LIBRARIES:
        if lib in sys.modules:
            out[lib] = getattr(sys.modules[lib], "__version__", "?")
    return {**out, **(extra or {})}


def command(argv=None, env: dict | None = None) -> str:
    """The command line that reproduces this run: result-changing environment variables, then python SCRIPT ARGS."""
    argv = sys.argv if argv is None else argv
    env = _START["env"] if env is None else env
    args = [_portable(a) for a in argv[1:]]
    return shlex.join([*(f"{k}={v}" for k, v in env.items()), "python", _portable(str(Path(argv[0]).resolve())), *args])


def _portable(arg: str) -> str:
    """A path inside the repository as a relative one; one outside it (a peer's venv) as PATH, since a result
    names no path of the machine it ran on (`--flag=/x` alike)."""
    flag, eq, value = arg.rpartition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
    if not value.startswith("/"):
        return arg
    try:
        value = str(Path(value).resolve().relative_to(ROOT))
    except ValueError:
        value = "PATH"
    return flag + eq + value


def print_table(rows: list[dict]) -> None:
    """Rows as a markdown table on stdout (None as "-"), for the console; the page renders them again."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("-" if r.get(c) is None else str(r.get(c)) for c in cols) + " |", flush=True)


def _valid_row(row) -> bool:
    return isinstance(row, dict) and all(
        isinstance(k, str) and (v is None or isinstance(v, str | int | float | bool)) for k, v in row.items()
    )


def save(
    name: str,
    rows: list[dict],
    *,
    machine_info: dict | None = None,
    notes: str = "",
    argv=None,
    extra_versions: dict | None = None,
    results: Path | None = None,
) -> Path:
    """Write RESULTS/NAME.json (whole or not at all) and return its path. Rows are flat dicts of scalars
    (None where a peer was not measured), units in their keys; rows with a "table" key are rendered as one
    table per value of it. `notes` says what a reader needs beyond the rows (e.g. why a peer is absent)."""
    if not rows or not all(_valid_row(r) for r in rows):
        raise ValueError(f"{name}: rows must be a non-empty list of flat dicts of str/int/float/bool/None")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"{name!r}: a result name is letters, digits, '_' and '-'")
    # duration and end load are read before measuring the machine, whose own matmul would count in them
    result = {
        "name": name,
        "command": command(argv),
        "date": datetime.date.today().isoformat(),
        "commit": _START["commit"],
        "duration_s": round(time.time() - _START["time"], 1),
        "load_avg": {"start": [round(x, 2) for x in _START["load"]], "end": [round(x, 2) for x in os.getloadavg()]},
        "machine": machine_info if machine_info is not None else machine(),
        "versions": versions(extra_versions),
        "notes": notes,
        "rows": rows,
    }
    folder = RESULTS if results is None else Path(results)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    return path
