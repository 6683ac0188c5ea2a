"""HF `generate`'s contract: beam search, penalties, n-grams, min_new_tokens, num_return_sequences,
max_length, warpers and validation, token for token against transformers (PyTorch, float32)."""

import jax
import numpy as np
import pytest
import torch
from helpers import run_py, save_random_hf
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import jaxlm
from jaxlm.generation.generator import Generator
from jaxlm.generation.sampling import Sampling, warped_logits

# Two shapes; initializer_range 0.5 keeps random greedy text from collapsing into one token; with a
# small vocabulary the EOS ids below end some beams within the 20 steps (the tests assert it).
SHAPES = {
    "a": (dict(n_layer=3, n_head=2, n_embd=32, n_positions=64, vocab_size=97, initializer_range=0.5), 11, 1),
    "b": (dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=211, initializer_range=0.5), 25, 4),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def shape(request, tmp_path_factory):
    cfg, eos, seed = SHAPES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model = save_random_hf(path, seed=seed, bos_token_id=eos, eos_token_id=eos, **cfg)
    config, params = jaxlm.load(path)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, cfg["vocab_size"], n).tolist() for n in (3, 7, 2, 6)]
    prompts = [[t for t in p if t != eos] or [1] for p in prompts]  # EOS inside a prompt: see processors.py
    return request.param, model, Generator(params, config), eos, prompts


def _hf(model, prompts, eos, **kw):
    """transformers' generate on left-padded prompts: (new tokens cut at EOS, sequences_scores or None)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), eos)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :], mask[b, P - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, eos_token_id=eos, pad_token_id=eos, return_dict_in_generate=True,
            output_scores=True, **kw,
        )  # fmt: skip
    rows = [r[: r.index(eos) + 1] if eos in r else r for r in out.sequences[:, P:].tolist()]
    return rows, getattr(out, "sequences_scores", None)


BEAMS = {
    "a": dict(num_beams=3, num_return_sequences=2, early_stopping=True),
    "b": dict(num_beams=4, num_return_sequences=3, early_stopping="never", length_penalty=2.0),
}


def test_beam_search_matches_transformers(shape):
    name, model, gen, eos, prompts = shape
    kw = BEAMS[name]
    theirs, their_scores = _hf(model, prompts, eos, do_sample=False, max_new_tokens=20, **kw)
    ours = gen(prompts, do_sample=False, max_new_tokens=20, eos_id=eos, **kw)
    assert ours == theirs
    assert np.abs(np.array(gen.scores) - their_scores.numpy()).max() <= 1e-4
    assert len(ours) == len(prompts) * kw["num_return_sequences"]
    ended = [r for r in ours if r[-1] == eos]
    assert ended and len(ended) < len(ours)  # EOS ended some hypotheses, others ran to max_new_tokens
    # Another prompt length in the same bucket (8) reuses the executables: no recompile.
    gen([p[:1] for p in prompts], do_sample=False, max_new_tokens=20, eos_id=eos, **kw)
    assert gen.stats.compile_s == 0.0 and gen.stats.prompt_bucket == 8


@pytest.mark.parametrize("shape", ["a"], indirect=True)
def test_early_stopping_false_default_beams(shape):
    name, model, gen, eos, prompts = shape
    theirs, scores = _hf(model, prompts, eos, do_sample=False, max_new_tokens=20, num_beams=4)
    ours = gen(prompts, do_sample=False, max_new_tokens=20, eos_id=eos, num_beams=4)
    assert ours == theirs and np.abs(np.array(gen.scores) - scores.numpy()).max() <= 1e-4


PENALTIES = dict(repetition_penalty=1.8, no_repeat_ngram_size=2, min_new_tokens=6)


@pytest.mark.parametrize("shape", ["a"], indirect=True)
@pytest.mark.parametrize("beams", [1, 3])
def test_penalties_change_output_exactly_as_transformers(shape, beams):
    name, model, gen, eos, prompts = shape
    plain, _ = _hf(model, prompts, eos, do_sample=False, max_new_tokens=20, num_beams=beams)
    theirs, scores = _hf(model, prompts, eos, do_sample=False, max_new_tokens=20, num_beams=beams, **PENALTIES)
    ours = gen(prompts, do_sample=False, max_new_tokens=20, eos_id=eos, num_beams=beams, **PENALTIES)
    assert ours == theirs and theirs != plain  # the options changed the output, and the same way
    if beams > 1:
        assert np.abs(np.array(gen.scores) - scores.numpy()).max() <= 1e-4
    assert all(eos not in r[:6] for r in ours)  # min_new_tokens
    for p, r in zip(prompts, ours, strict=True):  # no bigram twice, prompt included
        seq = p + r
        bigrams = list(zip(seq, seq[1:], strict=False))
        assert len(bigrams) == len(set(bigrams))


@pytest.mark.parametrize("shape", ["b"], indirect=True)
def test_max_length_counts_the_longest_prompt(shape):
    name, model, gen, eos, prompts = shape
    theirs, _ = _hf(model, prompts, eos, do_sample=False, max_length=12)
    ours = gen(prompts, temperature=0, max_length=12, eos_id=eos)
    assert ours == theirs and max(len(r) for r in ours) == 12 - max(len(p) for p in prompts)


@pytest.mark.parametrize("shape", ["b"], indirect=True)
def test_sampled_num_return_sequences_draw_apart(shape):
    name, _, gen, eos, prompts = shape
    out = gen(prompts[:2], do_sample=True, num_return_sequences=3, max_new_tokens=10, top_k=20, seed=3, eos_id=None)
    assert len(out) == 6 and len({tuple(r) for r in out[:3]}) > 1  # prompt-major, each its own draws


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, 1.0), (1.3, None, 0.6), (1.0, 12, 0.3)])
def test_warpers_give_transformers_distribution(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0, 3, (8, 64)).astype(np.float32)
    _, k, use_top_p = Sampling(temperature=temperature, top_k=top_k, top_p=top_p).statics(64)
    ours = np.asarray(warped_logits(logits, temperature, top_p, top_k=k, use_top_p=use_top_p))
    t = torch.tensor(logits)
    for w in [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []):
        t = w(None, t)
    if top_p < 1:
        t = TopPLogitsWarper(top_p)(None, t)
    theirs = torch.softmax(t, -1).numpy()
    probs = np.exp(ours - ours.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    assert np.array_equal(probs > 0, theirs > 0) and np.abs(probs - theirs).max() < 1e-6
    assert ((probs > 0).sum(-1) > 1).any()  # not argmax


@pytest.fixture(scope="module")
def tiny_gen():
    c = jaxlm.GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=97, block_size=64)
    return Generator(jax.jit(jaxlm.init_params, static_argnums=0)(c, jax.random.key(0)), c)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=0, num_return_sequences=2), "greedy decoding .* not num_return_sequences=2"),
        (dict(do_sample=False, num_return_sequences=2), "greedy decoding"),
        (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences \(3\) cannot exceed num_beams \(2\)"),
        (dict(num_beams=0), "num_beams must be an integer >= 1"),
        (dict(num_beams=2, do_sample=True), "beam sampling"),
        (dict(num_beams=2, on_tokens=print), "streaming"),
        (dict(repetition_penalty=-1.0), "repetition_penalty must be a number > 0"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a number > 0"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0"),
        (dict(no_repeat_ngram_size=65), r"bigger than the model's block_size \(64\)"),
        (dict(max_length=2), r"max_length \(2\) counts the prompt and leaves no new tokens"),
        (dict(max_length=65), r"max_length \(65\) exceeds the model's block_size"),
        (dict(min_new_tokens=-1), "min_new_tokens must be an integer >= 0"),
        (dict(early_stopping="always"), "early_stopping must be True, False or 'never'"),
        (dict(length_penalty=float("inf")), "length_penalty must be a finite number"),
        (dict(do_sample=True, temperature=0), "do_sample=True needs a temperature > 0"),
        (dict(do_sample="yes"), "do_sample must be True, False or None"),
        (dict(num_beams=49), "needs a vocabulary of at least 98 tokens"),
    ],
)
def test_bad_options_are_one_clear_error(tiny_gen, kwargs, message):
    with pytest.raises(jaxlm.JaxlmError, match=message):
        tiny_gen([[1, 2], [3]], **kwargs)


def test_hello_example_matches_transformers(tmp_path):
    """examples/hello.py on a random-init GPT-2-vocabulary checkpoint: the text transformers generates."""
    model = save_random_hf(tmp_path, seed=0, n_layer=2, n_head=2, n_embd=32, n_positions=64, initializer_range=0.5)
    r = run_py("examples/hello.py", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    tok = jaxlm.GPT2Tokenizer()
    ids = tok.encode("Hello, how are you?")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_length=50, num_return_sequences=1, do_sample=False)
    assert r.stdout == tok.decode(out[0].tolist()) + "\n"


def test_bfloat16_keeps_weights_and_kv_cache_in_bf16():
    c = jaxlm.GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=97, block_size=64)
    params = jax.jit(jaxlm.init_params, static_argnums=0)(c, jax.random.key(0))
    gen = Generator(params, c, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(gen.dparams)} == {jax.numpy.dtype("bfloat16")}
    out = gen([[1, 2, 3]], max_new_tokens=5, temperature=0, eos_id=None)
    assert len(out[0]) == 5
    from jaxlm.generation.generator import EXECUTABLES

    loop = next(e for k, e in EXECUTABLES.items() if k[0] == "sample_loop" and dict(k[3:])["path"].c == gen.config)
    assert "bf16[1,2,72,16]" in loop.as_text()  # the per-layer [B, H, S, K] cache
    with pytest.raises(jaxlm.JaxlmError, match="dtype float16 is not supported .*; use bfloat16"):
        Generator(params, c, dtype="float16")
