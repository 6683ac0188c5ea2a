"""Shared test utilities: random-init HF GPT-2 checkpoints written by transformers itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "fake_gpt2_random"
# XLA:CPU's quickest compiles for every program the tests compile (tests/conftest.py puts them in XLA_FLAGS): the
# programs are tiny, so compiling is their cost. LLVM's optimisation off, and the loop emitters for fusions in
# place of the newer fusion emitters: a tiny train.py run takes 8 CPU-seconds in place of 19.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def cpu_devices(n: int) -> dict:
    """The environment for a subprocess on `n` simulated CPU devices, with the tests' XLA flags."""
    return {"XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}


def save_random_hf(path, seed: int = 0, **config):
    """A random-init GPT2LMHeadModel saved with `save_pretrained` (safetensors); returns the model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**config)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    return model


def run_py(*args, env=None, timeout=300, cwd=None):
    """Run `python *args` in a subprocess; returns CompletedProcess with text output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or ROOT,
    )


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory):
    """One dataset + compilation cache for a test module (and its subprocesses): repeated shapes compile once.
    Import it into a module (`from helpers import shared_cache`) to use it there."""
    yield from cache_env(tmp_path_factory)


def cache_env(tmp_path_factory):
    """Point JAXLM_CACHE at a fresh directory until the generator resumes, then restore it (fixture body)."""
    old = os.environ.get("JAXLM_CACHE")
    os.environ["JAXLM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["JAXLM_CACHE"]
    else:
        os.environ["JAXLM_CACHE"] = old
