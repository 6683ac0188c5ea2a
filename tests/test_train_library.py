"""The training library's seams: a frozen subset, a light `import jaxlm`, and resume through the real CLI
on CPU cores as devices (the layout a run started with is the layout it resumes with)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from helpers import TEST_XLA_FLAGS

import jaxlm
import jaxlm.train as trainer
from jaxlm.config import TrainConfig
from jaxlm.parallel import sharding

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, warmup_iters=2, eval_iters=2)


def test_freezing_all_but_ln_f_trains_ln_f_only():
    cfg = TrainConfig(**TINY, learning_rate=1e-2)
    config = cfg.model_config(65)
    tx = trainer.make_optimizer(cfg)
    mesh = sharding.make_mesh(None)
    only_ln_f = lambda path: path.startswith("ln_f/")  # noqa: E731
    shapes, shardings = trainer.model_layout(config, tx, mesh, only_ln_f)
    with sharding.activate(mesh):
        state = trainer.new_state(config, tx, shardings, seed=0, trainable=only_ln_f)
        before = jax.tree.map(np.asarray, jaxlm.utils.tree.combine(state["params"], state["frozen"]))
        step = jax.jit(trainer.make_train_step(config, tx, trainer.lr_schedule(cfg)))
        tokens = jax.random.randint(jax.random.key(1), (1, 4, 33), 0, 65)
        for _ in range(3):
            state, metrics = step(state, tokens)
    assert set(state["params"]) == {"ln_f"} and "ln_f" not in state["frozen"]
    after = jaxlm.utils.tree.combine(state["params"], state["frozen"])
    flat_before, flat_after = _flat(before), _flat(after)
    changed = {p for p in flat_before if not np.array_equal(flat_before[p], flat_after[p])}
    assert changed == {"ln_f/scale", "ln_f/bias"}
    # Adam's moments exist for ln_f alone: every array in the optimizer state has ln_f's shape.
    opt_shapes = {x.shape for x in jax.tree.leaves(state["opt_state"]) if x.ndim}
    assert opt_shapes == {(config.n_embd,)} and len(jax.tree.leaves(shapes["opt_state"])) > 2
    assert np.isfinite(float(metrics["loss"]))


def _flat(tree) -> dict:
    return {"/".join(k.key for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_masked_loss_counts_only_masked_targets_across_micro_batches():
    """With a mask, accumulation is the masked mean over the whole batch, not a mean of micro-batch means."""
    cfg = TrainConfig(**TINY, grad_clip=0.0)
    config = cfg.model_config(65)
    tx = trainer.make_optimizer(cfg)
    params = jax.jit(jaxlm.init_params, static_argnums=0)(config, jax.random.key(0))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": jnp.zeros(2, jnp.uint32)}
    tokens = jax.random.randint(jax.random.key(2), (2, 4, 33), 0, 65)
    mask = np.zeros((2, 4, 32), np.float32)
    mask[0, :, :3] = 1  # 12 targets counted in micro-batch 0, 64 in micro-batch 1
    mask[1, :2] = 1
    step = jax.jit(trainer.make_train_step(config, tx, trainer.lr_schedule(cfg)))
    _, m2 = step(state, trainer.Batch(tokens, jnp.asarray(mask)))
    _, m1 = step(state, trainer.Batch(tokens.reshape(1, 8, 33), jnp.asarray(mask.reshape(1, 8, 32))))
    logits = jaxlm.GPT(config).apply({"params": params}, tokens.reshape(8, 33)[:, :-1])
    nll = -jax.nn.log_softmax(logits)[jnp.arange(8)[:, None], jnp.arange(32), tokens.reshape(8, 33)[:, 1:]]
    expected = float((nll * mask.reshape(8, 32)).sum() / mask.sum())
    np.testing.assert_allclose([float(m1["loss"]), float(m2["loss"])], [expected, expected], rtol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)


def test_load_of_a_run_imports_no_training_libraries(tmp_path):
    out = tmp_path / "run"
    trainer.train(TrainConfig(**TINY, out_dir=str(out), max_iters=1, eval_interval=1), log=lambda *a, **k: None)
    code = (
        "import sys, jaxlm; config, params = jaxlm.load(sys.argv[1]); "
        "print(sorted(m for m in ('optax', 'tqdm', 'tensorboardX', 'matplotlib') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


FLAGS = (
    "--n-layer 2 --n-head 2 --n-embd 32 --block-size 32 --batch-size 4 --lr-decay-iters 40 --warmup-iters 5 "
    "--eval-interval 20 --eval-iters 2 --log-interval 1 --dropout 0.1 --seed 7 --tensorboard false"
).split()


def _train(out, *flags, cache):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["XLA_FLAGS"] = TEST_XLA_FLAGS  # the quick compiles, and no device count: the cores rule decides
    env["JAXLM_CACHE"] = str(cache)
    cmd = [sys.executable, str(ROOT / "train.py"), *FLAGS, f"--out-dir={out}", *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], [
        (r["step"], r["val_loss"]) for r in rows if "val_loss" in r
    ]


def test_resumed_cli_run_on_cpu_cores_equals_the_uninterrupted_one(tmp_path):
    """train.py 20 steps, then --init-from resume to 40 == train.py 40 steps: every logged loss, bit for bit,
    with the CPU-cores-as-devices rule in force (no XLA_FLAGS)."""
    cores = len(os.sched_getaffinity(0))
    devices = max(d for d in range(1, cores + 1) if 4 % d == 0)
    whole, split, cache = tmp_path / "whole", tmp_path / "split", tmp_path / "cache"
    log = _train(whole, "--max-iters=40", cache=cache)
    assert f"on {devices} cpu device(s)" in log
    _train(split, "--max-iters=20", cache=cache)
    log = _train(split, "--max-iters=40", "--init-from=resume", cache=cache)
    assert f"on {devices} cpu device(s)" in log
    assert json.loads((split / "runtime.json").read_text())["cpu_devices"] == devices
    assert _losses(whole) == _losses(split) and len(_losses(whole)[0]) == 40

    # Resuming a run that is already complete says so, exits 0 and touches nothing.
    before = {p: p.stat().st_mtime_ns for p in split.rglob("*")}
    log = _train(split, "--init-from=resume", cache=cache)
    assert "is complete: step 40 of --max-iters 40" in log and "larger --max-iters" in log
    assert {p: p.stat().st_mtime_ns for p in split.rglob("*")} == before


def test_cpu_cores_as_devices_only_for_small_vocabularies(tmp_path, monkeypatch):
    """A small model gets a CPU device per core only with a char-level vocabulary; GPT-2's (builtin, by
    tokenizer, or read from a prepared dataset's meta.json) keeps one device, where no all-reduce can hang."""
    from jaxlm.train.runtime import cpu_cores_for

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    prepared = {}
    for name, vocab in (("bpe", 50257), ("chars", 65)):
        prepared[name] = tmp_path / name
        prepared[name].mkdir()
        (prepared[name] / "meta.json").write_text(json.dumps({"format": "jaxlm-data", "vocab_size": vocab}))

    def layout(**over):
        cfg = TrainConfig.preset("shakespeare-char", **over)
        return trainer.host_layout({k: getattr(cfg, k) for k in cfg.__dataclass_fields__})

    cores = cpu_cores_for(TrainConfig.preset("shakespeare-char").batch_size)
    assert layout() == {"cpu_devices": cores, "keep_freed_memory": True}
    assert layout(dataset=str(prepared["chars"])) == {"cpu_devices": cores, "keep_freed_memory": True}
    for over in ({"dataset": "shakespeare"}, {"dataset": str(prepared["bpe"])}, {"vocab_size": 50304}):
        assert layout(**over) == {"cpu_devices": None, "keep_freed_memory": True}, over
    assert layout(mesh="data=1")["cpu_devices"] is None
