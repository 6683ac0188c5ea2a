"""LoRA against the real `peft`: adapters written by peft load into jaxlm, jaxlm's load into peft, same logits."""

import functools
import json
import logging
import re
import shutil
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from helpers import run_py, save_random_hf

import jaxlm
from jaxlm import lora
from jaxlm.cli import run_cli
from jaxlm.generation.cli import main as sample_main
from jaxlm.io import convert

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50257)
TOKENS = np.random.default_rng(0).integers(0, 50257, (2, 12))


def _peft_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


@functools.cache
def _forward(config, lora_config, train):
    model = jaxlm.GPT(config, lora=lora_config)
    return jax.jit(lambda v, t, r: model.apply(v, t, train=train, rngs={"dropout": r}))  # one compile, not op by op


def _jax_logits(config, params, adapters=None, lora_config=None, train=False, rng=None):
    variables = {"params": params} if adapters is None else {"params": params, "lora": adapters}
    fn = _forward(config, lora_config, train)
    return np.asarray(fn(variables, jnp.asarray(TOKENS), jax.random.key(0) if rng is None else rng))


def _peft_adapter(base_dir, out, seed=0, kind=peft.LoraConfig, **options):
    """peft's own adapter: get_peft_model on the HF base, random non-zero B, save_pretrained."""
    torch.manual_seed(seed)
    base = transformers.GPT2LMHeadModel.from_pretrained(base_dir)
    model = peft.get_peft_model(base, kind(task_type="CAUSAL_LM", **options)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    save_random_hf(path, **SHAPE)
    config, params = jaxlm.load(path)
    return path, config, params


@pytest.fixture(scope="module")
def plain_adapter(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "a"
    _peft_adapter(base[0], out, r=4, lora_alpha=8, target_modules=["c_attn"])
    return out


PEFT_CASES = [
    dict(r=4, lora_alpha=8, target_modules=["c_attn"], use_rslora=False),
    dict(r=2, lora_alpha=16, target_modules=["c_proj"], use_rslora=True),
    dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True),
    dict(r=4, lora_alpha=4, target_modules=["c_fc", "attn.c_proj"], use_rslora=False),
]


@pytest.mark.parametrize("options", PEFT_CASES, ids=lambda o: f"{'+'.join(o['target_modules'])}-rs{o['use_rslora']}")
def test_peft_adapter_loads_with_peft_logits(base, tmp_path, options):
    path, config, _ = base
    model = _peft_adapter(path, tmp_path / "adapter", **options)
    _, merged = jaxlm.load(path, adapter=tmp_path / "adapter")
    assert np.abs(_jax_logits(config, merged) - _peft_logits(model)).max() <= 1e-4
    lora_config, adapters = jaxlm.load_adapter(tmp_path / "adapter", config)
    assert lora_config.rank == options["r"] and lora_config.rslora == options["use_rslora"]
    assert lora_config.targets == lora.normalize_targets(options["target_modules"])
    assert lora.count(adapters) == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


@pytest.fixture(scope="module")
def jaxlm_lora(base, tmp_path_factory):
    """A jaxlm checkpoint with random non-zero adapters, exported by the CLI as a PEFT adapter."""
    path, config, params = base
    lc = lora.LoraConfig(rank=4, alpha=8, targets="c_attn,c_proj,c_fc", rslora=True)
    adapters = lora.init(jax.random.key(1), config, lc)
    keys = iter(jax.random.split(jax.random.key(2), 8))
    adapters = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), adapters)
    root = tmp_path_factory.mktemp("jaxlm_lora")
    jaxlm.save(root / "ckpt", config, params, adapters=adapters, lora=lc, base_source=str(path))
    assert run_cli(convert.main, [str(root / "ckpt"), str(root / "peft"), "--to", "peft"]) == 0
    return root, lc, adapters


def test_jaxlm_adapter_loads_in_peft_without_warnings(base, jaxlm_lora, caplog):
    path, config, params = base
    root, lc, adapters = jaxlm_lora
    cfg = json.loads((root / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["fan_in_fan_out"] is True
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["base_model_name_or_path"]) == (4, 8, True, str(path))
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(path)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_base, root / "peft").eval()
    # transformers' own deprecation notices aside (they come with any model), nothing: no missing/unexpected keys
    messages = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning | FutureWarning)]
    messages += [r.getMessage() for r in caplog.records]
    assert not messages, messages
    ref = _peft_logits(model)
    assert np.abs(_jax_logits(config, params, adapters, lc) - ref).max() <= 1e-4
    _, merged = jaxlm.load(root / "ckpt")  # a checkpoint with adapters loads merged
    assert np.abs(_jax_logits(config, merged) - ref).max() <= 1e-4
    # and back: the exported adapter reads into the same arrays
    lc2, adapters2 = jaxlm.load_adapter(root / "peft", config)
    assert lc2 == lc
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), adapters, adapters2)


def test_step_zero_equals_base_exactly_and_only_adapters_train(base):
    _, config, params = base
    lc = lora.LoraConfig(rank=4, alpha=16, targets=("c_attn", "c_proj", "c_fc"))
    adapters = lora.init(jax.random.key(0), config, lc)
    a = adapters["h"]["attn"]["c_attn"]["lora_a"]
    bound = 1 / np.sqrt(config.n_embd)  # PEFT's kaiming_uniform_(a=sqrt(5)) on [r, in]
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert all(not np.any(m["lora_b"]) for block in adapters["h"].values() for m in block.values())
    np.testing.assert_array_equal(_jax_logits(config, params, adapters, lc), _jax_logits(config, params))

    class Batch(NamedTuple):
        tokens: jax.Array
        mask: jax.Array | None

    batch = Batch(jnp.asarray(TOKENS), None)
    loss_fn = jaxlm.lora_loss(config.replace(dropout=0.0), lc)  # the HF base has dropout 0.1
    loss, aux = jax.jit(loss_fn)(adapters, params, batch, jax.random.key(0))
    logits = _jax_logits(config, params)
    assert float(loss) == float(jaxlm.cross_entropy(logits[:, :-1], TOKENS[:, 1:])) and float(aux["tokens"]) == 22
    grads = jax.jit(jax.grad(lambda ad: loss_fn(ad, params, batch, jax.random.key(0))[0]))(adapters)
    g = grads["h"]["attn"]["c_attn"]
    assert not np.any(g["lora_a"]) and np.abs(g["lora_b"]).max() > 0  # B = 0: only B moves at step 0


@pytest.mark.parametrize("scan", [True, False])
def test_low_rank_forward_equals_merged_params(base, jaxlm_lora, scan):
    _, config, params = base
    _, lc, adapters = jaxlm_lora
    config = config.replace(scan_layers=scan, remat=not scan)
    merged = lora.merge(params, adapters, lc)
    assert np.abs(_jax_logits(config, params, adapters, lc) - _jax_logits(config, merged)).max() <= 1e-5


def test_lora_dropout_is_honoured_in_training_only(base, jaxlm_lora):
    _, config, params = base
    _, lc, adapters = jaxlm_lora
    lc = lc.replace(dropout=0.5)
    plain = _jax_logits(config, params, adapters, lc.replace(dropout=0.0))
    np.testing.assert_array_equal(_jax_logits(config, params, adapters, lc), plain)  # not training
    one, same, two = (_jax_logits(config, params, adapters, lc, train=True, rng=jax.random.key(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(one, same)
    assert np.abs(one - plain).max() > 1e-3 and np.abs(one - two).max() > 1e-3


def test_without_adapters_the_model_lowers_to_the_same_program(base):
    _, config, params = base
    lc = lora.LoraConfig(targets="c_attn,c_proj,c_fc")

    def text(model):
        fn = jax.jit(lambda p, t: model.apply({"params": p}, t))
        return re.sub(r"loc\(.*?\)", "", fn.lower(params, jnp.asarray(TOKENS)).as_text())

    assert text(jaxlm.GPT(config, lora=lc)) == text(jaxlm.GPT(config))


# Adapters sharded over a mesh: tests/test_sharding.py's LoRA case (a training run on fsdp=4,tensor=2).


def test_sample_and_convert_take_an_adapter(base, plain_adapter, tmp_path, capsys):
    path, _, _ = base
    argv = ["--start", "Hello", "--num-samples", "1", "--max-new-tokens", "6", "--temperature", "0"]
    assert run_cli(sample_main, ["--init-from", str(path), "--adapter", str(plain_adapter), *argv]) == 0
    with_adapter = capsys.readouterr().out
    assert (
        run_cli(convert.main, [str(path), str(tmp_path / "merged"), "--to", "hf", "--adapter", str(plain_adapter)]) == 0
    )
    capsys.readouterr()
    assert run_cli(sample_main, ["--init-from", str(tmp_path / "merged"), *argv]) == 0
    assert capsys.readouterr().out == with_adapter
    assert run_cli(sample_main, ["--init-from", str(path), *argv]) == 0
    assert capsys.readouterr().out != with_adapter  # the adapter changed the model


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank must be a positive integer"),
        (dict(rank=-2), "rank must be a positive integer"),
        (dict(rank=33), r"rank 33 exceeds min\(in, out\) = 32"),
        (dict(alpha=0), "alpha must be > 0"),
        (dict(targets="c_attn,q_proj"), "unknown LoRA target 'q_proj'"),
        (dict(dropout=1.0), "dropout must be in"),
    ],
)
def test_bad_lora_configs_are_one_line_errors(base, kwargs, match):
    with pytest.raises(jaxlm.JaxlmError, match=match) as e:
        lora.init(jax.random.key(0), base[1], lora.LoraConfig(**kwargs))
    assert "\n" not in str(e.value)


REFUSED = [
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="all"), "bias='all'"),
    (dict(layers_to_transform=[0]), "layers_to_transform"),
    (dict(rank_pattern={"c_fc": 2}, target_modules=["c_attn", "c_fc"]), "rank_pattern"),
    (dict(alpha_pattern={"c_fc": 2}, target_modules=["c_attn", "c_fc"]), "alpha_pattern"),
]


@pytest.mark.parametrize("options, match", REFUSED, ids=[m for _, m in REFUSED])
def test_peft_options_jaxlm_lacks_are_refused_by_name(base, tmp_path, capsys, options, match):
    path, config, _ = base
    _peft_adapter(path, tmp_path / "a", **{"r": 4, "target_modules": ["c_attn"], **options})
    with pytest.raises(jaxlm.JaxlmError, match=re.escape(match)):
        jaxlm.load_adapter(tmp_path / "a", config)
    capsys.readouterr()
    assert run_cli(sample_main, ["--init-from", str(path), "--adapter", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err


def test_other_adapters_and_broken_files_are_refused(base, plain_adapter, tmp_path, capsys):
    path, config, _ = base
    ia3 = tmp_path / "ia3"
    _peft_adapter(path, ia3, kind=peft.IA3Config, target_modules=["c_attn"], feedforward_modules=[])
    wide = tmp_path / "wide_base"
    save_random_hf(wide, **{**SHAPE, "n_embd": 64, "n_layer": 1})
    _peft_adapter(wide, tmp_path / "wide", r=4, target_modules=["c_attn"])
    llama = tmp_path / "llama"
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama_base")
    _peft_adapter_llama = peft.get_peft_model(
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama_base"),
        peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]),
    )
    _peft_adapter_llama.save_pretrained(llama)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(plain_adapter, corrupt)
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    bad_json = tmp_path / "bad_json"
    shutil.copytree(plain_adapter, bad_json)
    (bad_json / "adapter_config.json").write_text("{not json")
    cases = [
        (ia3, "peft_type 'IA3' is not supported"),
        (tmp_path / "wide", "the adapter is for another model shape"),
        (llama, "unexpected tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
        (corrupt, "the adapter file is corrupt"),
        (bad_json, "adapter_config.json is corrupt"),
        (tmp_path / "nowhere", "no such directory"),
    ]
    capsys.readouterr()
    for adapter, match in cases:
        with pytest.raises(jaxlm.JaxlmError, match=re.escape(match)):
            jaxlm.load(path, adapter=adapter)
        out = tmp_path / f"out_{adapter.name}"
        assert run_cli(convert.main, [str(path), str(out), "--to", "hf", "--adapter", str(adapter)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
        assert not out.exists()  # nothing written


def test_convert_to_peft_needs_adapters(base, jaxlm_lora, tmp_path, capsys):
    path, config, params = base
    jaxlm.save(tmp_path / "plain", config, params)
    assert run_cli(convert.main, [str(tmp_path / "plain"), str(tmp_path / "out"), "--to", "peft"]) == 2
    assert "holds no LoRA adapters" in capsys.readouterr().err and not (tmp_path / "out").exists()
    root = jaxlm_lora[0]
    assert run_cli(convert.main, [str(root / "ckpt"), str(root / "peft"), "--to", "peft"]) == 2
    assert "already exists" in capsys.readouterr().err
    r = run_py("-m", "jaxlm.convert", str(path), str(tmp_path / "x"), "--to", "peft")  # the real CLI: exit 2
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
