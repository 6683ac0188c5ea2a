"""What a run reports: metrics.jsonl, TensorBoard, a progress bar, loss.png (process 0), and MFU's peak.

tqdm, tensorboardX and matplotlib are imported only when a run starts logging, so `import jaxlm.train`
stays light.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from ..config import check_dtype
from ..utils.publish import write_file

# Dense (no sparsity) peak FLOP/s of one JAX device, by the exact `device_kind` JAX reports, as
# (bfloat16, float32): vendor datasheets, whose tensor-core figures are "with sparsity" and halved here.
# float32 is what JAX's default matmul precision runs a float32 product as: one bfloat16 pass on a TPU
# (the bf16 peak), TF32 tensor cores on NVIDIA Ampere and later. Volta and Turing have no bf16 or TF32
# tensor cores: both dtypes run on the FP32 units. Unknown kinds give None (no MFU) unless --peak-flops.
#   source (per chip)                                  bf16 dense    TF32 / fp32 dense
#   Cloud TPU v2 (2 TensorCores = 2 JAX devices)       45 TF/chip    (bf16 pass)
#   Cloud TPU v3 (2 TensorCores = 2 JAX devices)       123 TF/chip   (bf16 pass)
#   Cloud TPU v4 (megacore: 1 JAX device)              275 TF        (bf16 pass)
#   Cloud TPU v5e / v5p / v6e (1 JAX device each)      197 / 459 / 918 TF
#   A100 datasheet (SXM4 and PCIe, 40 and 80 GB)       624* -> 312   TF32 312* -> 156
#   H100 datasheet: SXM5 / PCIe / NVL                  1979* / 1513* / 1671*   TF32 989* / 756* / 835*
#   H200 datasheet: SXM / NVL                          1979* / 1671*           TF32 989* / 835*
#   L4 datasheet                                       242* -> 121   TF32 120* -> 60
#   V100 datasheet: SXM2 / PCIe / V100S PCIe           (no bf16)     FP32 15.7 / 14 / 16.4
#   T4 datasheet                                       (no bf16)     FP32 8.1
_A100 = (312e12, 156e12)
_H100_SXM, _H100_PCIE, _NVL = (989.5e12, 494.5e12), (756.5e12, 378e12), (835.5e12, 417.5e12)
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "TPU v2": (22.5e12, 22.5e12),
    "TPU v3": (61.5e12, 61.5e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),  # v5e
    "TPU v5": (459e12, 459e12),  # v5p
    "TPU v5p": (459e12, 459e12),
    "TPU v6 lite": (918e12, 918e12),  # v6e
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA H100 80GB HBM3": _H100_SXM,  # the SXM5 part
    "NVIDIA H100 PCIe": _H100_PCIE,
    "NVIDIA H100 NVL": _NVL,
    "NVIDIA H200": _H100_SXM,  # the SXM part: H100 SXM's compute, more memory
    "NVIDIA H200 NVL": _NVL,
    "NVIDIA L4": (121e12, 60e12),
    "Tesla V100-SXM2-16GB": (15.7e12, 15.7e12),
    "Tesla V100-SXM2-32GB": (15.7e12, 15.7e12),
    "Tesla V100-PCIE-16GB": (14e12, 14e12),
    "Tesla V100-PCIE-32GB": (14e12, 14e12),
    "Tesla V100S-PCIE-32GB": (16.4e12, 16.4e12),
    "Tesla T4": (8.1e12, 8.1e12),
}


def peak_flops_for(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Dense peak FLOP/s of one device of `device_kind` (exactly as JAX reports it) computing in `dtype`
    ("bfloat16" or "float32"); None for a kind not in PEAK_FLOPS (a CPU, or an accelerator it does not know)."""
    check_dtype(dtype)
    peaks = PEAK_FLOPS.get(device_kind)
    return None if peaks is None else peaks[("bfloat16", "float32").index(dtype)]


def peak_flops_per_device(device=None, dtype: str = "bfloat16") -> float | None:
    """`peak_flops_for` the kind of `device` (default: the first device)."""
    return peak_flops_for((device or jax.devices()[0]).device_kind, dtype)


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, seconds: float = 1.0) -> float:
    """FLOP/s of a square jitted matmul on the default device: the practical peak of a CPU."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or reps < 2:
        f(a, a).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / elapsed


class RunLog:
    """metrics.jsonl rows (train: step, loss, lr, grad_norm, tokens_per_s, ms_per_step, mfu; eval: val_loss),
    TensorBoard scalars, a progress bar (or a line per row when not on a terminal), loss.png at the end."""

    def __init__(self, out: Path, tensorboard: bool, start: int, total: int):
        self.out, self.main = out, jax.process_index() == 0
        self.path = out / "metrics.jsonl"
        self.writer, self.bar = None, None
        if not self.main:
            return
        truncate_metrics(self.path, start)
        self.file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start or None)
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=None, file=sys.stderr)
        self.lines = self.bar.disable  # not a terminal: print a line per log row instead

    def row(self, **row):
        if not self.main:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self.writer.add_scalar(("val/" if k == "val_loss" else "train/") + k, v, row["step"])

    def train_row(self, row: dict):
        self.row(**row)
        if not self.main:
            return
        shown = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
        if row.get("mfu") is not None:
            shown["mfu"] = f"{100 * row['mfu']:.1f}%"
        if self.lines:
            print(f"step {row['step']}: " + ", ".join(f"{k} {v}" for k, v in shown.items()), flush=True)
        else:
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1):
        if self.main:
            self.bar.update(n)

    def write(self, msg: str):
        if self.main:
            self.bar.write(msg) if not self.lines else print(msg, flush=True)

    def close(self):
        if not self.main:
            return
        self.bar.close()
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        plot_losses(self.path, self.out / "loss.png")


def truncate_metrics(path: Path, start: int):
    """Drop rows a resumed run is about to write again (those after its checkpoint), and a row torn by a kill."""
    if not path.exists():
        return
    keep = [line for line, row in _lines(path) if row is not None and start and row["step"] <= start]
    write_file(path, "".join(line + "\n" for line in keep))


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl; a line torn by a kill (the run's last, until it resumes) is skipped."""
    return [row for _, row in _lines(Path(path)) if row is not None]


def _lines(path: Path) -> list[tuple[str, dict | None]]:
    """(line, row or None when the line is not a whole row) for each non-blank line."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            out.append((line, row if isinstance(row, dict) and isinstance(row.get("step"), int) else None))
    return out


def plot_losses(metrics_path: Path, png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for points, label in ((train, "train"), (val, "val")):
        if points:
            ax.plot(*zip(*points, strict=True), label=label, marker="o" if label == "val" else None, ms=3)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
