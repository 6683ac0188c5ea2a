"""GPT-2 124M's train (full and LoRA r=8), eval, prefill and decode steps exported for CUDA from this CPU.

`jax.export` lowers for a platform the host lacks, so a GPU program is checked here the way a TPU program is
compiled in tests/test_aot.py: built by the same `jaxlm.aot.programs` builders, with the kernels a GPU picks
(`jaxlm.kernels.resolve("gpu", ...)`). cuDNN's fused attention cannot lower without cuDNN in the process
("cuDNN is not detected."), so the record picks the reference form here, as it does on a GPU without cuDNN; the
rest is the GPU program. Nothing in it may call a CPU-only kernel.
"""

import re

import jax
import pytest

from jaxlm.aot.programs import generation_programs, train_programs
from jaxlm.config import TrainConfig
from jaxlm.cpu.native import TARGETS
from jaxlm.errors import JaxlmError
from jaxlm.kernels import resolve
from jaxlm.lora import LoraConfig
from jaxlm.parallel.sharding import make_mesh

CPU_ONLY = set(TARGETS)
_CALLS = re.compile(r'(?:stablehlo\.custom_call @|call_target_name = ")([\w.]+)')


@pytest.fixture(scope="module")
def exported():
    cfg = TrainConfig.preset("gpt2-124m", dataset="shakespeare", scan_layers=True)
    config = cfg.model_config(50257)
    device = jax.devices()[0]
    mesh = make_mesh("data=1", devices=[device])
    train_k = resolve("gpu", dtype=config.dtype, dropout=config.dropout)
    programs = train_programs(cfg, config, mesh, kernels=train_k)
    programs += train_programs(cfg, config, mesh, LoraConfig(rank=8).check(config), kernels=train_k)[:1]
    programs += generation_programs(config, device, 3, 512, 1024, kernels=resolve("gpu", dtype="bfloat16", decode=True))
    out = {}
    for p in programs:
        with p.tracing():
            out[p.name] = jax.export.export(p.jitted, platforms=["cuda"])(*p.args)
    return train_k, out


def test_the_gpu_record_without_cudnn():
    k = resolve("gpu", dtype="bfloat16")
    assert k.attention == "reference" and "cuDNN" in dict(k.why)["attention"]  # not the CPU's query blocks
    assert resolve("gpu", dtype="bfloat16", decode=True).decode_products == "plain"
    with pytest.raises(JaxlmError, match="does not load here"):
        resolve("gpu", dtype="bfloat16", attention="cudnn")


def test_every_step_exports_for_cuda_with_no_cpu_kernel(exported):
    _, programs = exported
    assert set(programs) == {"train", "eval", "lora train", "prefill", "decode"}
    for name, exp in programs.items():
        assert exp.platforms == ("cuda",), name
        text = exp.mlir_module()
        calls = set(_CALLS.findall(text))
        assert not calls & CPU_ONLY and not any(c.startswith("jaxlm") for c in calls), (name, calls)
        assert "dot_general" in text, name  # the model is in there: its products lowered for the GPU
