"""Sharded training on 8 simulated CPU devices equals one device; checkpoints move between meshes."""

import json

import numpy as np
import pytest
from helpers import ROOT, cpu_devices, run_py

import jaxlm
from jaxlm.parallel import sharding

STEPS = 6  # tests/sharded_train.py's run length

# data parallelism is in the first (and in tests/test_multiprocess.py's data=4,fsdp=2), so no data=8 of its own
MESHES = ["fsdp=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2"]
PERMUTED = "permuted:data=2,fsdp=2,tensor=2"  # MESHES[1] over a shuffled device order
LORA_MESH = "lora:fsdp=4,tensor=2"  # a LoRA run (adapters sharded by the same rules table) on the richest mesh
EIGHT = cpu_devices(8)


def _result(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    script = str(ROOT / "tests" / "sharded_train.py")
    one = cpu_devices(1)
    single = _result(run_py(script, str(root / "one"), "single", "lora:single", env=one))
    many = _result(run_py(script, str(root / "eight"), *MESHES, LORA_MESH, PERMUTED, env=EIGHT, timeout=600))
    return single, many, root


def test_every_mesh_gives_the_single_device_losses(runs):
    single, many, _ = runs
    assert single["devices"] == 1 and many["devices"] == 8
    ref = np.array(single["single"]["losses"])
    assert len(ref) == STEPS
    for mesh in [*MESHES, "resumed"]:
        losses = np.array(many[mesh]["losses"])
        assert losses.shape == ref.shape, mesh
        np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=mesh)


def test_a_permuted_device_order_trains_the_same_losses(runs):
    """Batch rows go to the devices that hold them (make_array_from_callback), whatever the mesh's device
    order; --peak-flops is what MFU divides by."""
    _, many, _ = runs
    run = many[PERMUTED]
    assert run["order"] != sorted(run["order"])
    assert run["losses"] == many[MESHES[1]]["losses"]  # bit for bit: each mesh position holds the same rows
    flops = jaxlm.GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64).flops_per_token(32)
    for row in run["rows"]:
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * flops / (1e12 * 8), rel=1e-9)


def test_lora_on_a_mesh_gives_the_single_device_losses_and_shards_adapters(runs):
    single, many, _ = runs
    ref = np.array(single["lora:single"]["losses"])
    assert len(ref) == STEPS and ref[-1] < ref[0]  # the adapters learn
    np.testing.assert_allclose(many[LORA_MESH]["losses"], ref, rtol=1e-5)
    assert not np.allclose(ref, single["single"]["losses"])  # a different run from full training
    # n_embd 64 (MLP 256), 4 heads, rank 4: embed over fsdp=4, heads/MLP over tensor=2, the rank whole
    assert many[LORA_MESH]["shards"] == {
        "h/attn/c_attn/lora_a": [2, 16, 4],
        "h/attn/c_attn/lora_b": [2, 4, 3, 32],
        "h/attn/c_proj/lora_a": [2, 32, 4],
        "h/attn/c_proj/lora_b": [2, 4, 16],
        "h/mlp/c_fc/lora_a": [2, 16, 4],
        "h/mlp/c_fc/lora_b": [2, 4, 128],
        "h/mlp/c_proj/lora_a": [2, 128, 4],
        "h/mlp/c_proj/lora_b": [2, 4, 16],
    }
    opt = many[LORA_MESH]["opt_shards"]  # Adam's moments shard like their adapters
    shards = many[LORA_MESH]["shards"]
    assert opt and all(v == next(s for n, s in shards.items() if k.endswith(n)) for k, v in opt.items())


# Shard shapes on the first device; the model: n_layer 2, n_embd 64 (MLP 256), 4 heads, vocab 65, block 32.
EXPECTED = {
    "fsdp=8": {"h/mlp/c_fc/kernel": [2, 8, 256], "h/attn/c_attn/kernel": [2, 8, 3, 64], "wte/embedding": [65, 8]},
    "data=2,fsdp=2,tensor=2": {
        "h/mlp/c_fc/kernel": [2, 32, 128],
        "h/attn/c_attn/kernel": [2, 32, 3, 32],
        "h/mlp/c_proj/kernel": [2, 128, 32],
        "wte/embedding": [65, 32],  # 65 does not split over tensor=2: the vocab axis stays whole
    },
    "fsdp=4,tensor=2": {"h/mlp/c_fc/kernel": [2, 16, 128], "h/attn/c_attn/kernel": [2, 16, 3, 32]},
}


@pytest.mark.parametrize("mesh", MESHES)
def test_parameters_and_optimizer_state_really_split(runs, mesh):
    _, many, _ = runs
    shards = many[mesh]["shards"]
    for name, shape in EXPECTED[mesh].items():
        assert shards[name] == shape, (mesh, name)
    for name, shape in many[mesh]["opt_shards"].items():
        assert shape == EXPECTED[mesh]["h/mlp/c_fc/kernel"], (mesh, name)


def test_checkpoint_moves_between_meshes_and_onto_one_device(runs):
    _, many, root = runs
    saved = many[MESHES[0]]["out"]
    # Here, in the test process: one device.
    config, params = jaxlm.load(saved)
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x) for p, x in _leaves(params)}
    for mesh in MESHES[1:]:
        restored = np.load(root / "eight" / f"restored-{mesh.replace(',', '_').replace('=', '')}.npz")
        assert set(restored.files) == set(flat)
        for name in flat:
            np.testing.assert_array_equal(restored[name], flat[name], err_msg=f"{mesh} {name}")
        assert many[f"restored-{mesh}"]["h/mlp/c_fc/kernel"] == EXPECTED[mesh]["h/mlp/c_fc/kernel"]


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves_with_path(tree)


def test_mesh_errors_are_clear():
    with pytest.raises(jaxlm.JaxlmError, match="has 6 devices but 8 are available"):
        sharding.parse_mesh("data=2,fsdp=3", 8)
    with pytest.raises(jaxlm.JaxlmError, match="bad mesh"):
        sharding.parse_mesh("dp=8", 8)
    with pytest.raises(jaxlm.JaxlmError, match="at most one may be -1"):
        sharding.parse_mesh("data=-1,fsdp=-1", 8)
    assert sharding.parse_mesh("fsdp=2,data=-1", 8) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert sharding.parse_mesh(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_indivisible_dimension_names_the_parameter():
    r = run_py(
        "-c",
        "from jaxlm import GPTConfig\nfrom jaxlm.parallel import sharding\n"
        "c = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=36)\n"
        "sharding.param_shardings(c, sharding.make_mesh('fsdp=8'))",
        env=EIGHT,
    )
    assert r.returncode != 0
    assert "h/attn/c_attn/bias" in r.stderr or "shape" in r.stderr
    assert "36 is not divisible by 8" in r.stderr
