"""The Flax GPT-2 itself: causality, layer-loop variants, dtypes, dropout, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm
from jaxlm.model import param_shapes

CONFIG = jaxlm.GPTConfig(vocab_size=97, block_size=32, n_layer=3, n_head=4, n_embd=32)


@pytest.fixture(scope="module")
def params():
    return jaxlm.init_params(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 24)))


def _apply(config, params, tokens, **kw):
    return jaxlm.GPT(config).apply({"params": params}, tokens, **kw)


def test_param_count_and_presets():
    assert jaxlm.GPTConfig.preset("gpt2").num_params() == 124_439_808
    assert jaxlm.GPTConfig.preset("gpt2-xl").num_params() == 1_557_611_200
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(CONFIG)))
    assert n == CONFIG.num_params()
    assert {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"} <= set(jaxlm.PRESETS)


def test_causality_through_gradients(params, tokens):
    # Row s of the position table feeds position s only (and not the tied head), so
    # d logits[t] / d wpe[s] is the dependence of output t on input s: zero for every s > t.
    t = 10

    def out_at_t(wpe):
        p = {**params, "wpe": {"embedding": wpe}}
        return _apply(CONFIG, p, tokens)[:, t].sum()

    grad_SxD = np.asarray(jax.grad(out_at_t)(params["wpe"]["embedding"]))
    assert np.abs(grad_SxD[t + 1 :]).max() == 0.0
    assert (np.abs(grad_SxD[: t + 1]).max(axis=1) > 0).all()


@pytest.mark.parametrize(
    "variant",
    [dict(scan_layers=False), dict(remat=True), dict(scan_layers=False, remat=True)],
    ids=["unrolled", "remat", "unrolled+remat"],
)
def test_layer_loop_variants_agree(params, tokens, variant):
    ref = _apply(CONFIG, params, tokens)
    out = _apply(CONFIG.replace(**variant), params, tokens)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)

    def loss(p, config):
        return jaxlm.cross_entropy(_apply(config, p, tokens)[:, :-1], tokens[:, 1:])

    g_ref = jax.grad(loss)(params, CONFIG)
    g = jax.grad(loss)(params, CONFIG.replace(**variant))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_jit_and_no_jit_agree(params, tokens):
    eager = _apply(CONFIG, params, tokens)
    jitted = jax.jit(lambda p, t: _apply(CONFIG, p, t))(params, tokens)
    np.testing.assert_allclose(jitted, eager, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_logits(params, tokens):
    ref = _apply(CONFIG, params, tokens)
    out = _apply(CONFIG.replace(dtype="bfloat16"), params, tokens)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out - ref)).max() < 0.1
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out16 = _apply(CONFIG.replace(dtype="bfloat16", param_dtype="bfloat16"), p16, tokens)
    assert out16.dtype == jnp.float32 and np.isfinite(np.asarray(out16)).all()


def test_dropout_only_in_training_mode(params, tokens):
    config = CONFIG.replace(dropout=0.2)
    eval_out = _apply(config, params, tokens)
    np.testing.assert_allclose(eval_out, _apply(CONFIG, params, tokens), atol=1e-6)
    a = _apply(config, params, tokens, train=True, rngs={"dropout": jax.random.key(1)})
    b = _apply(config, params, tokens, train=True, rngs={"dropout": jax.random.key(1)})
    c = _apply(config, params, tokens, train=True, rngs={"dropout": jax.random.key(2)})
    assert np.array_equal(a, b)
    assert np.abs(np.asarray(a - eval_out)).max() > 1e-3 and np.abs(np.asarray(a - c)).max() > 1e-3


def test_kv_cache_matches_full_forward(params, tokens):
    full = _apply(CONFIG, params, tokens)
    cache = jaxlm.init_cache(CONFIG, tokens.shape[0], CONFIG.block_size)
    prefix, cache = _apply(CONFIG, params, tokens[:, :9], cache=cache, cache_index=0, method=jaxlm.GPT.decode)
    decode = jax.jit(
        lambda p, tok, cache, t: _apply(CONFIG, p, tok, cache=cache, cache_index=t, method=jaxlm.GPT.decode)
    )
    steps = [prefix]
    for t in range(9, tokens.shape[1]):
        step, cache = decode(params, tokens[:, t : t + 1], cache, t)
        steps.append(step)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.array([[1, 2, 97]]), "token ids must be in"),
        (np.array([[1, -1, 2]]), "token ids must be in"),
        (np.zeros((1, 33), np.int32), "exceeds block_size 32"),
        (np.zeros((1, 4), np.float32), "must be integers"),
        (np.zeros((4,), np.int32), r"must be \[batch, time\]"),
    ],
)
def test_bad_tokens_are_clear_errors(params, bad, message):
    with pytest.raises(ValueError, match=message):
        _apply(CONFIG, params, jnp.asarray(bad))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(dtype="float8"), "dtype must be one of"),
        (dict(dropout=1.0), "dropout must be in"),
    ],
)
def test_bad_config_is_a_clear_error(fields, message):
    with pytest.raises(jaxlm.JaxlmError, match=message):
        CONFIG.replace(**fields)
    with pytest.raises(jaxlm.JaxlmError, match="unknown model preset"):
        jaxlm.GPTConfig.preset("gpt5")


@pytest.mark.parametrize("T", [256, 300, 517])
def test_blocked_causal_attention_matches_one_product(T):
    from jaxlm import kernels
    from jaxlm.cpu.attention import blocked_pays
    from jaxlm.model import attention

    assert blocked_pays(T, T)  # the path long causal sequences take in a CPU program
    q, k, v, g = (jax.random.normal(key, (2, 3, T, 16)) for key in jax.random.split(jax.random.key(T), 4))
    mask = jnp.tril(jnp.ones((T, T), bool))[None]  # an explicit mask keeps the one-product form

    def blocked(q, k, v):
        return attention.attend(q, k, v, kernels=kernels.resolve("cpu"))

    def one(q, k, v):
        return attention.attend(q, k, v, mask)

    y, vjp = jax.vjp(blocked, q, k, v)
    y_ref, vjp_ref = jax.vjp(one, q, k, v)
    assert np.abs(y - y_ref).max() <= 1e-5
    for a, b in zip(vjp(g), vjp_ref(g), strict=True):
        assert np.abs(a - b).max() <= 1e-4


def test_each_entry_point_returns_one_type(params, tokens):
    """__call__ gives logits only; hidden_states gives the final LayerNorm's output, which the tied head turns
    into those logits; decode gives (logits, cache) and the same logits."""
    logits = _apply(CONFIG, params, tokens)
    assert isinstance(logits, jax.Array) and logits.shape == (*tokens.shape, CONFIG.vocab_size)
    hidden = _apply(CONFIG, params, tokens, method=jaxlm.GPT.hidden_states)
    assert hidden.shape == (*tokens.shape, CONFIG.n_embd)
    np.testing.assert_allclose(hidden @ params["wte"]["embedding"].T, logits, atol=1e-5, rtol=1e-5)
    cache = jaxlm.init_cache(CONFIG, tokens.shape[0], tokens.shape[1])
    out = _apply(CONFIG, params, tokens, cache=cache, cache_index=0, method=jaxlm.GPT.decode)
    assert isinstance(out, tuple) and len(out) == 2 and set(out[1]) == {"k", "v"}
    np.testing.assert_allclose(out[0], logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError):
        _apply(CONFIG, params, tokens, cache=cache, cache_index=0)  # the cache goes through GPT.decode only
