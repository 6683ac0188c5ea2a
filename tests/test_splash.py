"""Splash attention (the TPU kernel, interpreted on this CPU) against jaxlm's reference form: forward and
gradients at 128, 512 and 1024 tokens with several heads and left padding; inside the LM loss sharded over a
mesh; and in generation's prefill."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cpu_devices, run_py

import jaxlm
from jaxlm import kernels
from jaxlm.model.attention import attend, reference
from jaxlm.model.splash import block_for

SPLASH = kernels.resolve("cpu", attention="splash")  # a CPU program asking for splash: interpret mode


@pytest.mark.parametrize(
    "B, H, T, pad",
    [(2, 4, 128, (0, 37)), (1, 3, 512, None), (1, 2, 1024, None)],
    ids=["T128-heads4-padded", "T512-heads3", "T1024-heads2"],
)
def test_splash_equals_the_reference_forward_and_gradients(B, H, T, pad):
    q, k, v, w = (jax.random.normal(key, (B, H, T, 32)) for key in jax.random.split(jax.random.key(T), 4))
    valid = None if pad is None else jnp.arange(T)[None] >= jnp.asarray(pad)[:, None]
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & (True if valid is None else valid[:, None, :])
    if valid is not None:  # padding rows feed nothing (as in a prefill): the loss ignores them
        w = w * valid[:, None, :, None]

    def fwd_bwd(attention):  # one program: the output and the gradients of sum(output * w)
        @jax.jit
        def run(q, k, v, w):
            y, vjp = jax.vjp(attention, q, k, v)
            return y, vjp(w)

        return run(q, k, v, w)

    y, grads = fwd_bwd(lambda q, k, v: attend(q, k, v, valid_BxS=valid, kernels=SPLASH))
    y_ref, grads_ref = fwd_bwd(lambda q, k, v: reference(q, k, v, mask))
    rows = 1.0 if valid is None else valid[:, None, :, None]
    assert float(jnp.abs((y - y_ref) * rows).max()) <= 2e-6
    assert bool(jnp.isfinite(y).all())  # padding rows too: each sees at least itself
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert float(jnp.abs(g - g_ref).max()) <= 1e-5 * max(1.0, float(jnp.abs(g_ref).max())), name
    assert float(jnp.abs(grads_ref[0]).max()) > 0.1 and block_for(T) == min(T, 512)


def test_splash_falls_back_where_it_cannot_run():
    """Model init's 8 tokens, 200 tokens (no 128-token tiles) and a KV cache take the reference form; with
    dropout splash is refused rather than run without it."""
    for T in (8, 200):
        q = jax.random.normal(jax.random.key(T), (1, 2, T, 16))
        np.testing.assert_array_equal(attend(q, q, q, kernels=SPLASH), reference(q, q, q))
    q = jax.random.normal(jax.random.key(0), (1, 2, 1, 16))
    kv = jax.random.normal(jax.random.key(1), (1, 2, 128, 16))
    mask = jnp.ones((1, 1, 128), bool)
    np.testing.assert_array_equal(attend(q, kv, kv, mask, kernels=SPLASH), reference(q, kv, kv, mask))
    with pytest.raises(jaxlm.JaxlmError, match="splash has no dropout"):
        attend(kv, kv, kv, dropout=0.1, rng=jax.random.key(0), kernels=SPLASH)


def test_on_a_mesh_constraints_reach_the_program_and_sharded_splash_equals_the_reference():
    r = run_py("tests/sharded_kernels.py", env=cpu_devices(4))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["constraints"] >= 8 and out["logits_split_over_batch"], out
    assert out["splash_shard_map"] and not out["reference_shard_map"], out
    loss, ref_loss = out["loss"]
    assert abs(loss - ref_loss) <= 1e-5 and out["grad_max_diff"] <= 1e-5 * max(1.0, out["grad_max"]), out


def test_splash_prefill_generates_what_the_reference_does():
    """Generation's prefill with splash (left padding as segment ids) over a 128-slot prompt bucket, then
    decode steps in the reference form: the same greedy tokens as the reference prefill."""
    c = jaxlm.GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=97, block_size=256)
    params = jax.jit(jaxlm.init_params, static_argnums=0)(c, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 12, params)  # sharp logits: no near-ties for rounding to flip
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, n).tolist() for n in (100, 70, 128)]
    want = jaxlm.Generator(params, c, kernels=kernels.resolve("gpu", decode=True))(prompts, max_new_tokens=6)
    splash = jaxlm.Generator(params, c, kernels=kernels.resolve("tpu", decode=True))
    assert splash(prompts, max_new_tokens=6) == want and splash.stats.prompt_bucket == 128
    assert len({tuple(r) for r in want}) == 3
