"""Two processes on localhost (jax.distributed, CPU collectives) train like one; a dead peer is an error."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, cpu_devices

TINY = [
    "--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--block-size", "32", "--batch-size", "8",
    "--warmup-iters", "2", "--lr-decay-iters", "10", "--learning-rate", "1e-3", "--log-interval", "1",
    "--eval-interval", "10", "--eval-iters", "1", "--tensorboard", "false",
]  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {**os.environ, **cpu_devices(devices)}


def _launch(out, n: int, *extra, max_iters: int = 10, devices: int = 1):
    port = _port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                *TINY,
                "--max-iters",
                str(max_iters),
                "--out-dir",
                str(out),
                *extra,
                "--coordinator-address",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(n),
                "--process-id",
                str(i),
            ],
            cwd=ROOT,
            env=_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(n)
    ]


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])]


def test_two_processes_match_one(tmp_path):
    single = subprocess.run(
        [sys.executable, "train.py", *TINY, "--max-iters", "10", "--out-dir", str(tmp_path / "one")],
        cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    procs = _launch(tmp_path / "two", 2)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert "step" in outs[0][0] + outs[0][1] and "step 1" not in outs[1][0]  # only process 0 logs
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5)
    # The checkpoint written by both processes restores in a plain single process.
    import jaxlm

    config, params = jaxlm.load(tmp_path / "two")
    assert config.n_layer == 2 and params["h"]["mlp"]["c_fc"]["kernel"].shape == (2, 64, 256)


def test_dead_peer_makes_the_survivor_exit_with_a_clear_error(tmp_path):
    procs = _launch(tmp_path / "crash", 2, max_iters=100_000)
    metrics = tmp_path / "crash" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail(f"training did not start: {procs[0].communicate()[1][-2000:]}")
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    try:
        _, err = procs[0].communicate(timeout=90)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("the surviving process hung after its peer died")
    assert procs[0].returncode not in (0, None)
    assert "another process" in err and "died" in err


def test_a_failed_collective_is_told_from_other_errors():
    from jaxlm.parallel.distributed import is_peer_loss

    # What Orbax's save barrier raised when the peer was killed mid-save (a ValueError, not a JaxRuntimeError).
    gloo = ValueError("UNKNOWN: Gloo AllGather failed: [gloo/transport/tcp/pair.cc:547] Connection closed by peer")
    assert is_peer_loss(gloo)
    assert not is_peer_loss(ValueError("--batch-size must be >= 1"))
    assert not is_peer_loss(RuntimeError("disk full"))


def test_rows_go_to_the_devices_that_hold_them_and_oom_is_not_a_dead_peer(tmp_path):
    """A mesh that interleaves the two processes' devices trains the natural order's losses (each process builds
    the rows its devices hold, not one slice); a batch too big for memory is reported as that, by both."""
    port = _port()
    script = str(ROOT / "tests" / "permuted_processes.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(tmp_path), f"127.0.0.1:{port}", str(i)],
            cwd=ROOT,
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    report = json.loads(next(line for line in outs[0][0].splitlines() if line.startswith("RESULT "))[7:])
    assert report["rows"] == [0, 2, 4, 6]  # process 0 holds rows 0, 2, 4, 6 of 8 (one each), not a slice
    assert report["interleaved"] == report["natural"]  # bit for bit: each mesh position holds the same rows
    for out, err in outs:
        oom = next(line for line in out.splitlines() if line.startswith("OOM "))
        assert "out of device memory at --batch-size 4194304" in oom and "--remat true" in oom, oom
        assert "another process" not in err
