"""Compile a Program and read what the compiler says of it: bytes per device, custom calls, or "does not fit".

`memory_analysis()` describes one device (one chip of a TPU slice): arguments, outputs (those aliased to
donated arguments are the same bytes), temporaries, generated code, and the compiler's peak of what is live at
once. A program over the chip's memory does not compile: XLA raises RESOURCE_EXHAUSTED, read here as a
result, not an error.
"""

from __future__ import annotations

import re
import resource
import time
from dataclasses import dataclass

from .programs import Program

GiB = 1024**3
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


@dataclass
class Compiled:
    program: Program
    seconds: float  # wall-clock compile time
    cpu_seconds: float  # process CPU time spent compiling (less sensitive to a busy host)
    executable: object | None = None  # None: it did not fit
    error: str | None = None  # the compiler's RESOURCE_EXHAUSTED message, first line

    @property
    def fits(self) -> bool:
        return self.executable is not None

    def memory(self) -> dict[str, int]:
        """Bytes per device: arguments, outputs, alias (outputs that reuse donated arguments), temporaries,
        generated code, and peak (the compiler's peak of live bytes: what the device must hold)."""
        m = self.executable.memory_analysis()
        return {
            "arguments": m.argument_size_in_bytes,
            "outputs": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes,
            "temporaries": m.temp_size_in_bytes,
            "code": m.generated_code_size_in_bytes,
            "peak": m.peak_memory_in_bytes,
        }

    def custom_calls(self) -> set[str]:
        """The custom-call targets in the compiled program (XLA's own, and kernels such as tpu_custom_call)."""
        return set(_TARGET.findall(self.executable.as_text()))


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def compile_program(program: Program) -> Compiled:
    """Lower and compile `program`; a program too big for the device comes back with `error` set."""
    t, c = time.perf_counter(), _cpu_seconds()
    lowered = program.lower()
    try:
        executable, error = lowered.compile(), None
    except Exception as e:  # XlaRuntimeError: only RESOURCE_EXHAUSTED is a result, the rest are bugs
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        executable, error = None, _first_line(str(e))
    return Compiled(program, time.perf_counter() - t, _cpu_seconds() - c, executable, error)


def _first_line(text: str) -> str:
    line = next((x for x in text.splitlines() if "RESOURCE_EXHAUSTED" in x), text.splitlines()[0])
    return line.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def table(results: list[Compiled], device_bytes: int | None, devices: int) -> str:
    """One row per program: shapes, bytes per device, share of the device, model TFLOPs per device, compile s."""
    head = ["program", "shapes", "args", "temp", "output", "alias", "code", "peak GiB", "of device", "TFLOP/dev"]
    rows = [head + ["compile s"]]
    for r in results:
        tflop = f"{r.program.flops / devices / 1e12:.3g}"
        if r.fits:
            m = r.memory()
            share = f"{m['peak'] / device_bytes:.0%}" if device_bytes else "?"
            cells = [gib(m[k]) for k in ("arguments", "temporaries", "outputs", "alias", "code")]
            rows.append([r.program.name, r.program.shapes, *cells, gib(m["peak"]), share, tflop])
        else:
            rows.append([r.program.name, r.program.shapes, *["-"] * 5, "over", "> 100%", tflop])
        rows[-1].append(f"{r.seconds:.0f}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) + 1)]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )


def summary(results: list[Compiled], tpu, mesh, config, lora) -> dict:
    """The report as data (what --json writes): the slice, the run, and per program its bytes per device, model
    FLOPs per device, custom calls and compile times, or why it does not fit."""
    devices = len(tpu.devices)
    programs = []
    for r in results:
        row = {"name": r.program.name, "shapes": r.program.shapes, "fits": r.fits}
        row["flops_per_device"] = r.program.flops / devices
        row["compile_s"], row["compile_cpu_s"] = round(r.seconds, 1), round(r.cpu_seconds, 1)
        if r.fits:
            row["memory"] = r.memory()
            row["custom_calls"] = sorted(r.custom_calls())
        else:
            row["error"] = r.error
        programs.append(row)
    return {
        "topology": tpu.name,
        "device_kind": tpu.kind,
        "devices": devices,
        "chips": tpu.chips,
        "device_bytes": tpu.device_bytes,
        "mesh": dict(mesh.shape),
        "model": config.to_dict(),
        "lora": None if lora is None else lora.to_dict(),
        "programs": programs,
    }
