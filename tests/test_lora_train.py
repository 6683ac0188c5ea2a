"""LoRA training runs: the real step at step 0 is the base model, only adapters move, resume is bit-exact,
the run directory loads, samples and exports (to PEFT, checked by `peft` itself), and bad flags exit 2.

All runs share one shape and schedule (bfloat16 compute, float32 params), so they share compiled steps
through the disk cache."""

import json
import logging
import shutil
import warnings

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from helpers import shared_cache  # noqa: F401 (autouse fixture)

import jaxlm
import jaxlm.train as trainer
from jaxlm import lora
from jaxlm.cli import run_cli
from jaxlm.config import GPTConfig, TrainConfig
from jaxlm.generation.cli import main as sample_main
from jaxlm.io import convert, hf
from jaxlm.io import runs as run_checkpoints
from jaxlm.parallel import sharding

MODEL = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32)
TINY = dict(batch_size=4, block_size=32, warmup_iters=2, lr_decay_iters=6, learning_rate=1e-2, eval_iters=2)
TINY |= dict(eval_interval=3, log_interval=1, tensorboard=False, dtype="bfloat16", dropout=0.0)
LORA = dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lora_targets="c_attn,c_proj,c_fc")
TOKENS = np.random.default_rng(0).integers(0, 65, (2, 12))


def quiet(*args, **kwargs):
    pass


def cfg(out, base, **changes) -> TrainConfig:
    return TrainConfig(out_dir=str(out), init_from=str(base), **{**TINY, **LORA, **changes})


def rows(out, key):
    return [(r["step"], r[key]) for r in trainer.read_metrics(out / "metrics.jsonl") if key in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A random base (jaxlm checkpoint, no tokenizer: the char data's), a 6-step LoRA run, and the same run
    stopped at 3 and resumed through the CLI."""
    root = tmp_path_factory.mktemp("lora_runs")
    params = jax.jit(jaxlm.init_params, static_argnums=0)(MODEL, jax.random.key(0))
    jaxlm.save(root / "base", MODEL, params)
    trainer.train(cfg(root / "a", root / "base", max_iters=6), log=quiet)
    trainer.train(cfg(root / "b", root / "base", max_iters=3), log=quiet)
    assert run_cli(trainer.main, ["--init-from", "resume", "--out-dir", str(root / "b"), "--max-iters", "6"]) == 0
    return root, params


def test_resume_is_bit_exact_and_checkpoints_hold_adapters_only(runs):
    root, base = runs
    a, b = root / "a", root / "b"
    assert rows(a, "loss") == rows(b, "loss") and len(rows(a, "loss")) == 6
    assert rows(a, "val_loss") == rows(b, "val_loss")
    config, lc, adapters_a, record, tok = run_checkpoints.load_run_adapters(a)
    _, _, adapters_b, _, _ = run_checkpoints.load_run_adapters(b)
    jax.tree.map(np.testing.assert_array_equal, adapters_a, adapters_b)
    assert lc == lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("c_attn", "c_proj", "c_fc"))
    assert record == {"source": str((root / "base").resolve()), "fingerprint": lora.fingerprint(base)}
    assert tok["kind"] == "char" and config.dtype == "bfloat16"
    step_dir = a / "checkpoints" / "6"
    assert sorted(p.name for p in step_dir.iterdir() if p.is_dir()) == ["meta", "opt_state", "params", "progress"]
    # the adapters trained (B left zero), and the run loads merged: base + s A B
    assert np.abs(np.asarray(adapters_a["h"]["attn"]["c_attn"]["lora_b"])).max() > 0
    _, merged = jaxlm.load(a)
    want = lora.merge(base, adapters_a, lc)
    jax.tree.map(np.testing.assert_array_equal, merged, want)


def test_step_zero_is_the_base_model_and_only_adapters_change(runs, tmp_path):
    """Through the real jitted step: LoRA's first loss equals the base model's bit for bit (B = 0), the base
    comes back in the same buffers (donated through, not copied), the optimizer state is adapter-shaped."""
    root, base = runs
    tokens = trainer.Batch(jax.numpy.asarray(np.random.default_rng(1).integers(0, 65, (1, 4, 33)), jax.numpy.int32))
    c = cfg(tmp_path / "lora", root / "base", max_iters=6, dtype="float32")  # (bfloat16: fusions round apart)
    s = trainer.setup(c, log=quiet)
    with sharding.activate(s.mesh):
        state = s.init_state()
        tx, schedule = trainer.make_optimizer(c), trainer.lr_schedule(c)
        step = trainer.jit_train_step(s.loss_fn, tx, schedule, s.state_shardings, s.mesh)
        before = jax.device_get(jax.tree.map(jax.numpy.copy, state))  # host views would block donation
        pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state["frozen"])]
        new, metrics = step(state, tokens)
        base_loss = jax.jit(trainer.lm_loss(s.config))(base, {}, jax.tree.map(lambda x: x[0], tokens), None)[0]
    assert float(metrics["loss"]) == float(base_loss)
    assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(new["frozen"])] == pointers
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new["frozen"]), before["frozen"])
    assert jax.tree.structure(new["params"]) == jax.tree.structure(
        lora.shapes(s.config, lora.LoraConfig(rank=4, targets="c_attn,c_proj,c_fc"))
    )
    b = new["params"]["h"]["mlp"]["c_fc"]["lora_b"]
    assert np.abs(np.asarray(b)).max() > 0 and not np.any(before["params"]["h"]["mlp"]["c_fc"]["lora_b"])
    adapter_shapes = {x.shape for x in jax.tree.leaves(new["params"])}
    opt_shapes = {x.shape for x in jax.tree.leaves(new["opt_state"]) if x.ndim}
    assert opt_shapes == adapter_shapes
    assert lora.count(new["opt_state"]) < 3 * lora.count(new["params"]) + 16  # mu, nu and counters


@pytest.fixture(scope="module")
def hf_base(runs):
    root, base = runs
    hf.to_hf(MODEL, base, root / "hf_base")
    return root / "hf_base"


def _peft_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def test_run_exports_to_peft_hf_orbax_and_samples(runs, hf_base, tmp_path, capsys, caplog):
    root, _ = runs
    a = root / "a"
    assert run_cli(convert.main, [str(a), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert run_cli(convert.main, [str(a), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert run_cli(convert.main, [str(a), str(tmp_path / "orbax")]) == 0
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_base)  # (warns: a 65-token vocab lacks GPT-2's eos)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_model, tmp_path / "peft")
    messages = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning | FutureWarning)]
    messages += [r.getMessage() for r in caplog.records if "token_id must be" not in r.getMessage()]  # vocab 65
    assert not messages, messages  # no missing or unexpected keys
    ref = _peft_logits(model.eval())
    config, merged = jaxlm.load(a, dtype="float32")
    ours = np.asarray(jaxlm.GPT(config).apply({"params": merged}, TOKENS))
    assert np.abs(ours - ref).max() <= 1e-4
    merged_hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert np.abs(_peft_logits(merged_hf) - ref).max() <= 1e-4
    _, from_orbax = jaxlm.load(tmp_path / "orbax")
    jax.tree.map(np.testing.assert_array_equal, from_orbax, merged)
    cfg_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg_json["base_model_name_or_path"] == str((root / "base").resolve()) and cfg_json["r"] == 4
    capsys.readouterr()
    argv = ["--start", "ROMEO:", "--num-samples", "1", "--max-new-tokens", "5", "--temperature", "0"]
    assert run_cli(sample_main, ["--init-from", str(a), *argv]) == 0
    assert run_cli(sample_main, ["--init-from", str(tmp_path / "orbax"), *argv]) == 0
    out = capsys.readouterr().out.split("ROMEO:")
    assert len(out) == 3 and out[1].strip() == out[2].strip()  # the run samples as its merged export


def test_a_changed_base_is_refused_naming_both(runs, tmp_path, capsys):
    root, base = runs
    shutil.copytree(root / "base", tmp_path / "base")
    run = tmp_path / "run"
    trainer.train(cfg(run, tmp_path / "base", max_iters=1), log=quiet)
    other = jax.tree.map(lambda x: x + 1.0, base)
    jaxlm.save(tmp_path / "base", MODEL, other, overwrite=True)
    want, got = lora.fingerprint(base)[:12], lora.fingerprint(other)[:12]
    with pytest.raises(jaxlm.JaxlmError, match=f"{want} recorded, {got} found"):
        jaxlm.load(run)
    capsys.readouterr()
    assert run_cli(sample_main, ["--init-from", str(run), "--max-new-tokens", "2"]) == 2
    assert run_cli(trainer.main, ["--init-from", "resume", "--out-dir", str(run), "--max-iters", "2"]) == 2
    errs = [e for e in capsys.readouterr().err.splitlines() if not e.startswith("loading ")]
    assert len(errs) == 2 and all(e.startswith("error: ") and want in e and got in e for e in errs)
    assert rows(run, "loss")[-1][0] == 1  # nothing trained on the wrong base


def test_adapter_from_peft_continues_training(runs, hf_base, tmp_path):
    root, _ = runs
    torch.manual_seed(0)
    model = peft.get_peft_model(
        transformers.GPT2LMHeadModel.from_pretrained(hf_base),
        peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["c_fc"], use_rslora=True),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / "adapter")
    logged = []
    c = TrainConfig(
        out_dir=str(tmp_path / "run"), init_from=str(root / "base"), adapter=str(tmp_path / "adapter"), **TINY
    )
    s = trainer.setup(c, log=logged.append)
    assert any(line.startswith("LoRA r=2 on c_fc: 640 trainable") for line in logged), logged
    _, want = jaxlm.load_adapter(tmp_path / "adapter", MODEL)
    with sharding.activate(s.mesh):
        state = s.init_state()
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), state["params"], want)
    assert s.lora["config"]["rslora"] is True and s.lora["config"]["alpha"] == 4


BAD = [
    (["--lora-rank", "4"], "--lora-rank adapts a pretrained model"),
    (["--base", "--lora-rank", "-1"], "--lora-rank must be positive"),
    (["--base", "--lora-rank", "33"], r"LoRA rank 33 exceeds min(in, out) = 32"),
    (["--base", "--lora-rank", "4", "--lora-targets", "c_attn,q_proj"], "unknown LoRA target 'q_proj'"),
    (["--base", "--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--base", "--lora-alpha", "8"], "--lora-alpha needs --lora-rank > 0"),
    (["--base", "--adapter", "nowhere"], "no such directory"),
    (["--base", "--adapter", "ADAPTER", "--lora-targets", "c_fc"], "drop --lora-targets"),
    (["--base", "--adapter", "ADAPTER", "--lora-rank", "2"], "drop --lora-rank"),
]


@pytest.mark.parametrize("argv, match", BAD, ids=[m for _, m in BAD])
def test_bad_lora_flags_exit_2_and_write_nothing(runs, tmp_path, capsys, argv, match):
    root, _ = runs
    adapter = tmp_path / "adapter"
    lc = lora.LoraConfig(rank=2, targets="c_fc")
    jaxlm.save_adapter(adapter, MODEL, lc, lora.init(jax.random.key(0), MODEL, lc))
    subst = {"--base": ["--init-from", str(root / "base")], "ADAPTER": [str(adapter)]}
    argv = [x for a in argv for x in subst.get(a, [a])]
    out = tmp_path / "out"
    assert run_cli(trainer.main, [*argv, "--out-dir", str(out), "--max-iters", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    assert not out.exists()


def test_resume_refuses_other_lora_flags(runs, capsys):
    root, _ = runs
    argv = ["--init-from", "resume", "--out-dir", str(root / "a"), "--max-iters", "8", "--lora-rank", "8"]
    assert run_cli(trainer.main, argv) == 2
    assert "the run has lora_rank=4 but --lora-rank 8 was given" in capsys.readouterr().err
