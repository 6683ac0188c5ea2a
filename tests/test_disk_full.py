"""A full disk, for real: a save or conversion that runs out of space says so in one line and leaves
nothing half-written (no output directory, or the previous checkpoint byte for byte as it was)."""

import jax
import numpy as np
import pytest
from faults import assert_user_error, run_limited, small_disk, snapshot

import jaxlm
from jaxlm.cli import run_cli
from jaxlm.io import convert

LIMIT = 4096  # bytes per file: config and metadata fit, the weights do not

SAVE_AGAIN = """
import sys, jax, jaxlm
from jaxlm.cli import run_cli
def main(argv):
    config, params = jaxlm.load(argv[0])
    jaxlm.save(argv[0], config, jax.tree.map(lambda x: x * 2, params), overwrite=True)
sys.exit(run_cli(main, sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    config = jaxlm.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50)
    params = jaxlm.init_params(config, jax.random.key(0))
    jaxlm.to_hf(config, params, d / "hf")  # checked against transformers in test_hf.py
    jaxlm.save(d / "ck", config, params)
    return d / "hf", d / "ck"


@pytest.mark.parametrize("to", ["orbax", "hf"])
def test_convert_onto_full_disk(models, to, capfd):
    src = models[0] if to == "orbax" else models[1]
    with small_disk(16 << 10) as disk:
        rc = run_cli(convert.main, [str(src), str(disk.path / "out"), "--to", to])
        assert_user_error(rc, capfd.readouterr().err, "no space left on device", str(disk.path / "out"))
        assert list(disk.path.iterdir()) == []


def test_save_onto_full_disk_keeps_previous(models, capfd):
    """The library raises one JaxlmError line (Orbax's own logs stay the user's to see); a command run through
    run_cli prints that line alone (the logs that only repeat it are dropped)."""
    config, params = jaxlm.load(models[1])
    with small_disk() as disk:
        ck = jaxlm.save(disk.path / "ck", config, params)
        before = snapshot(ck)
        disk.shrink(free=8 << 10)
        with pytest.raises(jaxlm.JaxlmError, match="no space left on device; free some space"):
            jaxlm.save(ck, config, jax.tree.map(lambda x: x * 2, params), overwrite=True)
        assert snapshot(ck) == before and [p.name for p in disk.path.iterdir()] == ["ck"]
        capfd.readouterr()
        rc = run_cli(lambda argv: jaxlm.save(ck, config, jax.tree.map(lambda x: x * 3, params), overwrite=True), [])
        assert_user_error(rc, capfd.readouterr().err, "no space left on device", str(ck))
        assert snapshot(ck) == before and [p.name for p in disk.path.iterdir()] == ["ck"]
        _, back = jaxlm.load(ck)
        np.testing.assert_array_equal(back["wte"]["embedding"], params["wte"]["embedding"])


@pytest.mark.parametrize("to", ["orbax", "hf"])
def test_convert_past_file_size_limit(models, tmp_path, to):
    src = models[0] if to == "orbax" else models[1]
    r = run_limited("-m", "jaxlm.convert", str(src), str(tmp_path / "out"), "--to", to, max_file_bytes=LIMIT)
    assert_user_error(r.returncode, r.stderr, "file too large", "free some space")
    assert list(tmp_path.iterdir()) == []


def test_save_past_file_size_limit_keeps_previous(models, tmp_path):
    import shutil

    ck = shutil.copytree(models[1], tmp_path / "ck")
    before = snapshot(ck)
    r = run_limited("-c", SAVE_AGAIN, str(ck), max_file_bytes=LIMIT)
    assert_user_error(r.returncode, r.stderr, "file too large", str(ck))
    assert snapshot(ck) == before and [p.name for p in tmp_path.iterdir()] == ["ck"]
