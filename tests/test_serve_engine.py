"""The serving engine's parts in-process: a decode step whose rows do not see each other, the per-row sampler
against transformers' warpers, and text out of tokens with stop strings held back."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import save_random_hf
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import jaxlm
from jaxlm.cpu import native
from jaxlm.generation import decode
from jaxlm.kernels import Kernels, placed_on, resolve
from jaxlm.serve import sampler
from jaxlm.serve.programs import for_serving
from jaxlm.serve.text import TextOut
from jaxlm.tokenizer import GPT2Tokenizer

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257, initializer_range=0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_random_hf(path, seed=0, **TINY)
    config, params = jaxlm.load(path)
    kernels = for_serving(resolve(placed_on(params), dtype=config.dtype, decode=True), config.dtype)  # as served
    return config, decode.prepare(params, config, kernels), kernels


def test_a_rows_logits_do_not_depend_on_the_other_rows_or_its_slot(tiny):
    """However far the other rows reach (so however many cache chunks the step attends over), whichever
    slot the row is in, and however many rows the step runs, its logits are the same bits."""
    config, dp, kernels = tiny
    N, S = 8, 128
    rng = np.random.default_rng(0)
    cache = [tuple(jnp.asarray(rng.standard_normal((N, 4, S, 16)), jnp.float32) for _ in "kv") for _ in range(2)]
    step = jax.jit(partial(decode.step_rows, c=config, chunk=32, kernels=kernels))
    tokens = jnp.asarray(rng.integers(0, 50257, N), jnp.int32)
    positions = np.array([40] + [3] * (N - 1), np.int32)
    alone = np.asarray(step(dp, tokens, jnp.asarray(positions), cache)[0])[0]
    for others in (10, 63, 64, 100, 127):
        positions[1:] = others
        assert np.array_equal(np.asarray(step(dp, tokens, jnp.asarray(positions), cache)[0])[0], alone)
    for slot in (3, 7):
        order = np.arange(N)
        order[[0, slot]] = order[[slot, 0]]
        moved = [(k[order], v[order]) for k, v in cache]
        where = np.full(N, 90, np.int32)
        where[slot] = 40
        logits = np.asarray(step(dp, tokens[order], jnp.asarray(where), moved)[0])
        assert np.array_equal(logits[slot], alone)
    # a step over fewer rows than the cache holds (the engine's row buckets), the row in any of them
    for R, slots in ((2, [5, 0]), (4, [2, 6, 0, 1]), (2, [0, 3])):
        r = slots.index(0)
        rows = jnp.asarray(slots, jnp.int32)
        pos = jnp.asarray([40 if s == 0 else 90 for s in slots], jnp.int32)
        logits = np.asarray(step(dp, tokens[rows], pos, cache, slots_B=rows)[0])
        assert logits.shape[0] == R and np.array_equal(logits[r], alone), slots
    # and the step is the model: the same token at the same place as decode.step's (one shared slot)
    valid = jnp.ones((N, S), bool)
    ref = decode.step(dp, tokens, jnp.full((N,), 40), cache, jnp.int32(40), valid, c=config, kernels=kernels)[0]
    got = step(dp, tokens, jnp.full((N,), 40, jnp.int32), cache)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-4)  # another summation order


def test_a_rows_bits_do_not_depend_on_the_row_count_at_gpt2_width():
    """At GPT-2's width XLA:CPU sums a layer norm's rows in another order from 8 rows on (and its matmul, the
    sampler's prefix sums at 64 rows): the step and the draw take them a row at a time."""
    config = jaxlm.GPTConfig(n_layer=1, n_head=12, n_embd=768, vocab_size=512, block_size=64)
    params = jaxlm.init_params(config, jax.random.key(0))
    kernels = for_serving(resolve(placed_on(params), dtype="float32", decode=True), "float32")
    dp = decode.prepare(params, config, kernels)
    rng = np.random.default_rng(1)
    N = 32
    cache = [tuple(jnp.asarray(rng.standard_normal((N, 12, 64, 64)), jnp.float32) for _ in "kv")]
    tokens, positions = rng.integers(0, 512, N).astype(np.int32), rng.integers(1, 60, N).astype(np.int32)
    step = jax.jit(partial(decode.step_rows, c=config, chunk=32, kernels=kernels))
    rows = {}
    for R in (2, 8, 32):
        slots = np.arange(R, dtype=np.int32)[::-1]  # slot 0 last
        logits = step(dp, jnp.asarray(tokens[slots]), jnp.asarray(positions[slots]), cache, slots_B=slots)[0]
        rows[R] = np.asarray(logits)[R - 1]
    assert all(np.array_equal(rows[R], rows[2]) for R in rows)
    x = jnp.asarray(rng.random((64, 393)), jnp.float32)  # GPT-2's vocabulary in blocks of 128
    sums = {R: np.asarray(jax.jit(sampler._cumsum)(x[:R]))[0] for R in (1, 2, 64)}
    assert all(np.array_equal(sums[R], sums[2]) for R in sums)
    np.testing.assert_allclose(sums[2], np.cumsum(np.asarray(x[0])), rtol=1e-5)


def test_serving_keeps_only_products_whose_rows_do_not_depend_on_the_batch():
    """jaxlm's native CPU kernel serves where it runs every row count (AVX2's: a step's rows and a prompt's);
    where it hands many rows to XLA's matmul (AVX-512's), and for the CPU's fused multiply-reduce (its bits
    change with the rows), the platform's matmul."""
    rec = Kernels("cpu", decode_products="native")
    avx2_only = native.probe() == (1, None)
    assert (for_serving(rec, "float32") is rec) == avx2_only
    assert native.max_rows("float32") == (None if avx2_only else 64 if native.usable("float32") else 0)
    assert for_serving(rec, "bfloat16").decode_products == "plain"  # AVX-512 BF16's kernel: at most 64 rows
    fused = for_serving(Kernels("cpu", decode_products="cpu_fused"), "float32")
    assert fused.decode_products == "plain" and "serving" in fused.describe("decode_products")
    assert for_serving(Kernels("tpu", decode_products="plain"), "bfloat16").decode_products == "plain"


@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
def test_thresholds_keep_what_transformers_warpers_keep(scale):
    """HF's top-k (ties at the k-th kept) then top-p, among the candidates or past them (scale 0.3 is flat
    enough that top-p reaches past the 128 candidates and top-k 900 does too)."""
    rng = np.random.default_rng(int(scale * 10))
    V = 2000
    x = (rng.standard_normal((6, V)) * scale).astype(np.float32)
    top_k = np.array([0, 5, 300, 0, 50, 900], np.int32)
    top_p = np.array([0.9, 1.0, 0.95, 0.3, 0.5, 0.99], np.float32)
    t = sampler.thresholds(jnp.asarray(x), jnp.asarray(top_k), jnp.asarray(top_p), jnp.ones(6, bool))
    keep = np.asarray(sampler._ordered(jnp.asarray(x)) >= t[:, None])
    for r in range(6):
        s = torch.tensor(x[r : r + 1])
        if top_k[r]:
            s = TopKLogitsWarper(int(top_k[r]))(None, s)
        if top_p[r] < 1:
            s = TopPLogitsWarper(float(top_p[r]))(None, s)
        assert (keep[r] == np.isfinite(s.numpy()[0])).all(), r


def test_inverse_cdf_draws_from_the_distribution_and_only_kept_tokens():
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.0, 0.0], np.float32)
    R = 40000
    z = jnp.asarray(np.repeat(np.log(p + 1e-30)[None], R, 0))
    keep = jnp.asarray(np.repeat((np.arange(6) != 3)[None], R, 0))  # the 0.4 token filtered out
    u = jnp.asarray(np.random.default_rng(0).random(R), jnp.float32)
    idx = np.asarray(jax.jit(sampler.inverse_cdf)(z, keep, u))
    freq = np.bincount(idx, minlength=6) / R
    np.testing.assert_allclose(freq, [1 / 6, 2 / 6, 3 / 6, 0, 0, 0], atol=0.01)


def test_penalties_are_openais():
    logits = jnp.asarray([[1.0, -1.0, 2.0, 0.5]])
    counts = jnp.asarray([[0, 2, 1, 0]])
    out = np.asarray(sampler.penalised(logits, counts, jnp.asarray([0.5]), jnp.asarray([0.25])))
    np.testing.assert_allclose(out, [[1.0, -1.0 - 0.5 - 0.5, 2.0 - 0.25 - 0.5, 0.5]])


def test_a_draw_depends_on_seed_choice_and_position_only():
    u = sampler.row_uniforms
    seeds = jnp.asarray([[0, 7], [0, 7], [0, 7], [0, 8]], jnp.uint32)
    got = np.asarray(u(seeds, jnp.asarray([0, 1, 0, 0]), jnp.asarray([5, 5, 6, 5])))
    assert len(set(got.tolist())) == 4
    again = np.asarray(u(seeds[:1], jnp.asarray([0]), jnp.asarray([5])))
    assert again[0] == got[0]


def _pieces(tok, text):
    """(ids, the text each id adds) of `text`."""
    ids = tok.encode(text)
    return ids, [tok.decode_bytes([i]) for i in ids]


@pytest.mark.parametrize("stops", [["lazy d"], ["own fox"], ["x", "n f"], ["quick brown fox jumps over the lazy dog."]])
def test_text_out_cuts_before_the_first_stop_and_never_shows_what_it_cuts(stops):
    tok = GPT2Tokenizer()
    text = "The quick brown fox jumps over the lazy dog. Again."
    ids, _ = _pieces(tok, text)
    out = TextOut(tok, stops)
    shown = ""
    for i in ids:
        shown += out.add(i)
        assert not any(s in shown for s in stops)
        if out.stopped:
            break
    shown += out.finish()
    first = min(text.find(s) for s in stops if s in text)
    assert shown == text[:first] and out.stopped


def test_text_out_releases_held_text_and_keeps_characters_whole():
    tok = GPT2Tokenizer()
    text = "Caf\u00e9 \U0001f600 and the lazy do"  # the emoji's bytes span tokens; "lazy d" starts a stop
    ids, pieces = _pieces(tok, text)
    assert any(b and not _decodes(b) for b in pieces)  # some token ends inside a character
    out = TextOut(tok, ["lazy dog"])
    shown = [out.add(i) for i in ids]
    assert all("\ufffd" not in s for s in shown)
    assert "".join(shown) == "Caf\u00e9 \U0001f600 and the "  # "lazy do" held back: it may become the stop
    assert out.finish() == "lazy do" and not out.stopped


def _decodes(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
