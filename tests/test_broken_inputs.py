"""Broken files handed to the command lines: each one `error:` line naming the file and the fix, exit 2.

tests/test_files.py covers the library side (jaxlm.load); this covers what it does not: damage that used to
escape as a traceback (per-layer shapes, non-float tensors, mistyped config.json, Orbax array files)."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from faults import assert_user_error, flip_byte, largest_file, truncate
from helpers import run_py, save_random_hf
from safetensors.numpy import load_file, save_file

import jaxlm
from jaxlm.cli import run_cli
from jaxlm.generation import cli as sample
from jaxlm.io import convert

SMALL = dict(n_layer=2, n_head=2, n_embd=16, n_positions=16, vocab_size=50)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    save_random_hf(d / "hf", **SMALL)
    config, params = jaxlm.load(d / "hf")
    jaxlm.save(d / "ck", config, params)
    return d


def _tensors(d, edit):
    f = d / "model.safetensors"
    t = load_file(f)
    edit(t)
    save_file(t, f, metadata={"format": "pt"})


class _Evil:  # unpickling it would create the file named: proof that nothing is unpickled
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_only(d):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(str(d / "UNPICKLED"))))


def _config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))


def _header_len(f):
    return int.from_bytes(f.read_bytes()[:8], "little")


HF_DAMAGE = {
    "truncated": (lambda d: truncate(d / "model.safetensors", 0.5), ["model.safetensors", "corrupt"]),
    "flipped header length": (lambda d: flip_byte(d / "model.safetensors", 3), ["model.safetensors", "corrupt"]),
    "flipped header byte": (
        lambda d: flip_byte(d / "model.safetensors", 8 + _header_len(d / "model.safetensors") // 2),
        ["model.safetensors", "corrupt"],
    ),
    "one layer's shape": (
        lambda d: _tensors(d, lambda t: t.update({"transformer.h.1.ln_1.weight": np.zeros(8, np.float32)})),
        ["transformer.h.1.ln_1.weight", "shape (8,)", "expected (16,)", "config.json and the weights disagree"],
    ),
    "transposed kernel": (
        lambda d: _tensors(d, lambda t: t.update({"transformer.h.0.mlp.c_fc.weight": np.zeros((64, 16), np.float32)})),
        ["transformer.h.0.mlp.c_fc.weight", "expected (16, 64)"],
    ),
    "int tensor": (
        lambda d: _tensors(d, lambda t: t.update({"transformer.wte.weight": t["transformer.wte.weight"].astype(int)})),
        ["transformer.wte.weight", "dtype int64", "not floating point"],
    ),
    "NaN tensor": (
        lambda d: _tensors(d, lambda t: t["transformer.ln_f.bias"].__setitem__(0, np.nan)),
        ["transformer.ln_f.bias", "NaN"],
    ),
    "missing tensor": (
        lambda d: _tensors(d, lambda t: t.pop("transformer.h.1.mlp.c_proj.bias")),
        ["transformer.h.1.mlp.c_proj.bias is missing"],
    ),
    "pickle only": (_pickle_only, ["pytorch_model.bin", "never loads pickled", "convert it to safetensors"]),
    "config not JSON": (lambda d: (d / "config.json").write_text('{"n_layer": 2,'), ["config.json is corrupt"]),
    "config a list": (lambda d: (d / "config.json").write_text("[2, 2]"), ["config.json is corrupt", "list"]),
    "config int as text": (lambda d: _config(d, n_layer="2"), ["n_layer='2'", "fix config.json"]),
    "config float as text": (lambda d: _config(d, layer_norm_epsilon="1e-5"), ["layer_norm_epsilon", "config.json"]),
    "config null": (lambda d: _config(d, vocab_size=None), ["vocab_size=None", "fix config.json"]),
    "config bool dropout": (lambda d: _config(d, resid_pdrop=True), ["resid_pdrop=True"]),
}

RESTORE = ["cannot restore", "corrupt", "re-create"]
CKPT_DAMAGE = {
    "deleted array file": (lambda d: largest_file(d / "params").unlink(), RESTORE),
    "truncated array file": (lambda d: truncate(largest_file(d / "params")), RESTORE),
    "deleted manifest": (lambda d: (d / "params" / "manifest.ocdbt").unlink(), ["cannot restore", "corrupt"]),
    "truncated _METADATA": (lambda d: truncate(d / "params" / "_METADATA", 100), ["cannot restore", "corrupt"]),
    "jaxlm.json a list": (lambda d: (d / "jaxlm.json").write_text("[]"), ["jaxlm.json", "corrupt", "re-create"]),
    "jaxlm.json bad type": (
        lambda d: (d / "jaxlm.json").write_text(
            json.dumps({**json.loads((d / "jaxlm.json").read_text()), "config": {"n_layer": "two"}})
        ),
        ["jaxlm.json holds an invalid model config"],
    ),
}


def _damaged(clean, tmp_path, kind, damage):
    d = shutil.copytree(clean / kind, tmp_path / kind)
    damage(d)
    return d


@pytest.mark.parametrize("name", list(HF_DAMAGE) + list(CKPT_DAMAGE))
def test_broken_model_dir(clean, tmp_path, capfd, name):
    kind, (damage, needles) = ("hf", HF_DAMAGE[name]) if name in HF_DAMAGE else ("ck", CKPT_DAMAGE[name])
    d = _damaged(clean, tmp_path, kind, damage)
    rc = run_cli(convert.main, [str(d), str(tmp_path / "out")])
    line = assert_user_error(rc, capfd.readouterr().err, *needles)
    assert str(d) in line or f"{d}/" in line  # names the file (or its directory)
    assert not (tmp_path / "out").exists()
    rc = run_cli(sample.main, ["--init-from", str(d), "--max-new-tokens", "2"])
    assert_user_error(rc, capfd.readouterr().err, *needles)
    assert not (d / "UNPICKLED").exists()


def test_broken_dirs_through_real_commands(clean, tmp_path):
    """The same errors through the entry points a user runs, in fresh interpreters."""
    ck = _damaged(clean, tmp_path, "ck", CKPT_DAMAGE["truncated array file"][0])
    r = run_py("sample.py", "--init-from", str(ck), "--max-new-tokens", "2")
    assert_user_error(r.returncode, r.stderr, "cannot restore", str(ck))
    hf = _damaged(clean, tmp_path, "hf", HF_DAMAGE["pickle only"][0])
    r = run_py("-m", "jaxlm.convert", str(hf), str(tmp_path / "out"), "--to", "hf")
    assert_user_error(r.returncode, r.stderr, "never loads pickled", "convert it to safetensors")
    assert sorted(os.listdir(tmp_path)) == ["ck", "hf"]
