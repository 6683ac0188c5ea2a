"""MFU's peak: the exact device kind JAX reports and the compute dtype pick it (an H100 PCIe is not the SXM
part; a float32 run is held to the TF32 peak, not the bfloat16 one); an unknown kind has none."""

import jax
import pytest

from jaxlm.errors import JaxlmError
from jaxlm.train import peak_flops_for, peak_flops_per_device


@pytest.mark.parametrize(
    "kind, bf16, f32",
    [
        ("NVIDIA H100 80GB HBM3", 989.5e12, 494.5e12),  # SXM5
        ("NVIDIA H100 PCIe", 756.5e12, 378e12),
        ("NVIDIA H100 NVL", 835.5e12, 417.5e12),
        ("NVIDIA H200", 989.5e12, 494.5e12),
        ("NVIDIA A100-SXM4-80GB", 312e12, 156e12),
        ("NVIDIA A100 80GB PCIe", 312e12, 156e12),
        ("NVIDIA L4", 121e12, 60e12),
        ("Tesla V100-SXM2-16GB", 15.7e12, 15.7e12),  # no bf16 tensor cores: both on the FP32 units
        ("Tesla T4", 8.1e12, 8.1e12),
        ("TPU v3", 61.5e12, 61.5e12),  # a JAX device is one of a v3 chip's two cores
        ("TPU v4", 275e12, 275e12),  # float32 runs as one bf16 pass at JAX's default precision
        ("TPU v5 lite", 197e12, 197e12),
        ("TPU v5", 459e12, 459e12),
        ("TPU v6 lite", 918e12, 918e12),
    ],
)
def test_peak_by_exact_kind_and_dtype(kind, bf16, f32):
    assert peak_flops_for(kind, "bfloat16") == bf16
    assert peak_flops_for(kind, "float32") == f32


def test_unknown_kinds_have_no_peak():
    for kind in ("NVIDIA H100", "NVIDIA H100 PCIe 2", "TPU v4 lite", "TPU v5e-ish", "cpu", ""):
        assert peak_flops_for(kind) is None
    assert peak_flops_per_device(jax.devices()[0], "float32") is None  # this machine's CPU: measured instead
    with pytest.raises(JaxlmError, match="float16 is not supported"):
        peak_flops_for("NVIDIA H100 PCIe", "float16")
