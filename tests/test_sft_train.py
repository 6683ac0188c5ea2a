"""Fine-tuning on prompt/completion data: the masked loss through the real train step by hand, proof that a
model learns a task it can only solve by reading the prompt, and resume bit for bit on a 2x2 mesh."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import cpu_devices, shared_cache  # noqa: F401 (autouse fixture)

import jaxlm.train as trainer
from jaxlm import GPT, init_params
from jaxlm.cli import run_cli
from jaxlm.config import GPTConfig, TrainConfig
from jaxlm.data import sft
from jaxlm.data.cli import main as data_main
from jaxlm.eval.tasks import run_task
from jaxlm.tokenizer import from_spec

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "abcdefgh"


def reversal_rows(n, seed, length=5, exclude=()):
    """QA rows "Q: cabhd\\nA:" -> " dhbac": the answer is the question reversed (unseen strings held out)."""
    r, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < n:
        s = "".join(r.choice(LETTERS) for _ in range(r.choice(length) if isinstance(length, list) else length))
        if s not in seen:
            seen.add(s)
            rows.append({"question": s, "answers": [s[::-1]]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def quiet(*args, **kwargs):
    pass


def test_masked_loss_through_the_train_step_counts_completion_and_eos_only(tmp_path):
    """Two micro-batches of padded rows of different lengths: the step's loss is the mean NLL over exactly the
    completion tokens and each example's EOS, computed here by hand from the model's logits."""
    rows = [{"prompt": "ab=", "completion": "ba"}, {"prompt": "abcdefg=", "completion": "gfedcba"}] * 4
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    ds = sft.open_sft(sft.prepare(src, tmp_path / "ds", tokenizer="char", block_size=16, val_fraction=0.25))
    tok = from_spec(ds.tokenizer_spec)
    tokens, mask = sft.get_batch(ds, "train", 0, 0, (2, 3), 16)
    assert tokens.shape == (2, 3, 17) and (tokens == tok.eot_id).sum() > 2 * 3  # padded rows, EOS ids as padding

    config = GPTConfig(vocab_size=ds.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    params = init_params(config, jax.random.key(0))
    cfg = TrainConfig(warmup_iters=0, grad_clip=0.0)  # the loss reported is the one before the update
    state = {"params": params, "opt_state": trainer.make_optimizer(cfg).init(params), "step": 0}
    state["rng"] = jax.random.key_data(jax.random.key(1))
    step = jax.jit(trainer.make_train_step(config, trainer.make_optimizer(cfg), trainer.lr_schedule(cfg)))
    _, metrics = step(state, trainer.Batch(tokens, mask))

    rows_NxT1 = tokens.reshape(-1, 17)
    logits = np.asarray(jax.jit(GPT(config).apply)({"params": params}, rows_NxT1[:, :-1]), np.float64)
    logp_NxTxV = logits - logits.max(-1, keepdims=True)
    logp_NxTxV -= np.log(np.exp(logp_NxTxV).sum(-1, keepdims=True))
    nll, counted = [], 0
    for row, logp in zip(rows_NxT1, logp_NxTxV, strict=True):
        prompt, completion = tok.decode(row).split("=", 1)
        n_prompt, n_completion = len(prompt) + 1, len(completion.split("<|endoftext|>")[0]) + 1  # + its EOS
        for t in range(n_prompt - 1, n_prompt - 1 + n_completion):  # targets row[t + 1]: completion, then EOS
            nll.append(-logp[t, row[t + 1]])
        counted += n_completion
    assert counted == mask.sum() and counted < mask.size / 2  # prompts and padding are most of the batch
    assert float(metrics["loss"]) == pytest.approx(np.mean(nll), rel=1e-5)


@pytest.fixture(scope="module")
def reversal(tmp_path_factory):
    """2,000 reversal examples prepared (char-level, --template qa) and a 100-row held-out file."""
    root = tmp_path_factory.mktemp("reversal")
    train_rows = reversal_rows(2000, seed=0)
    held_out = reversal_rows(100, seed=1, exclude={r["question"] for r in train_rows})
    src = write_jsonl(root / "reverse.jsonl", train_rows)
    flags = ["--template", "qa", "--tokenizer", "char", "--block-size", "32"]
    assert run_cli(data_main, ["prepare", str(src), str(root / "ds"), *flags]) == 0
    return root / "ds", write_jsonl(root / "held_out.jsonl", held_out)


def test_fine_tuned_model_reverses_unseen_strings(reversal, tmp_path):
    """The answer is the question reversed: no completion can be right without reading the prompt."""
    ds, held_out = reversal
    cfg = TrainConfig(
        out_dir=str(tmp_path / "run"),
        dataset=str(ds),
        n_layer=2,
        n_head=2,
        n_embd=64,
        block_size=32,
        dropout=0.0,
        batch_size=32,
        max_iters=150,
        learning_rate=3e-3,
        warmup_iters=20,
        lr_decay_iters=150,
        eval_interval=150,
        eval_iters=2,
        log_interval=50,
    )
    summary = trainer.train(cfg, log=quiet)
    assert summary["val_loss"] < 0.05
    config, params, spec = trainer.load_run(tmp_path / "run")
    result = run_task("qa", params, config, from_spec(spec), held_out, batch_size=50, progress=False, max_new_tokens=8)
    assert result["examples"] == 100 and result["metrics"]["exact_match"] >= 95, result["predictions"][:5]
    assert {"prediction", "answers"} <= set(result["predictions"][0])


RESUME_ON_A_MESH = """
import sys
import jax
import numpy as np
import jaxlm.train as trainer
from jaxlm.config import TrainConfig

ds, root = sys.argv[1], sys.argv[2]
common = dict(dataset=ds, n_layer=1, n_head=2, n_embd=16, block_size=64, batch_size=4, mesh="data=2,fsdp=2",
              gradient_accumulation_steps=2, dropout=0.1, max_iters=6, lr_decay_iters=6, warmup_iters=1,
              eval_interval=3, eval_iters=2, log_interval=1)
quiet = lambda *a, **k: None
trainer.train(TrainConfig(out_dir=root + "/whole", **common), log=quiet)
trainer.train(TrainConfig(out_dir=root + "/split", **{**common, "max_iters": 3}), log=quiet)
values = {**TrainConfig(out_dir=root + "/split", **common).to_dict(), "init_from": "resume"}
explicit = frozenset({"init_from", "max_iters"})
trainer.train(trainer.resume_config(values, explicit, trainer.run_meta(root + "/split")[1]), explicit, log=quiet)
a, b = (trainer.load_run(root + "/" + d)[1] for d in ("whole", "split"))
jax.tree.map(np.testing.assert_array_equal, a, b)
print("devices", len(jax.devices()))
"""


def test_resume_on_a_2x2_mesh_is_bit_exact(tmp_path):
    """Examples in two length buckets (two compiled steps), accumulation and dropout, on data=2 x fsdp=2 CPU
    devices: 6 steps == 3 steps, stop, resume to 6, every logged loss and final weight bit for bit."""
    rows = reversal_rows(200, seed=2, length=[4, 20])
    src = write_jsonl(tmp_path / "r.jsonl", rows)
    ds = sft.prepare(src, tmp_path / "ds", template="qa", tokenizer="char", block_size=64)
    assert {sft.get_batch(sft.open_sft(ds), "train", 0, k, (2, 4), 64)[1].shape[-1] for k in range(6)} == {32, 64}
    env = {**os.environ, **cpu_devices(4)}
    cmd = [sys.executable, "-c", RESUME_ON_A_MESH, str(ds), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0 and "devices 4" in r.stdout, r.stderr[-3000:]
    whole, split = (
        [(m["step"], m.get("loss"), m.get("val_loss")) for m in trainer.read_metrics(tmp_path / d / "metrics.jsonl")]
        for d in ("whole", "split")
    )
    assert whole == split and sum(loss is not None for _, loss, _ in whole) == 6
