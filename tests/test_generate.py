"""jaxlm.generate: KV cache vs recompute, greedy vs transformers, samplers, seeds, bad input."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import run_py, save_random_hf

import jaxlm
from jaxlm.generation import decode
from jaxlm.generation.generator import Generator, generate
from jaxlm.generation.sampling import Sampling, next_tokens, row_keys

EOT = 50256
# initializer_range 0.5: random weights whose greedy text does not collapse into one repeated token.
BIG = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257, initializer_range=0.5)
SMALL = dict(n_layer=3, n_head=2, n_embd=32, n_positions=64, vocab_size=97, initializer_range=0.5)
SMALL_EOS = 7  # with 97 tokens, greedy rows reach it within a few steps


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("big")
    model = save_random_hf(path, seed=0, **BIG)
    return model, *jaxlm.load(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("small")
    model = save_random_hf(path, seed=1, bos_token_id=SMALL_EOS, eos_token_id=SMALL_EOS, **SMALL)
    return model, *jaxlm.load(path)


def _hf_greedy(model, prompts, max_new, eos):
    """transformers' greedy generate on left-padded prompts, cut like jaxlm's output (at EOS)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), eos)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :], mask[b, P - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos
        )
    rows = out[:, P:].tolist()
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


def test_cache_logits_match_full_recompute_step_by_step():
    c = jaxlm.GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=300, block_size=64)
    params = jax.jit(jaxlm.init_params, static_argnums=0)(c, jax.random.key(1))
    rng = np.random.default_rng(0)
    lengths, steps, P, S = [5, 8, 1], 12, 8, 24
    seqs = rng.integers(0, c.vocab_size, (len(lengths), max(lengths) + steps)).astype(np.int32)
    # Full recompute of every prefix at once: causal attention makes position t see tokens <= t only.
    full_BxTxV = np.asarray(jax.jit(jaxlm.GPT(c).apply)({"params": params}, jnp.asarray(seqs)))

    dp = decode.prepare(params, c)
    tokens, positions, valid = np.zeros((3, P), np.int32), np.zeros((3, P), np.int32), np.zeros((3, P), bool)
    for b, n in enumerate(lengths):
        tokens[b, P - n :], positions[b, P - n :], valid[b, P - n :] = seqs[b, :n], np.arange(n), True
    logits_BxV, kv = jax.jit(decode.prefill, static_argnames="c")(dp, tokens, positions, valid, c=c)
    ref_BxV = full_BxTxV[np.arange(3), np.array(lengths) - 1]
    diffs = [np.abs(np.asarray(logits_BxV) - ref_BxV).max()]

    cache = [tuple(jnp.zeros((3, c.n_head, S, c.head_dim)).at[:, :, :P].set(x) for x in layer) for layer in kv]
    valid_BxS = np.concatenate([valid, np.ones((3, S - P), bool)], axis=1)
    step = jax.jit(decode.step, static_argnames="c")
    for t in range(steps):
        pos_B = np.array(lengths, np.int32) + t
        logits_BxV, cache = step(dp, seqs[np.arange(3), pos_B], pos_B, cache, P + t, valid_BxS, c=c)
        diffs.append(np.abs(np.asarray(logits_BxV) - full_BxTxV[np.arange(3), pos_B]).max())
    assert max(diffs) <= 1e-5, diffs
    assert np.abs(ref_BxV).max() > 1e-2  # the comparison is not between two near-zero arrays


@pytest.mark.parametrize("products", ["cpu_fused", "plain"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 2, 5, 40])
def test_decode_linear_equals_a_float32_matmul_whichever_form_it_takes(dtype, rows, products):
    # On a CPU _linear picks a fused multiply-reduce, a padded or a plain matmul by dtype and row count (speed);
    # elsewhere the plain matmul: every form must give x @ W.T + b with float32 products and sums.
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 96)), dtype)
    w, b = jnp.asarray(rng.standard_normal((80, 96)), dtype), jnp.asarray(rng.standard_normal(80), dtype)
    ref = np.asarray(x, np.float32) @ np.asarray(w, np.float32).T
    linear = partial(decode._linear, products=products)
    y = jax.jit(linear, static_argnames="out_dtype")(x, w, out_dtype=jnp.float32)
    assert y.shape == (rows, 80) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4)
    y_b = linear(x, w, b)
    assert y_b.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(y_b, np.float32), ref + np.asarray(b, np.float32), rtol=2e-2, atol=5e-2)
    if dtype == "bfloat16" and rows == 1:  # XLA:CPU's one-row bf16 matmul is slow: on a CPU it runs as two rows
        assert ("tensor<2x96xbf16>" in jax.jit(linear).lower(x, w).as_text()) == (products == "cpu_fused")


def test_greedy_matches_transformers_batch_of_lengths_and_eos_prompt(big):
    model, config, params = big
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, EOT, n).tolist() for n in (5, 11, 1)] + [[464, 2068, 7586, EOT]]
    ours = generate(params, config, prompts, max_new_tokens=20, temperature=0.0)
    theirs = _hf_greedy(model, prompts, 20, EOT)
    assert ours == theirs
    assert ours[3][0] != EOT and len(set(ours[3])) > 3  # the EOS prompt continued, and not degenerately
    # temperature 0 is greedy whatever the other options say
    assert generate(params, config, prompts, max_new_tokens=20, temperature=0, top_k=3, top_p=0.5, seed=9) == ours


def test_greedy_matches_transformers_rows_stop_at_eos(small):
    model, config, params = small
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 7, 2, 6)] + [[1, 2, SMALL_EOS]]
    ours = generate(params, config, prompts, max_new_tokens=30, temperature=0.0, eos_id=SMALL_EOS)
    assert ours == _hf_greedy(model, prompts, 30, SMALL_EOS)
    stopped = [r for r in ours if r[-1] == SMALL_EOS and len(r) < 30]
    assert stopped and any(len(r) == 30 for r in ours)  # some rows stopped early, others ran on
    assert all(SMALL_EOS not in r[:-1] for r in ours)
    # A row generates the same alone as in the batch (left padding and positions are right).
    assert generate(params, config, prompts[1:2], max_new_tokens=30, temperature=0.0, eos_id=SMALL_EOS) == ours[1:2]


def test_sampling_is_seeded_and_rows_draw_independently(small):
    _, config, params = small
    gen = Generator(params, config)
    prompts = [[1, 2, 3]] * 3
    opts = dict(max_new_tokens=24, do_sample=True, temperature=1.0, top_k=20, top_p=0.9, eos_id=None)
    a = gen(prompts, seed=1, **opts)
    assert a == gen(prompts, seed=1, **opts)
    assert a != gen(prompts, seed=2, **opts)
    assert a[0] != a[1] != a[2]  # same prompt, different rows: different draws
    assert gen.stats.compile_s == 0.0 and gen.stats.new_tokens == 72


CTRL_C = """
import os, signal, time, jax, jaxlm
c = jaxlm.GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32)
gen = jaxlm.Generator(jaxlm.init_params(c, jax.random.key(0)), c)
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job inherits SIG_IGN)
steps = []
def on_tokens(tokens_B, step, done_B):
    steps.append(step)
    if step == 2:
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would
    time.sleep(0.05)
try:
    gen([[1, 2]], max_new_tokens=60, temperature=0.0, eos_id=None, on_tokens=on_tokens)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted", steps[:3], len(steps) < 60)
print("still usable", len(gen([[1, 2]], max_new_tokens=5, temperature=0.0, eos_id=None)[0]))
"""


def test_ctrl_c_stops_a_streaming_loop_at_the_next_step():
    # In a fresh process with Python's own SIGINT handler, whatever the test runner's process inherited.
    proc = run_py("-c", CTRL_C, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["interrupted [0, 1, 2] True", "still usable 5"], proc.stdout


VOCAB = 64


def _allowed(logits_V, temperature, top_k, top_p):
    """The tokens HF's TopK then TopP warpers leave (by sorting in numpy)."""
    order = np.argsort(-logits_V, kind="stable")
    keep = order[: top_k or VOCAB]
    z = logits_V[keep] / temperature
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    before = np.cumsum(probs) - probs
    return set(keep[before < top_p].tolist())


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (None, 0.6), (12, 0.3)])
def test_top_k_top_p_never_draw_outside_the_allowed_set(top_k, top_p):
    temperature = 1.3
    s = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    greedy, k, use_top_p = s.statics(VOCAB)
    draw = jax.jit(
        lambda x, keys, i: next_tokens(x, keys, i, temperature, top_p, greedy=greedy, top_k=k, use_top_p=use_top_p)
    )
    rng = np.random.default_rng(0)
    keys = row_keys(0, 16)
    seen = set()
    for trial in range(8):
        logits_BxV = rng.normal(0, 3, (16, VOCAB)).astype(np.float32)
        for i in range(25):
            toks = np.asarray(draw(logits_BxV, keys, trial * 100 + i))
            for b in range(16):
                allowed = _allowed(logits_BxV[b], temperature, top_k, top_p)
                assert int(toks[b]) in allowed
                seen.add((trial, b, int(toks[b])))
    assert len(seen) > 8 * 16  # draws vary: the filters did not collapse to argmax


def test_temperature_zero_is_argmax():
    logits_BxV = np.random.default_rng(1).normal(size=(4, VOCAB)).astype(np.float32)
    toks = next_tokens(logits_BxV, row_keys(0, 4), 0, 1.0, 1.0, greedy=True, top_k=None, use_top_p=False)
    assert np.array_equal(np.asarray(toks), logits_BxV.argmax(-1))
    assert Sampling(temperature=0, top_k=5, top_p=0.5).statics(VOCAB) == (True, None, False)
    assert Sampling(top_k=1000).statics(VOCAB) == (False, None, False)  # a top_k beyond the vocab keeps all


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prompts=[[]]), "prompt 0 is empty; to generate without a prompt, start from <|endoftext|>"),
        (dict(prompts=[]), "no prompts"),
        (dict(prompts="hello"), "not text"),
        (dict(prompts=[1, 2, 3]), "not a flat list"),
        (dict(prompts=[[1, 97]]), r"outside \[0, 97\)"),
        (dict(prompts=[[1.5]]), "integer token ids"),
        (dict(prompts=[list(range(65))]), "longer than the model's block_size"),
        (
            dict(prompts=[[1] * 60], max_new_tokens=5),
            "exceeds the model's block_size .64.; lower max_new_tokens to at most 4",
        ),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(eos_id=97), r"eos_id must be a token id in \[0, 97\)"),
    ],
)
def test_bad_input_is_a_clear_error(small, kwargs, message):
    _, config, params = small
    args = dict(prompts=[[1, 2]], max_new_tokens=4) | kwargs
    with pytest.raises(jaxlm.JaxlmError, match=message):
        generate(params, config, args.pop("prompts"), **args)


def test_defaults_follow_transformers_greedy_unless_do_sample(small):
    """The brief's call, `generate(params, config, prompts, max_length=50, num_return_sequences=1)`, is greedy, as
    transformers' `generate` is for GPT-2 unless do_sample=True; sampling options alone warn and stay greedy."""
    _, config, params = small
    prompts = [[1, 2, 3]]
    greedy = generate(params, config, prompts, max_length=12, num_return_sequences=1, eos_id=None)
    assert greedy == generate(params, config, prompts, max_length=12, temperature=0.0, eos_id=None)
    with pytest.warns(UserWarning, match="pass do_sample=True to sample"):
        assert generate(params, config, prompts, max_length=12, temperature=0.8, seed=1, eos_id=None) == greedy
    sampled = [generate(params, config, prompts, max_length=12, do_sample=True, seed=s, eos_id=None) for s in (1, 2)]
    assert sampled[0] != greedy or sampled[1] != greedy
