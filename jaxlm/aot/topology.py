"""TPU topologies from a CPU host: libtpu describes a slice's chips as compile-only devices, no TPU attached.

`jax.experimental.topologies.get_topology_desc("v5e:2x2", "tpu")` gives devices that meshes, shardings and
`jit(...).lower(...).compile()` accept like real ones, and the executable's `memory_analysis()` gives the bytes
each chip holds. What libtpu does not say is how much memory a chip has: CHIP_MEMORY holds that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import JaxlmError

GiB = 1024**3
# HBM per chip by device_kind prefix (first match wins), from Google's TPU system architecture pages.
CHIP_MEMORY = (
    ("TPU v2", 16 * GiB),
    ("TPU v3", 32 * GiB),
    ("TPU v4", 32 * GiB),
    ("TPU v5 lite", 16 * GiB),
    ("TPU v5", 95 * GiB),
    ("TPU v6 lite", 32 * GiB),
)
# libtpu's default chips per host (2x2x1): a smaller slice (v5e:1x1, v5e:2x1) must say its own bounds.
_HOST_BOUNDS = (2, 2, 1)
_NAME = re.compile(r"([A-Za-z0-9_ ]+)[:=]((?:\d+x){1,2}\d+)")
EXAMPLES = "v5e:2x2, v5e:2x4, v6e:2x2, v5p:2x2x1, v4:2x2x1"
# libtpu loaded where no TPU is attached looks for one and prints five lines of warnings at the first topology; these
# tell it what to assume instead. Only for a machine without a TPU: on a TPU VM libtpu reads its own.
QUIET_LIBTPU = {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost"}
# libtpu lets one process at a time load it (a lock file guarding the chips); compiling opens no chip, so a compile
# may run beside another, or beside a training job on a TPU VM.
SHARED_LIBTPU = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def compile_only_env(environ) -> dict:
    """Variables to add to `environ` (a mapping) before a process that only compiles for TPUs loads libtpu:
    SHARED_LIBTPU, and QUIET_LIBTPU off a TPU VM; none that `environ` already sets."""
    attached = Path("/dev/accel0").exists() or any(Path("/dev/vfio").glob("[0-9]*"))
    quiet = {} if attached or any(k in environ for k in QUIET_LIBTPU) else QUIET_LIBTPU
    return {k: v for k, v in {**SHARED_LIBTPU, **quiet}.items() if k not in environ}


@dataclass(frozen=True)
class Slice:
    """A TPU slice's compile-only devices (one per chip, or per core for v2-v4) and their memory."""

    name: str
    devices: tuple
    chips: int
    device_bytes: int | None  # HBM per device; None: a generation CHIP_MEMORY lacks

    @property
    def kind(self) -> str:
        return self.devices[0].device_kind


def open_slice(name: str) -> Slice:
    """The TPU slice `name` (GENERATION:CHIPS, e.g. v5e:2x2) as libtpu describes it."""
    devices = topology_devices(name)
    chips = len({tuple(d.coords) for d in devices})
    chip = next((b for prefix, b in CHIP_MEMORY if devices[0].device_kind.startswith(prefix)), None)
    return Slice(name, tuple(devices), chips, None if chip is None else chip * chips // len(devices))


def topology_devices(name: str) -> list:
    """The compile-only devices of TPU slice `name`, in libtpu's order."""
    m = _NAME.fullmatch(name.strip())
    if not m:
        raise JaxlmError(f"bad --topology {name!r}: write GENERATION:CHIPS, e.g. {EXAMPLES}")
    dims = [int(d) for d in m.group(2).split("x")]
    if min(dims) < 1:
        raise JaxlmError(f"bad --topology {name!r}: every size must be at least 1")
    dims += [1] * (3 - len(dims))
    bounds = tuple(min(d, b) for d, b in zip(dims, _HOST_BOUNDS, strict=True))
    try:
        from jax.experimental import topologies

        kw = {} if bounds == _HOST_BOUNDS else {"chips_per_host_bounds": bounds}
        return list(topologies.get_topology_desc(name.strip(), "tpu", **kw).devices)
    except RuntimeError as e:  # jax's own errors (JaxRuntimeError included) are RuntimeErrors
        text = str(e)
        if "TPU support not installed" in text:
            raise JaxlmError("compiling for a TPU needs libtpu: pip install 'jaxlm[tpu]'") from None
        if "Invalid TPU external name" in text:
            raise JaxlmError(f"unknown TPU generation in --topology {name!r}; known: {EXAMPLES}") from None
        raise JaxlmError(f"--topology {name!r}: {text.splitlines()[0]}") from None
