"""Sharded (tensor-parallel) generation on 8 simulated CPU devices gives the single-device tokens;
`sample.py --mesh` streams the same text, and a mesh that does not fit is one clear error line."""

import json
import re

import jax
import pytest
from helpers import FIXTURE, ROOT, cpu_devices, run_py

import jaxlm
from jaxlm.cli import run_cli
from jaxlm.generation.cli import SEPARATOR, build_parser, main
from jaxlm.io import load as loader
from jaxlm.tokenizer import CharTokenizer

EIGHT = cpu_devices(8)
# tests/sharded_sample.py's model: n_layer 2, n_head 8, n_embd 64 (MLP 256), vocab 100; batch 4, prompt bucket 16.
MESHES = {
    "tensor=2": {"c_fc": [2, 64, 128], "c_attn": [2, 64, 3, 32], "wte": [50, 64], "cache": [2, 4, 16, 4, 8]},
    "data=2,tensor=4": {"c_fc": [2, 64, 64], "c_attn": [2, 64, 3, 16], "wte": [25, 64], "cache": [2, 2, 16, 2, 8]},
    # vocab 100 does not split 8 ways: the embedding stays whole
    "tensor=8": {"c_fc": [2, 64, 32], "c_attn": [2, 64, 3, 8], "wte": [100, 64], "cache": [2, 4, 16, 1, 8]},
}
SAMPLED_ON = "data=2,tensor=4"  # its batch of 3 does not split over data=2: rows replicated, heads split


@pytest.fixture(scope="module")
def report():
    args = [m + (":sampled" if m == SAMPLED_ON else "") for m in MESHES]
    proc = run_py(str(ROOT / "tests" / "sharded_sample.py"), *args, env=EIGHT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Involuntary full rematerialization" not in proc.stderr  # the streamed tokens reach the host cheaply
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_greedy_tokens_equal_the_single_device_path_on_every_mesh(report):
    single, eos = report["single"]["greedy"], report["eos"]
    assert report["devices"] == 8
    # The batch exercises what matters: prompts of 5, 11, 1 and 3 tokens, the last ending at EOS;
    # rows stop at EOS at different steps while others run to max_new_tokens (20).
    assert single[3][0] != eos
    assert any(r[-1] == eos and len(r) < 20 for r in single) and any(len(r) == 20 for r in single)
    for mesh in MESHES:
        assert report[mesh]["devices"] == {"tensor=2": 2}.get(mesh, 8)
        assert report[mesh]["greedy"] == single, mesh
        assert report[mesh]["streamed"] == single, mesh  # on_tokens saw each row's tokens as returned


def test_sampled_tokens_with_the_same_seed_equal_the_single_device_path(report):
    single = report["single"]["sampled"]
    assert report[SAMPLED_ON]["sampled"] == single
    assert single != report["single"]["greedy"][:3]  # it really sampled


def test_params_and_cache_really_split(report):
    for mesh, want in MESHES.items():
        shards = report[mesh]["shards"]
        got = {
            "c_fc": shards["h/mlp/c_fc/kernel"],  # [layers, embed, mlp / tensor]
            "c_attn": shards["h/attn/c_attn/kernel"],  # [layers, embed, qkv, heads / tensor]
            "wte": shards["wte/embedding"],
            "cache": report[mesh]["cache_shard"],  # [layers, batch / data, slots, heads / tensor, head_dim]
        }
        assert got == want, mesh
    # Params already on the mesh are used as they are (no copy); others were placed by the Generator.
    assert [report[m]["kept"] for m in MESHES] == [False, True, True]
    assert all(report[m]["stats"]["compile_s"] > 0 and report[m]["stats"]["tokens_per_s"] > 0 for m in MESHES)


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    tok = CharTokenizer("\n !',.?abcdefghijklmnopqrstuvwxyz")
    config = jaxlm.GPTConfig(n_layer=1, n_head=4, n_embd=32, block_size=32, vocab_size=tok.vocab_size)
    params = jax.jit(jaxlm.init_params, static_argnums=0)(config, jax.random.key(0))
    return jaxlm.save(tmp_path_factory.mktemp("char") / "ckpt", config, params, tok)


SAMPLE_ARGS = ["--start", "to be", "--num-samples", "2", "--max-new-tokens", "12", "--seed", "5", "--top-k", "10"]


def test_sample_py_mesh_streams_the_single_device_text(capsys, char_ckpt):
    assert run_cli(main, ["--init-from", str(char_ckpt), *SAMPLE_ARGS]) == 0  # here: one device
    single = capsys.readouterr().out
    assert single.count(SEPARATOR) == 2
    r = run_py("sample.py", "--init-from", char_ckpt, "--mesh", "tensor=2", *SAMPLE_ARGS, env=EIGHT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == single
    assert "mesh data=1,fsdp=1,tensor=2 on 2 of 8 devices" in r.stderr
    assert re.search(r"\d+ tokens in [\d.]+ s", r.stderr.strip().splitlines()[-1])


def test_sample_py_mesh_that_does_not_fit_is_one_error_line(capsys, char_ckpt):
    r = run_py("sample.py", "--init-from", char_ckpt, "--mesh", "tensor=3", *SAMPLE_ARGS, env=EIGHT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "error: n_head=4 cannot be split over mesh axis tensor of size 3; "
        "choose a tensor size that divides the number of heads"
    ]
    # Checked before anything loads, so here on one device.
    for mesh, message in [
        ("tensor=1024", f"mesh 'tensor=1024' needs 1024 devices but only {jax.device_count()} are available"),
        ("tp=2", "bad mesh 'tp=2'"),
    ]:
        assert run_cli(main, ["--init-from", str(char_ckpt), "--mesh", mesh, *SAMPLE_ARGS]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err


def test_mesh_flag_in_help():
    help_text = " ".join(build_parser().format_help().split())
    assert "--mesh MESH" in help_text and "(default: None)" in help_text.split("--mesh MESH")[1]
    assert build_parser().parse_args(["--mesh", "data=2,tensor=4"]).mesh == "data=2,tensor=4"


def test_read_config_without_the_weights(char_ckpt):
    """What sample.py --mesh builds the shardings from before loading (a training run: see trainer tests)."""
    assert loader.read_config(char_ckpt) == jaxlm.load(char_ckpt)[0]
    assert loader.read_config(FIXTURE) == jaxlm.load(FIXTURE)[0]
    assert loader.read_config(FIXTURE, dtype="bfloat16").dtype == "bfloat16"
