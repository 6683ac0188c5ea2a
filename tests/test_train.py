"""Training: optimizer pieces, exact resume, signals, bad input. Tiny models; end-to-end runs in subprocesses
only where a signal or a crash is the point."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import shared_cache  # noqa: F401 (autouse fixture)

import jaxlm
import jaxlm.train as trainer
from jaxlm.cli import run_cli
from jaxlm.config import TrainConfig
from jaxlm.errors import JaxlmError
from jaxlm.train.flags import parse_train_args, train_arg_parser

ROOT = Path(__file__).resolve().parents[1]
HF_FIXTURE = ROOT / "tests" / "fixtures" / "fake_gpt2_random"
# Same shapes and schedule everywhere, so the module's runs share compiled steps through the disk cache.
TINY = dict(
    n_layer=2,
    n_head=2,
    n_embd=32,
    block_size=32,
    batch_size=4,
    warmup_iters=2,
    lr_decay_iters=1000,
    eval_iters=2,
    log_interval=1,
)
TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]


def tiny(out, **changes) -> TrainConfig:
    return TrainConfig(out_dir=str(out), **{**TINY, **changes})


def rows(out, key):
    return [(r["step"], r[key]) for r in trainer.read_metrics(Path(out) / "metrics.jsonl") if key in r]


def quiet(*args, **kwargs):
    pass


# --- optimizer pieces -------------------------------------------------------------------------


def test_schedule_warmup_cosine_floor():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, lr_decay_iters=60)
    lr = trainer.lr_schedule(cfg)
    assert 0 < float(lr(0)) < float(lr(5)) < float(lr(9)) < 1e-3  # linear warmup, no zero first step
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(35)), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-5)  # cosine midpoint
    np.testing.assert_allclose([float(lr(60)), float(lr(99))], [1e-4, 1e-4], rtol=1e-5)  # floor after decay
    assert float(trainer.lr_schedule(cfg.replace(decay_lr=False))(50)) == pytest.approx(1e-3)


def _init(config, seed=0):
    return jax.jit(jaxlm.init_params, static_argnums=0)(config, jax.random.key(seed))


def test_weight_decay_mask_decays_matrices_only():
    params = _init(jaxlm.GPTConfig.preset("tiny"))
    mask = trainer.decay_mask(params)
    flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["wte/embedding"] and flat["wpe/embedding"]
    assert flat["h/attn/c_attn/kernel"] and flat["h/mlp/c_fc/kernel"] and flat["h/mlp/c_proj/kernel"]
    assert not flat["h/attn/c_attn/bias"] and not flat["h/ln_1/scale"] and not flat["ln_f/bias"]
    # Decay really skips the masked-out leaves: with zero gradients only decayed params move.
    cfg = TrainConfig(weight_decay=0.5, grad_clip=0.0, decay_lr=False, learning_rate=0.1)
    tx = trainer.make_optimizer(cfg)
    params = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p))(params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert moved == mask


def test_gradient_accumulation_equals_one_big_batch():
    cfg = TrainConfig(**TINY, grad_clip=1.0)
    config = cfg.model_config(65)
    tx = trainer.make_optimizer(cfg)
    step = jax.jit(trainer.make_train_step(config, tx, trainer.lr_schedule(cfg)))
    tokens = jax.random.randint(jax.random.key(1), (4, 8, 33), 0, 65)
    params = _init(config)
    state = {
        "params": params,
        "opt_state": jax.jit(tx.init)(params),
        "step": jnp.int32(0),
        "rng": jnp.zeros(2, jnp.uint32),
    }
    # One batch of 32 sequences == 4 micro-batches of 8.
    results = [step(state, batch) for batch in (tokens.reshape(1, 32, 33), tokens)]
    (s1, m1), (s4, m4) = results
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1["params"], s4["params"])


# --- command line ----------------------------------------------------------------------------


def test_flags_both_spellings_bools_and_presets():
    cfg, explicit = parse_train_args(
        ["--n_layer=3", "--n-head", "3", "--n-embd=48", "--decay-lr", "false", "--overwrite"]
    )
    assert (cfg.n_layer, cfg.n_head, cfg.decay_lr, cfg.overwrite) == (3, 3, False, True)
    assert {"n_layer", "n_head", "n_embd", "decay_lr", "overwrite"} <= explicit and "batch_size" not in explicit
    cfg, _ = parse_train_args(["--config", "nanogpt-cpu", "--min-lr", "none"])
    assert (cfg.n_embd, cfg.block_size, cfg.batch_size, cfg.min_lr, cfg.final_lr) == (128, 64, 12, None, 1e-4)
    assert cfg.out_dir == "out-nanogpt-cpu"
    assert TrainConfig().out_dir == "out" and TrainConfig().dataset == "shakespeare_char"
    help_text = train_arg_parser().format_help()
    for field in TrainConfig.__dataclass_fields__:
        assert f"--{field.replace('_', '-')}" in help_text
    assert "(default: 1337)" in help_text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n-layr", "2"], "unrecognized arguments: --n-layr"),
        (["--n-layer", "two"], "invalid int value"),
        (["--dtype", "float64"], "invalid choice"),
        (["--decay-lr", "maybe"], "expected true or false"),
    ],
)
def test_bad_flags_exit_2_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_train_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n-layer", "0"], "--n-layer must be at least 1"),
        (["--n-embd", "100", "--n-head", "3"], "must be divisible by n_head"),
        (["--beta2", "1.0"], "--beta2 must be in [0, 1)"),
        (["--dropout", "1.5"], "dropout must be in [0, 1)"),
        (["--init-from", "resume", "--out-dir", "/nonexistent-run"], "holds no checkpoint to resume"),
    ],
)
def test_bad_values_are_one_line_errors(argv, message, capsys):
    assert run_cli(trainer.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


# --- runs ------------------------------------------------------------------------------------


def test_resume_is_bit_exact(tmp_path):
    """40 steps == 20 steps, stop, resume to 40: every logged loss and every final weight, bit for bit."""
    common = dict(max_iters=40, lr_decay_iters=40, eval_interval=10, dropout=0.1, gradient_accumulation_steps=2)
    a, b = tmp_path / "a", tmp_path / "b"
    trainer.train(tiny(a, **common), log=quiet)
    trainer.train(tiny(b, **{**common, "max_iters": 20}), log=quiet)
    assert rows(b, "loss")[-1][0] == 20
    values, explicit = (
        {**tiny(b).to_dict(), "init_from": "resume", "max_iters": 40},
        frozenset({"init_from", "max_iters"}),
    )
    resumed = trainer.resume_config(values, explicit, trainer.run_meta(b)[1])
    assert (resumed.dropout, resumed.gradient_accumulation_steps, resumed.lr_decay_iters) == (0.1, 2, 40)
    trainer.train(resumed, explicit, log=quiet)

    assert rows(a, "loss") == rows(b, "loss") and len(rows(a, "loss")) == 40
    assert rows(a, "val_loss") == rows(b, "val_loss") and [s for s, _ in rows(a, "val_loss")] == [0, 10, 20, 30, 40]
    config_a, params_a, tok = trainer.load_run(a)
    _, params_b, _ = trainer.load_run(b)
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
    # The run directory: what sampling and the loader need.
    assert tok["kind"] == "char" and config_a.vocab_size == 65 and config_a.dropout == 0.1
    assert sorted(int(p.name) for p in (a / "checkpoints").iterdir() if p.name.isdigit()) == [20, 30, 40]
    assert (a / "loss.png").stat().st_size > 1000 and list((a / "tensorboard").glob("events.out.tfevents.*"))
    config, params, tok2 = jaxlm.load_with_tokenizer(a)
    assert config == config_a and tok2 == tok


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    trainer.train(tiny(out, max_iters=4, eval_interval=2), log=quiet)
    argv = ["--init-from", "resume", f"--out-dir={out}", "--max-iters=30", "--learning-rate=1e30", "--min-lr=0"]
    argv += ["--checkpoint-interval=1"]
    assert run_cli(trainer.main, argv) == 2
    err = capsys.readouterr().err
    assert "error: loss became nan" in err and "at step 5" in err or "at step 6" in err
    assert "last good checkpoint: step" in err
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    _, params, _ = trainer.load_run(out)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))
    assert steps[-1] < int(err.split("at step ")[1].split(";")[0])


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    def fails(argv, message):
        assert run_cli(trainer.main, [*TINY_FLAGS, "--max-iters=3", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("na\xefve caf\xe9 ".encode("latin-1") * 100)
    small = tmp_path / "small.txt"
    small.write_text("too short for a block\n")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    fails([f"--dataset={tmp_path / 'missing.txt'}", f"--out-dir={tmp_path / 'o1'}"], "no such file or directory")
    fails([f"--dataset={latin1}", f"--out-dir={tmp_path / 'o2'}"], "is not UTF-8 text")
    fails([f"--dataset={small}", "--tokenizer=char", f"--out-dir={tmp_path / 'o3'}"], "fewer than block_size + 1")
    fails([f"--out-dir={not_a_dir / 'out'}"], "cannot write to --out-dir")
    # An out dir holding a different model is refused unless --overwrite.
    out = tmp_path / "run"
    trainer.train(tiny(out, max_iters=2), log=quiet)
    fails([f"--out-dir={out}", "--n-layer=3"], "holds a run of a different model")
    assert rows(out, "loss")  # untouched
    assert run_cli(trainer.main, [*TINY_FLAGS, "--max-iters=2", f"--out-dir={out}", "--n-layer=3", "--overwrite"]) == 0
    assert trainer.load_run(out)[0].n_layer == 3
    fails([f"--out-dir={out}", "--init-from=resume"], "the run has n_layer=3 but --n-layer 2 was given")


def test_init_from_hf_with_a_shorter_block(tmp_path):
    out = tmp_path / "ft"
    summary = trainer.train(
        tiny(out, init_from=str(HF_FIXTURE), dataset="shakespeare", block_size=16, max_iters=2, eval_interval=2),
        frozenset({"block_size"}),
        log=quiet,
    )
    config, params, tok = trainer.load_run(out)
    assert (config.n_embd, config.vocab_size, config.block_size, tok) == (2, 50257, 16, {"kind": "gpt2"})
    assert params["wpe"]["embedding"].shape == (16, 2) and np.isfinite(summary["val_loss"])
    with pytest.raises(JaxlmError, match="trained with the gpt2 tokenizer but the dataset uses char"):
        trainer.train(tiny(tmp_path / "x", init_from=str(HF_FIXTURE), max_iters=1), log=quiet)


def _train_process(out, *flags):
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY_FLAGS, f"--out-dir={out}", *flags]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _wait_for(predicate, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _complete_steps(out):
    d = Path(out) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_sigterm_saves_and_sigkill_mid_save_resumes(tmp_path):
    out = tmp_path / "run"
    flags = ["--max-iters=100000", "--lr-decay-iters=100000", "--eval-interval=100000", "--checkpoint-interval=1"]
    flags += ["--keep-checkpoints=2", "--tensorboard=false"]
    # SIGTERM: finish the step, save, exit 0 with a message.
    proc = _train_process(out, *flags)
    _wait_for(lambda: len(rows(out, "loss") if (out / "metrics.jsonl").exists() else []) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM at step" in stdout and "--init-from resume" in stdout
    stopped = int(stdout.split("at step ")[1].split(";")[0])
    assert _complete_steps(out)[-1] == stopped

    # SIGKILL while saving every step: the newest complete checkpoint restores, and training continues from it.
    proc = _train_process(out, "--init-from=resume")
    _wait_for(lambda: _complete_steps(out) and _complete_steps(out)[-1] >= stopped + 3, proc)
    proc.kill()
    proc.communicate()
    last = _complete_steps(out)[-1]
    values = {**tiny(out).to_dict(), "init_from": "resume", "max_iters": last + 2}
    cfg = trainer.resume_config(values, frozenset({"init_from", "max_iters"}), trainer.run_meta(out)[1])
    summary = trainer.train(cfg, frozenset({"init_from", "max_iters"}), log=quiet)
    assert summary["step"] == last + 2
    logged = [s for s, _ in rows(out, "loss")]
    assert logged == sorted(set(logged)) and logged[-1] == last + 2  # rows after the checkpoint were rewritten
    assert not [p for p in (out / "checkpoints").iterdir() if "tmp" in p.name]


def test_train_script_runs_and_says_how_to_sample(tmp_path):
    out = tmp_path / "run"
    proc = _train_process(out, "--max-iters=3", "--eval-interval=3")
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    assert f"sample from it: python sample.py --out-dir {out}" in stdout
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    proc = _train_process(out, "--max-iters=3", "--batch-size=0")
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 2 and stderr.startswith("error: --batch-size must be at least 1")
    assert "Traceback" not in stderr
