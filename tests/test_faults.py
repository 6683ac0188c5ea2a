"""Trainer faults, for real: SIGKILL anywhere (compile, mid-step, inside the async checkpoint write), a disk that
fills during a save, two writers on one run directory, metrics.jsonl torn by a kill.

`python -m pytest tests/test_faults.py -q -s` prints what each run of the test survived.
"""

import json
import os
import random
import resource
import signal
import socket

import jax
import numpy as np
import pytest
import trainfaults as tf
from helpers import cache_env

import jaxlm.train as trainer
from jaxlm.cli import run_cli
from jaxlm.train.metrics import truncate_metrics

SEED = 15
INTERVAL = 4  # --checkpoint-interval
RUN = ["--max-iters=40", "--eval-interval=10", f"--checkpoint-interval={INTERVAL}", "--keep-checkpoints=3"]


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory):
    """One dataset + compilation cache for the module's processes: the tiny steps compile once or twice."""
    jax.devices()  # JAX starts here with its own devices; in-process calls below cannot change them
    yield from cache_env(tmp_path_factory)


def _refused_while_live(out, proc, capsys):
    """A second trainer on a live run's directory is refused, naming the live one, before touching anything."""
    before = (out / "metrics.jsonl").read_bytes() if (out / "metrics.jsonl").exists() else None
    flags = ["--init-from=resume"] if trainer.run_meta(out) else []
    assert run_cli(trainer.main, [*tf.FLAGS, *RUN, f"--out-dir={out}", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"is in use by another training run (pid {proc.pid} on host {socket.gethostname()})" in err
    assert ((out / "metrics.jsonl").read_bytes() if before is not None else None) == before


def test_sigkill_anywhere_then_resume_is_bit_exact(tmp_path, capsys):
    rng = random.Random(SEED)
    ref, out, logs = tmp_path / "ref", tmp_path / "run", tmp_path / "logs"
    reference = tf.launch(ref, *RUN, logs=logs / "ref")  # uninterrupted, alongside
    phases = ["compile", "step", "save"]
    rng.shuffle(phases)
    kills = []
    for phase in phases:
        resume = ["--init-from=resume"] if tf.complete_steps(out) else []  # killed before any checkpoint: start over
        proc = tf.launch(out, *RUN, *resume, logs=logs / "run")
        kill = tf.kill_at(proc, out, phase, rng, on_frozen=lambda p: _refused_while_live(out, p, capsys))
        if kill is None:
            assert tf.finish(proc)[0] == 0
            break
        kills.append(kill)
        # The directory a kill leaves: resume reads its newest complete checkpoint, nothing else.
        found = trainer.run_meta(out)
        assert (found[0] if found else None) == (kill.complete[-1] if kill.complete else None)
        if found:
            assert found[1]["step"] == found[0] and found[1]["model"]["n_layer"] == 2
        # At most --checkpoint-interval steps redone, beyond the steps trained while a save was in flight: the
        # newest complete checkpoint is the newest save asked for (every INTERVAL steps) or the one before it.
        # (A save asked for may not have its temporary directory yet: Orbax creates it in the background.)
        last = kill.complete[-1] if kill.complete else 0
        asked = kill.logged_step // INTERVAL * INTERVAL
        assert asked - last <= INTERVAL, kill
        # The killed run's lock is left behind; it must not block the resume (the kernel dropped the flock).
        assert json.loads((out / "train.lock").read_text())["pid"] == kill.pid
    resume = ["--init-from=resume"] if tf.complete_steps(out) else []
    rc, stdout, stderr = tf.finish(tf.launch(out, *RUN, *resume, logs=logs / "run"))
    assert rc == 0, stderr
    assert tf.finish(reference)[0] == 0

    survived = ", ".join(f"{k.phase} (step {k.logged_step}, complete {k.complete}, writing {k.writing})" for k in kills)
    print(f"\nfault injection, seed {SEED}: {len(kills)} SIGKILLs survived: {survived}")
    assert "save" in [k.phase for k in kills]  # at least one kill landed inside a checkpoint write
    for key in ("loss", "lr", "grad_norm", "val_loss"):
        assert tf.logged(out, key) == tf.logged(ref, key), key
    assert [s for s, _ in tf.logged(out)] == list(range(1, 41))
    _, params_ref, _ = trainer.load_run(ref)
    _, params_out, _ = trainer.load_run(out)
    jax.tree.map(np.testing.assert_array_equal, params_ref, params_out)
    assert not tf.partial_steps(out)


def _file_size_limit(limit: int):
    """A disk that fills: files may not grow past `limit` bytes (the write fails with EFBIG, not a signal)."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def test_disk_full_during_a_save_keeps_the_last_checkpoint(tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    common = ["--eval-interval=100", "--checkpoint-interval=2"]
    assert tf.finish(tf.launch(out, *common, "--max-iters=4", logs=logs))[0] == 0
    assert tf.complete_steps(out) == [2, 4]
    # Resume with room for metrics rows but not for a checkpoint's array files: the save of step 6 fails in
    # Orbax's background thread and surfaces at the next save (step 8).
    proc = tf.run(out, *common, "--max-iters=12", "--init-from=resume", preexec_fn=_file_size_limit(16384))
    stderr = tf.without_closed_loop_noise(proc.stderr)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot write the checkpoint step 6 in ") and "no space left" in lines[0]
    assert lines[0].endswith("the last complete checkpoint is step 4"), lines[0]
    assert tf.complete_steps(out) == [2, 4] and not tf.partial_steps(out)  # nothing half-written left to pick
    assert trainer.run_meta(out)[0] == 4
    # A kill (or a full disk) tore the last metrics row mid-line: the resume repairs the file.
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 3.1')
    rc, stdout, stderr = tf.finish(tf.launch(out, *common, "--max-iters=12", "--init-from=resume", logs=logs))
    assert rc == 0, stderr
    assert [s for s, _ in tf.logged(out)] == list(range(1, 13)) and tf.complete_steps(out)[-1] == 12
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in rows)


def test_truncate_metrics_drops_a_torn_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(whole) + '\n{"step": 4, "lo')
    assert [r["step"] for r in trainer.read_metrics(path)] == [1, 2, 3]  # a reader skips it
    truncate_metrics(path, 2)
    assert path.read_text() == whole[0] + "\n" + whole[1] + "\n"


def test_second_writer_refused_and_stale_lock_ignored(tmp_path, capsys):
    out = tmp_path / "run"
    with trainer.RunLock(out):
        with pytest.raises(trainer.RunLocked, match=rf"pid {os.getpid()} on host"):
            trainer.RunLock(out).__enter__()  # another open of the file: flock refuses it, as for another process
    # Released (as the kernel releases a dead process's lock): the next writer takes it, the old pid notwithstanding.
    (out / "train.lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere"}) + "\n")
    with trainer.RunLock(out):
        assert json.loads((out / "train.lock").read_text())["pid"] == os.getpid()
