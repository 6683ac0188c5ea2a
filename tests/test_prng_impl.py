"""The train state's dropout key takes its shape from JAX's PRNG: a run under `jax_default_prng_impl=rbg`
(MaxText's TPU setting, 4-word keys) trains and resumes bit for bit; another PRNG cannot resume it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TEST_XLA_FLAGS

import jaxlm.train as trainer
from jaxlm.config import TrainConfig
from jaxlm.errors import JaxlmError
from jaxlm.io import runs

ROOT = Path(__file__).resolve().parents[1]
FLAGS = (
    "--n-layer 2 --n-head 2 --n-embd 32 --block-size 32 --batch-size 4 --lr-decay-iters 8 --warmup-iters 2 "
    "--eval-interval 4 --eval-iters 1 --log-interval 1 --dropout 0.1 --seed 7 --tensorboard false"
).split()

# train.py's main, three times in one process (one start-up): 8 steps, then 4 resumed to 8.
RUNS = """
import sys
from jaxlm.train import main
flags, whole, split = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
main([*flags, "--max-iters=8", f"--out-dir={whole}"])
main([*flags, "--max-iters=4", f"--out-dir={split}"])
main([*flags, "--max-iters=8", f"--out-dir={split}", "--init-from=resume"])
"""


def _losses(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def test_rbg_keys_train_and_resume_bit_for_bit(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["XLA_FLAGS"] = TEST_XLA_FLAGS  # the quick compiles, and no device count: the cores rule decides
    env |= {"JAX_DEFAULT_PRNG_IMPL": "rbg", "JAXLM_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(
        [sys.executable, "-c", RUNS, *FLAGS, str(whole), str(split)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(whole) == _losses(split) and len([x for x in _losses(whole) if x[1] is not None]) == 8
    assert runs.latest_run_meta(split)[1]["prng_impl"] == "rbg"

    # This process draws threefry keys ((2,), not rbg's (4,)): resuming says which PRNG the run needs.
    cfg = TrainConfig(out_dir=str(split), init_from="resume", max_iters=10)
    with pytest.raises(JaxlmError, match="trained with jax_default_prng_impl=rbg.*JAX_DEFAULT_PRNG_IMPL=rbg"):
        trainer.train(cfg, explicit=frozenset({"init_from", "max_iters"}), log=lambda *a, **k: None)
