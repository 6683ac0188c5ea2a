"""The generator's executables: one per device its weights live on (two Generators on two devices never
share one, nor copy weights between devices), and at most MAX_EXECUTABLES, the least recently used going
first."""

import json

import jax
from helpers import TEST_XLA_FLAGS, run_py

import jaxlm
from jaxlm.generation import generator
from jaxlm.generation.generator import Generator

TWO_DEVICES = """
import json, jax, jaxlm
from jaxlm.generation.generator import EXECUTABLES, Generator
c = jaxlm.GPTConfig(vocab_size=97, block_size=64, n_layer=1, n_head=2, n_embd=32)
params = jax.jit(jaxlm.init_params, static_argnums=0)(c, jax.random.key(0))
d0, d1 = jax.devices()
with jax.default_device(d1):
    on1 = Generator(params, c)  # built on device 1, called outside that context: it still runs there
on0 = Generator(params, c)
out, compile_s = [], []
with jax.transfer_guard_device_to_device("disallow"):
    for gen in (on1, on0, on1):
        out.append(gen([[1, 2, 3], [4]], max_new_tokens=8, eos_id=None))
        compile_s.append(gen.stats.compile_s)
devices = sorted(
    sorted({d.id for s in jax.tree.leaves(e.input_shardings) for d in s.device_set}) for e in EXECUTABLES.values()
)
print("RESULT " + json.dumps({"same": out[0] == out[1] == out[2], "compile_s": compile_s, "devices": devices}))
"""


def test_generators_on_two_devices_compile_their_own():
    r = run_py("-c", TWO_DEVICES, env={"XLA_FLAGS": TEST_XLA_FLAGS, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert report["same"]
    first, other_device, again = report["compile_s"]
    assert first > 0 and other_device > 0 and again == 0.0
    # prefill and loop for each device, every input of each on that one device
    assert report["devices"] == [[0], [0], [1], [1]]


def test_the_cache_keeps_the_most_recently_used(monkeypatch):
    monkeypatch.setattr(generator, "MAX_EXECUTABLES", 3)
    c = jaxlm.GPTConfig(vocab_size=97, block_size=64, n_layer=1, n_head=2, n_embd=32)
    gen = Generator(jax.jit(jaxlm.init_params, static_argnums=0)(c, jax.random.key(0)), c)
    opts = dict(max_new_tokens=4, eos_id=None)
    gen([[1]], **opts)  # batch 1: its prefill and loop
    gen([[1]], **opts)
    assert gen.stats.compile_s == 0.0
    gen([[1], [2]], **opts)  # batch 2: two more; batch 1's prefill, the least recently used, goes
    assert len(generator.EXECUTABLES) == 3
    gen([[1]], **opts)
    assert gen.stats.compile_s > 0  # compiled again
    assert len(generator.EXECUTABLES) == 3
