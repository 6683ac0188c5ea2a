"""docs/scaling.md is generated from the code and must stay in step with it."""

import pytest
from helpers import ROOT, run_py

import jaxlm
from jaxlm.parallel.memory import sharded_param_elements, training_memory


def test_scaling_doc_is_current():
    r = run_py(str(ROOT / "docs" / "make_scaling.py"), "--check")
    assert r.returncode == 0, r.stderr


def test_param_shards_follow_the_rules():
    config = jaxlm.GPTConfig.preset("gpt2")
    total = config.num_params()
    assert sharded_param_elements(config, {"data": 8, "fsdp": 1, "tensor": 1}) == total
    fsdp = sharded_param_elements(config, {"data": 1, "fsdp": 8, "tensor": 1})
    # Everything with an embed axis is split 8 ways; only LayerNorm and a few biases stay whole.
    assert total / 8 < fsdp < total / 8 * 1.01
    tp = sharded_param_elements(config, {"data": 1, "fsdp": 1, "tensor": 4})
    assert total / 4 < tp < total / 2


@pytest.mark.parametrize("name", ["gpt2", "gpt2-xl"])
def test_remat_and_sharding_reduce_memory(name):
    config = jaxlm.GPTConfig.preset(name)
    full = training_memory(config, {"data": 8}, 64, 1024)
    remat = training_memory(config, {"data": 8}, 64, 1024, remat=True)
    fsdp = training_memory(config, {"fsdp": 8}, 64, 1024)
    assert remat.activations < full.activations / 3
    assert fsdp.params < full.params / 7 and fsdp.activations == full.activations
    assert full.adam == 2 * full.params == 2 * full.grads
