"""Benchmark results as data: every bench script ends with `record.save(NAME, rows, ...)`.

A result is `bench/results/NAME.json`: the machine it ran on (CPU model and flags, cores, accelerator, the
float32 matmul peak and read bandwidth measured in the same run), jax/jaxlib versions, the commit, the exact
command, the date, and its rows (a list of flat dicts; each row names what it measured and the peers it was
compared with in the same run). `python docs/make_benchmarks.py` renders bench/results/*.json into
docs/benchmarks.md. A table never mixes machines: one result file is one run of one command.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
# CPU flags worth naming: what the native kernels and XLA:CPU's fast paths depend on.
_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "asimd", "sve")


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


def matmul_peak_flops(n: int = 2048, seconds: float = 1.0, dtype: str = "float32") -> float:
    """Sustained FLOP/s of a square jitted matmul on the default device (a CPU's practical peak)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or reps < 2:
        f(a, a).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / elapsed


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
    if measure:
        out["matmul_f32_gflops"] = round(matmul_peak_flops() / 1e9, 1)
        out["read_gbps"] = round(read_bandwidth() / 1e9, 1)
    return out


def _commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
        return r.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if r.returncode == 0 else None
    except OSError:
        return None


def save(name: str, rows: list[dict], *, machine_info: dict | None = None, notes: str = "", argv=None) -> Path:
    """Write bench/results/NAME.json (whole or not at all) and return its path."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    result = {
        "name": name,
        "command": " ".join(["python", str(script), *argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "machine": machine_info if machine_info is not None else machine(),
        "notes": notes,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    return path
