"""jaxlm against PyTorch transformers: logits, loss, and conversion both ways."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import FIXTURE, save_random_hf
from safetensors.numpy import load_file

import jaxlm

SHAPES = [
    dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257),
    dict(n_layer=3, n_head=2, n_embd=32, n_positions=64, vocab_size=1000),
    dict(n_layer=1, n_head=8, n_embd=64, n_positions=32, vocab_size=300, layer_norm_epsilon=1e-5),
    # 507 tokens: the CPU's causal attention by query blocks, the last block short
    dict(n_layer=2, n_head=2, n_embd=32, n_positions=512, vocab_size=300),
]


def _torch_logits_loss(model, tokens_BxT):
    with torch.no_grad():
        out = model(torch.tensor(tokens_BxT), labels=torch.tensor(tokens_BxT))
    return out.logits.numpy(), float(out.loss)


def _jax_logits_loss(config, params, tokens_BxT):
    logits = jaxlm.GPT(config).apply({"params": params}, jnp.asarray(tokens_BxT))
    loss = jaxlm.cross_entropy(logits[:, :-1], jnp.asarray(tokens_BxT[:, 1:]))
    return np.asarray(logits), float(loss)


@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: f"L{s['n_layer']}H{s['n_head']}D{s['n_embd']}V{s['vocab_size']}"
)
def test_logits_and_loss_match_transformers(tmp_path, shape):
    model = save_random_hf(tmp_path, **shape)
    config, params = jaxlm.load(tmp_path)
    assert config.n_layer == shape["n_layer"] and config.block_size == shape["n_positions"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, shape["vocab_size"], (3, shape["n_positions"] - 5))
    ref_logits, ref_loss = _torch_logits_loss(model, tokens)
    logits, loss = _jax_logits_loss(config, params, tokens)
    assert logits.dtype == np.float32
    assert np.abs(logits - ref_logits).max() <= 1e-4
    assert abs(loss - ref_loss) <= 1e-5


def test_fixture_checkpoint_matches_transformers():
    model = transformers.GPT2LMHeadModel.from_pretrained(FIXTURE).eval()
    config, params = jaxlm.load(FIXTURE)
    assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size) == (1, 1, 2, 50257)
    tokens = np.array([[15496, 11, 703, 389, 345, 30], [50256, 0, 1, 2, 3, 4]])
    ref_logits, ref_loss = _torch_logits_loss(model, tokens)
    logits, loss = _jax_logits_loss(config, params, tokens)
    assert np.abs(logits - ref_logits).max() <= 1e-4
    assert abs(loss - ref_loss) <= 1e-5


def test_reorder_and_upcast_attn_is_what_jaxlm_computes(tmp_path):
    shape = dict(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=100)
    model = save_random_hf(tmp_path, reorder_and_upcast_attn=True, **shape)
    config, params = jaxlm.load(tmp_path)
    tokens = np.random.default_rng(1).integers(0, 100, (2, 20))
    ref_logits, _ = _torch_logits_loss(model, tokens)
    logits, _ = _jax_logits_loss(config, params, tokens)
    assert np.abs(logits - ref_logits).max() <= 1e-4


def test_round_trip_is_bit_identical_and_loads_in_transformers(tmp_path):
    shape = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=500)
    model = save_random_hf(tmp_path / "hf", **shape)
    config, params = jaxlm.load(tmp_path / "hf")
    jaxlm.save(tmp_path / "ckpt", config, params)
    config2, params2 = jaxlm.load(tmp_path / "ckpt")
    assert config2 == config
    jaxlm.to_hf(config2, params2, tmp_path / "back")

    original = load_file(tmp_path / "hf" / "model.safetensors")
    exported = load_file(tmp_path / "back" / "model.safetensors")
    assert set(exported) == {k for k in original if k != "lm_head.weight"}
    for key, value in exported.items():
        assert value.dtype == original[key].dtype and value.shape == original[key].shape, key
        assert np.array_equal(value, original[key]), key

    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    tokens = np.random.default_rng(2).integers(0, 500, (2, 30))
    ref_logits, _ = _torch_logits_loss(model, tokens)
    back_logits, _ = _torch_logits_loss(back, tokens)
    assert np.array_equal(back_logits, ref_logits)


@pytest.mark.parametrize(
    "option",
    [
        {"scale_attn_by_inverse_layer_idx": True},
        {"add_cross_attention": True},
        {"scale_attn_weights": False},
        {"activation_function": "relu"},
        {"n_inner": 100},
        {"tie_word_embeddings": False},
    ],
    ids=lambda o: next(iter(o)),
)
def test_unimplemented_hf_options_are_rejected(tmp_path, option):
    save_random_hf(tmp_path, n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50)
    cfg_file = tmp_path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(option)
    cfg_file.write_text(json.dumps(cfg))
    key = next(iter(option))
    with pytest.raises(jaxlm.JaxlmError, match=key):
        jaxlm.load(tmp_path)


def test_hub_id_resolves_through_the_huggingface_cache(tmp_path, monkeypatch):
    # The real hub code path (snapshot_download), served from a local cache laid out as the hub's.
    snap = tmp_path / "hub" / "models--someone--tiny-gpt2" / "snapshots" / ("a" * 40)
    save_random_hf(snap, n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50)
    (tmp_path / "hub" / "models--someone--tiny-gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-gpt2" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    config, params = jaxlm.load("someone/tiny-gpt2")
    assert config.n_embd == 16 and params["wte"]["embedding"].shape == (50, 16)
    with pytest.raises(jaxlm.JaxlmError, match="could not download 'someone/absent'"):
        jaxlm.load("someone/absent")
