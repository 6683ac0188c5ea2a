"""Bad files and paths: each a clear JaxlmError, and nothing half-written."""

import json
import shutil

import jax
import numpy as np
import pytest
from helpers import FIXTURE, run_py, save_random_hf

import jaxlm

SMALL = dict(n_layer=2, n_head=2, n_embd=16, n_positions=16, vocab_size=50)


@pytest.fixture
def hf_dir(tmp_path):
    save_random_hf(tmp_path / "hf", **SMALL)
    return tmp_path / "hf"


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_source(tmp_path):
    with pytest.raises(jaxlm.JaxlmError, match="no such directory"):
        jaxlm.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(jaxlm.JaxlmError, match="neither a jaxlm checkpoint"):
        jaxlm.load(tmp_path / "empty")


def test_corrupt_config_json(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(jaxlm.JaxlmError, match="config.json is corrupt"):
        jaxlm.load(hf_dir)


def test_missing_weights_and_pickles_refused(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(jaxlm.JaxlmError, match="no model.safetensors"):
        jaxlm.load(hf_dir)
    (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(jaxlm.JaxlmError, match="never loads pickled weights"):
        jaxlm.load(hf_dir)


def test_truncated_safetensors(hf_dir):
    f = hf_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(jaxlm.JaxlmError, match="missing or corrupt"):
        jaxlm.load(hf_dir)


def test_config_and_weights_disagree(hf_dir):
    _edit_config(hf_dir, n_embd=32)
    with pytest.raises(jaxlm.JaxlmError, match=r"has shape \(50, 16\).*config.json and the weights disagree"):
        jaxlm.load(hf_dir)


def test_missing_and_unexpected_weights(hf_dir):
    _edit_config(hf_dir, n_layer=3)
    with pytest.raises(jaxlm.JaxlmError, match=r"transformer.h.2.ln_1.weight is missing"):
        jaxlm.load(hf_dir)
    _edit_config(hf_dir, n_layer=1)
    with pytest.raises(jaxlm.JaxlmError, match=r"unexpected weights \['h.1."):
        jaxlm.load(hf_dir)


def test_corrupt_jaxlm_checkpoint(tmp_path):
    config, params = jaxlm.load(FIXTURE)
    ckpt = jaxlm.save(tmp_path / "ckpt", config, params)
    with pytest.raises(jaxlm.JaxlmError, match="already exists"):
        jaxlm.save(ckpt, config, params)

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "jaxlm.json").write_text("{")
    with pytest.raises(jaxlm.JaxlmError, match="jaxlm.json is corrupt"):
        jaxlm.load(broken)

    shutil.rmtree(broken)
    shutil.copytree(ckpt, broken)
    shutil.rmtree(broken / "params")
    with pytest.raises(jaxlm.JaxlmError, match="checkpoint is incomplete"):
        jaxlm.load(broken)

    shutil.rmtree(broken)
    shutil.copytree(ckpt, broken)
    meta = json.loads((broken / "jaxlm.json").read_text())
    meta["config"]["n_embd"] = 4
    meta["config"]["n_head"] = 2
    (broken / "jaxlm.json").write_text(json.dumps(meta))
    with pytest.raises(jaxlm.JaxlmError, match="cannot restore"):
        jaxlm.load(broken)


def test_save_overwrite_replaces_atomically(tmp_path):
    config, params = jaxlm.load(FIXTURE)
    ckpt = jaxlm.save(tmp_path / "ckpt", config, params)
    doubled = jax.tree.map(lambda x: x * 2, params)
    jaxlm.save(ckpt, config, doubled, overwrite=True)
    _, back = jaxlm.load(ckpt)
    np.testing.assert_array_equal(back["wte"]["embedding"], doubled["wte"]["embedding"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_convert_cli_both_ways(tmp_path, hf_dir):
    r = run_py("-m", "jaxlm.convert", str(hf_dir), str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout and str(tmp_path / "ck") in r.stdout
    r = run_py("-m", "jaxlm.convert", str(tmp_path / "ck"), str(tmp_path / "hf2"), "--to", "hf")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "hf2").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("damage", ["truncate", "bad_option"])
def test_failed_conversion_leaves_no_output(tmp_path, hf_dir, damage):
    if damage == "truncate":
        f = hf_dir / "model.safetensors"
        f.write_bytes(f.read_bytes()[:500])
    else:
        _edit_config(hf_dir, scale_attn_by_inverse_layer_idx=True)
    for to in ("orbax", "hf"):
        r = run_py("-m", "jaxlm.convert", str(hf_dir), str(tmp_path / "out"), "--to", to)
        assert r.returncode == 2
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_convert_cli_usage_errors(tmp_path):
    r = run_py("-m", "jaxlm.convert", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert r.returncode == 2 and "no such directory" in r.stderr and "Traceback" not in r.stderr
    r = run_py("-m", "jaxlm.convert", str(FIXTURE), str(tmp_path / "o"), "--to", "onnx")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = run_py("-m", "jaxlm.convert", "--help")
    assert r.returncode == 0 and "--to" in r.stdout and "default: orbax" in r.stdout
