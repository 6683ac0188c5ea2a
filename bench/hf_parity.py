"""Max |logit| and |loss| difference, jaxlm vs PyTorch transformers, on random-init HF checkpoints.

python bench/hf_parity.py    # includes the full GPT-2 124M shape; about a minute on 2 CPU cores

Writes bench/results/hf_parity.json.
"""

import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import record  # early: the run's start time and load average
import torch
import transformers

import jaxlm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import FIXTURE, save_random_hf  # noqa: E402

SHAPES = [
    dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257),
    dict(n_layer=3, n_head=2, n_embd=32, n_positions=64, vocab_size=1000),
    dict(n_layer=1, n_head=8, n_embd=64, n_positions=32, vocab_size=300),
    dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257),  # GPT-2 124M
]


def main():
    torch.set_num_threads(2)
    print("| checkpoint | tokens | max abs logit diff | abs loss diff |")
    print("|---|---:|---:|---:|")
    rows = []
    for shape in [*SHAPES, None]:
        with tempfile.TemporaryDirectory() as d:
            if shape is None:
                d, name, model = FIXTURE, "fixture fake_gpt2_random (L1 H1 D2)", None
                model = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
                T, V = 64, 50257
            else:
                model = save_random_hf(d, **shape)
                name = "random L{n_layer} H{n_head} D{n_embd} V{vocab_size} P{n_positions}".format(**shape)
                T, V = min(shape["n_positions"], 256), shape["vocab_size"]
            config, params = jaxlm.load(d)
            tokens = np.random.default_rng(0).integers(0, V, (2, T))
            with torch.no_grad():
                ref = model(torch.tensor(tokens), labels=torch.tensor(tokens))
            logits = jaxlm.GPT(config).apply({"params": params}, jnp.asarray(tokens))
            loss = float(jaxlm.cross_entropy(logits[:, :-1], jnp.asarray(tokens[:, 1:])))
            dl = np.abs(np.asarray(logits) - ref.logits.numpy()).max()
            dloss = abs(loss - float(ref.loss))
            print(f"| {name} | 2 x {T} | {dl:.1e} | {dloss:.1e} |")
            rows.append(
                {
                    "checkpoint": name,
                    "tokens": f"2 x {T}",
                    "max_abs_logit_diff_vs_torch": float(f"{dl:.2g}"),
                    "abs_loss_diff_vs_torch": float(f"{dloss:.2g}"),
                }
            )
    notes = (
        "float32 on both sides; random tokens; jaxlm loads each directory with `jaxlm.load` and PyTorch with "
        "`GPT2LMHeadModel.from_pretrained`. The tests assert max |logit difference| <= 1e-4."
    )
    print(record.save("hf_parity", rows, notes=notes))


if __name__ == "__main__":
    main()
