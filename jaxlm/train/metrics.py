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

from ..utils.publish import write_file

# Dense bf16 peak FLOP/s per JAX device, by device_kind prefix (first match wins).
PEAK_FLOPS = (
    ("TPU v2", 22.5e12),
    ("TPU v3", 61.5e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12),
    ("Tesla V100", 125e12),
    ("Tesla T4", 65e12),
)


def peak_flops_per_device(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    return next((flops for prefix, flops in PEAK_FLOPS if kind.startswith(prefix)), None)


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
