"""The accelerator presets rule (jaxlm.train.setup.for_platform): how gpt2-124m, finetune-gpt2 and --init-from gpt2
runs compute on each platform, resolved from the real command line without the devices (the platform, mesh and
device memory are passed in, as `setup` passes the mesh's).

On a CPU nothing changes (TrainConfig's defaults are the CPU's). On a GPU or TPU layers are scanned, and remat
is on only where parallel.memory's estimate without it exceeds half the device's memory.
"""

import pytest

from jaxlm.aot.cli import model_config
from jaxlm.config import TrainConfig
from jaxlm.train.flags import parse_train_flags
from jaxlm.train.setup import REMAT_ABOVE, for_platform

GiB = 2**30
RUNS = {
    "gpt2-124m": ["--config", "gpt2-124m", "--dataset", "shakespeare"],  # B=12 x 1024, bfloat16
    "finetune-gpt2": ["--config", "finetune-gpt2"],  # B=4 x 256, float32
    "init-from gpt2": "--init-from gpt2 --dataset shakespeare --block-size 1024 --dtype bfloat16".split(),
}
PLATFORMS = {  # (platform, mesh, bytes per device)
    "cpu": ("cpu", {"data": 1}, None),
    "H100 80 GiB": ("gpu", {"data": 1}, 80 * GiB),
    "16 GiB GPU": ("gpu", {"data": 1}, 16 * GiB),
    "v5e:2x2": ("tpu", {"data": 4}, 16 * GiB),
    "v5e:1x1": ("tpu", {"data": 1}, 16 * GiB),
}
# (scan_layers, remat) per run and platform. gpt2-124m needs ~16 GiB per device without remat on one device
# (5.4 GiB over 4 chips), finetune-gpt2 ~3 GiB, the 16-row init-from gpt2 run ~21 GiB on one device.
EXPECTED = {
    "gpt2-124m": {"cpu": (False, False), "H100 80 GiB": (True, False), "16 GiB GPU": (True, True),
                  "v5e:2x2": (True, False), "v5e:1x1": (True, True)},
    "finetune-gpt2": {"cpu": (False, False), "H100 80 GiB": (True, False), "16 GiB GPU": (True, False),
                      "v5e:2x2": (True, False), "v5e:1x1": (True, False)},
    "init-from gpt2": {"cpu": (False, False), "H100 80 GiB": (True, False), "16 GiB GPU": (True, True),
                       "v5e:2x2": (True, False), "v5e:1x1": (True, True)},
}  # fmt: skip


def resolve(argv, where):
    values, explicit = parse_train_flags(argv)
    cfg = TrainConfig(**values)
    config = model_config(cfg, explicit)  # the model --init-from names, from its config alone
    platform, mesh, device_bytes = PLATFORMS[where]
    chosen = for_platform(cfg, explicit, config, platform, mesh, device_bytes)
    resolved = cfg.replace(**chosen)
    return resolved.scan_layers, resolved.remat


@pytest.mark.parametrize("run", RUNS)
def test_resolved_config_per_preset_and_platform(run):
    got = {where: resolve(RUNS[run], where) for where in PLATFORMS}
    assert got == EXPECTED[run]


def test_flags_win_over_the_rule():
    argv = RUNS["gpt2-124m"]
    assert resolve([*argv, "--remat", "false"], "16 GiB GPU") == (True, False)
    assert resolve([*argv, "--scan-layers", "false"], "v5e:2x2") == (False, False)
    assert resolve([*argv, "--remat", "true"], "H100 80 GiB") == (True, True)


def test_a_library_callers_choice_stays():
    """TrainConfig built in code has no flags: a value unlike TrainConfig's default is the caller's choice."""
    cfg = TrainConfig.preset("gpt2-124m", dataset="shakespeare", remat=True)
    config = model_config(cfg, frozenset())
    assert for_platform(cfg, frozenset(), config, "gpu", {"data": 1}, 80 * GiB) == {"scan_layers": True}


def test_remat_threshold_and_unknown_memory():
    values, explicit = parse_train_flags(RUNS["gpt2-124m"])
    cfg = TrainConfig(**values)
    config = model_config(cfg, explicit)
    need = 16.18 * GiB  # parallel.memory's estimate for this run on one device, without remat
    just_over = int(need / REMAT_ABOVE) - GiB
    assert for_platform(cfg, explicit, config, "gpu", {"data": 1}, just_over)["remat"] is True
    assert "remat" not in for_platform(cfg, explicit, config, "gpu", {"data": 1}, just_over + 2 * GiB)
    assert "remat" not in for_platform(cfg, explicit, config, "tpu", {"data": 1}, None)  # unknown: no remat
