"""GPT-2 124M compiled for a TPU v5e:2x2 from this CPU (libtpu's compile-only devices), through the real command.

`python -m jaxlm.aot --topology v5e:2x2 --config gpt2-124m` compiles the preset's train step, eval step, and the
prefill and decode step `python sample.py` runs, with the mesh, shardings and kernels train.py and sample.py pick
on a TPU (splash attention in the train step); `--lora-rank 8` compiles the LoRA run's train step. Each test reads
the report the command wrote (--json) and its output: it compiled, each chip's memory fits 16 GiB, the bytes are
per chip, and no CPU-only custom call (jaxlm's native FFI kernels) is in a TPU program.

The two compiles of GPT-2 124M (~1 and ~2 CPU-minutes) run as two processes side by side, once for the module.
"""

import json
import os
import subprocess
import sys

import jax
import pytest
from helpers import ROOT, run_py

from jaxlm.aot.cli import main
from jaxlm.aot.topology import compile_only_env
from jaxlm.cli import run_cli
from jaxlm.config import TrainConfig
from jaxlm.cpu.native import TARGETS
from jaxlm.parallel.sharding import make_mesh
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import model_layout

GiB = 2**30
V5E = "v5e:2x2"
CPU_ONLY = set(TARGETS)  # jaxlm's native decode kernels, registered for the CPU


@pytest.fixture(scope="module", autouse=True)
def compile_only():
    """What `python -m jaxlm.aot` sets before libtpu loads, for the tests that compile in this process."""
    added = compile_only_env(os.environ)
    os.environ.update(added)
    yield
    for k in added:
        del os.environ[k]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{run: (report, stdout)} of the command on GPT-2 124M (all four programs) and its LoRA r=8 train step."""
    out = tmp_path_factory.mktemp("aot")
    runs = {
        "full": ["--config", "gpt2-124m"],
        "lora": ["--config", "gpt2-124m", "--lora-rank", "8", "--programs", "train"],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "jaxlm.aot", "--topology", V5E, *argv, "--json", str(out / f"{name}.json")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, argv in runs.items()
    }
    done = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
        assert stderr == "", f"{name} wrote to stderr (libtpu's warnings?): {stderr[-2000:]}"
        done[name] = (json.loads((out / f"{name}.json").read_text()), stdout)
    return done


def programs(report) -> dict:
    return {p["name"]: p for p in report["programs"]}


def test_the_steps_compile_and_fit_a_v5e_chip(reports):
    full, lora = programs(reports["full"][0]), programs(reports["lora"][0])
    assert set(full) == {"train", "eval", "prefill", "decode"} and set(lora) == {"lora train"}
    for name, p in {**full, **lora}.items():
        assert p["fits"], f"{name}: {p.get('error')}"
        assert 0 < p["memory"]["peak"] < 16 * GiB, name
    # what a chip holds for training: GPT-2 124M with AdamW at 3 rows x 1024 per chip, well under its 16 GiB
    assert 2 * GiB < full["train"]["memory"]["peak"] < 12 * GiB
    assert lora["lora train"]["memory"]["peak"] < full["train"]["memory"]["peak"]  # no base gradients or moments
    summary = ", ".join(f"{n} {p['compile_cpu_s']} s" for n, p in {**full, **lora}.items())
    print(f"TPU compile CPU seconds: {summary}")


def test_the_command_reports_each_chip_against_its_memory(reports):
    report, stdout = reports["full"]
    assert report["device_kind"] == "TPU v5 lite" and report["devices"] == 4 and report["device_bytes"] == 16 * GiB
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}  # train.py's default: every chip on data
    assert report["model"]["scan_layers"] is True and report["model"]["remat"] is False  # the platform's rule
    lines = stdout.splitlines()
    assert lines[1].startswith(f"slice: {V5E}, 4 x TPU v5 lite (16.00 GiB each)")
    header = next(line for line in lines if line.startswith("program"))
    for column in ("args", "temp", "output", "peak GiB", "of device", "TFLOP/dev", "compile s"):
        assert column in header
    train = programs(report)["train"]
    row = next(line for line in lines if line.startswith("train "))
    assert f"{train['memory']['peak'] / GiB:.2f}" in row and "40 x 12 x 1024 tokens" in row
    assert lines[-1].startswith("fits: the largest, train, needs") and lines[-1].endswith("of 16.00 GiB per device")
    # model FLOPs of one step per chip: 6N + 12LTD per token (N without the position embedding) x 40 x 12 x 1024
    # tokens, over 4 chips
    tokens = 40 * 12 * 1024
    expected = (6 * 123_653_376 + 12 * 12 * 1024 * 768) * tokens / 4
    assert train["flops_per_device"] == pytest.approx(expected, rel=1e-3)


def test_the_memory_is_per_chip(reports):
    """On data=4 each chip holds the whole train state (params and AdamW's two moments, float32) and a quarter
    of the batch: the compiled program's argument bytes are exactly that."""
    cfg = TrainConfig.preset("gpt2-124m", dataset="shakespeare")
    mesh = make_mesh("data=1", devices=jax.devices()[:1])  # the shapes only: one CPU device will do
    shapes, _ = model_layout(cfg.model_config(50257), make_optimizer(cfg), mesh)
    state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    batch = 40 * 12 * 1025 * 4 // 4
    args = programs(reports["full"][0])["train"]["memory"]["arguments"]
    assert args == pytest.approx(state + batch, rel=1e-3)


def test_no_cpu_only_custom_call_and_splash_in_the_train_steps(reports):
    full, lora = programs(reports["full"][0]), programs(reports["lora"][0])
    for name, p in {**full, **lora}.items():
        calls = set(p["custom_calls"])
        assert not calls & CPU_ONLY and not any(c.startswith("jaxlm") for c in calls), (name, calls)
    for train in (full["train"], lora["lora train"]):
        assert "tpu_custom_call" in train["custom_calls"]  # Pallas splash attention, forward and backward
    assert "tpu_custom_call" not in full["decode"]["custom_calls"]  # a decode step attends to its cache in XLA


def test_a_run_that_does_not_fit_exits_2_with_one_line():
    # GPT-2 XL's float32 weights and AdamW moments alone (23 GiB) exceed one v5e chip
    argv = ["--topology", "v5e:1x1", "--config", "gpt2-124m", "--init-from", "gpt2-xl", "--block-size", "128"]
    argv += ["--batch-size", "1", "--gradient-accumulation-steps", "1", "--programs", "train"]
    r = run_py("-m", "jaxlm.aot", *argv, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: train (1 x 1 x 128 tokens) does not fit a TPU v5")
    assert "exceeds available HBM" in r.stderr and "more chips with --mesh fsdp=N" in r.stderr
    assert "over" in r.stdout.splitlines()[-1]  # the table is printed, with the program over the chip


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--topology", "v5e", "--config", "gpt2-124m"], "bad --topology 'v5e': write GENERATION:CHIPS"),
        (["--topology", "v9:2x2", "--config", "gpt2-124m"], "unknown TPU generation in --topology 'v9:2x2'"),
        (["--topology", V5E, "--config", "gpt2-xxl"], "unknown --config 'gpt2-xxl'"),
        (["--topology", V5E, "--config", "gpt2-124m", "--programs", "train,sample"], "--programs takes train"),
        (["--topology", V5E, "--config", "gpt2-124m", "--batch-size", "6"], "--batch-size 6 does not split over"),
        (["--topology", V5E, "--config", "gpt2-124m", "--mesh", "data=3"], "mesh 'data=3' has 3 devices but 4"),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys):
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
