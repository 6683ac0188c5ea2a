"""jaxlm.kernels: the record each program runs by, chosen once from its platform, and what follows from it.

The selection for every platform x dtype x dropout x phase; explicit choices a platform cannot run are one-line
errors; no `jax.default_backend()` in the model, decode, eval or CPU code; the CPU record picks the CPU's own
paths; the accelerator record, forced on this CPU, decodes each row as it would alone; the host tunings are
decided before JAX starts, from the platform the command will use."""

import ast
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT

import jaxlm
import jaxlm.train
from jaxlm import kernels
from jaxlm.cli import run_cli
from jaxlm.config import TrainConfig
from jaxlm.cpu import native
from jaxlm.errors import JaxlmError
from jaxlm.eval.cli import main as eval_main
from jaxlm.generation import decode
from jaxlm.generation.cli import main as sample_main
from jaxlm.model.attention import attend
from jaxlm.parallel import sharding

# attention under "auto" for (platform, dtype, dropout): cuDNN where this process has it, else the reference form
AUTO = {
    ("cpu", "float32", 0.0): "cpu_blocked",
    ("cpu", "bfloat16", 0.0): "cpu_blocked",
    ("cpu", "float32", 0.1): "cpu_blocked",  # query blocks in eval; training with dropout takes one product
    ("cpu", "bfloat16", 0.1): "cpu_blocked",
    ("gpu", "float32", 0.0): "reference",  # cuDNN's fused attention takes no float32
    ("gpu", "bfloat16", 0.0): "cudnn",
    ("gpu", "float32", 0.1): "reference",
    ("gpu", "bfloat16", 0.1): "reference",  # no fused kernel has attention dropout
    ("tpu", "float32", 0.0): "splash",
    ("tpu", "bfloat16", 0.0): "splash",
    ("tpu", "float32", 0.1): "reference",
    ("tpu", "bfloat16", 0.1): "reference",
}
# what a phase runs, given the record's attention: decode always the reference form; prefill (left padding)
# the kernels that take padding (splash by segment ids, xla by a mask)
PHASE = {
    "train": lambda a: a,
    "eval": lambda a: a,
    "prefill": lambda a: a if a in ("splash", "xla") else "reference",
    "decode": lambda a: "reference",
}


@pytest.mark.parametrize("cudnn", [True, False])
def test_selection_for_every_platform_dtype_dropout_and_phase(cudnn, monkeypatch):
    # cuDNN cannot load here; whether it can is the one input this test sets by hand.
    monkeypatch.setattr(kernels, "cudnn_missing", lambda: None if cudnn else "no cuDNN")
    for (platform, dtype, dropout), want in AUTO.items():
        want = "reference" if want == "cudnn" and not cudnn else want
        k = kernels.resolve(platform, dtype=dtype, dropout=dropout, decode=True)
        assert k.platform == platform and k.attention == want, (platform, dtype, dropout, k)
        for phase, rule in PHASE.items():
            assert k.attention_for(phase) == rule(want), (platform, dtype, dropout, phase)
        cpu = platform == "cpu"
        assert k.eval_head == ("cpu_chunked" if cpu else "plain")
        assert k.eval_batch_tokens == (2048 if cpu else None)
        products = ("native" if native.unavailable(dtype) is None else "cpu_fused") if cpu else "plain"
        assert k.decode_products == products
        assert dict(k.why)["attention"] and k.describe().startswith(f"attention: {want} (")
    for name in ("reference", "xla"):  # explicit choices every platform runs
        for platform in kernels.PLATFORMS:
            assert kernels.resolve(platform, attention=name).attention == name
    assert kernels.resolve("tpu", attention="splash").attention == "splash"
    assert kernels.resolve("cpu", attention="splash").attention == "splash"  # interpreted: the tests' way
    assert kernels.resolve("cuda").platform == kernels.resolve("rocm").platform == "gpu"
    assert kernels.resolve("cpu").decode_products is None  # not chosen unless the program decodes


def test_the_record_is_read_from_where_a_program_runs():
    cpu = kernels.resolve(jax.devices()[0])
    assert kernels.resolve() == cpu == kernels.resolve(jax.devices()) == kernels.resolve(jnp.zeros(2))
    assert kernels.resolve(sharding.make_mesh()) == cpu and cpu.platform == "cpu"
    assert kernels.placed_on({"a": np.zeros(2), "b": jnp.zeros(2)}) is not None
    assert kernels.placed_on({"a": np.zeros(2)}) is None
    assert hash(cpu) == hash(kernels.resolve("cpu")) and cpu.to_dict()["why"]["attention"]
    with pytest.raises(JaxlmError, match="unknown platform 'metal'"):
        kernels.resolve("METAL")


@pytest.mark.parametrize(
    "where, kwargs, message",
    [
        ("cpu", dict(attention="cudnn"), "--attention cudnn runs on an NVIDIA GPU, not on cpu"),
        ("tpu", dict(attention="cudnn", dtype="bfloat16"), "runs on an NVIDIA GPU, not on tpu"),
        ("gpu", dict(attention="cudnn", dtype="float32"), "needs --dtype bfloat16"),
        ("gpu", dict(attention="cudnn", dtype="bfloat16"), "does not load here .cuDNN is not detected"),
        ("gpu", dict(attention="splash"), "splash is a TPU kernel"),
        ("tpu", dict(attention="splash", dropout=0.1), "--attention splash has no attention dropout"),
        ("cpu", dict(attention="xla", dropout=0.1), "--attention xla has no attention dropout"),
        ("cpu", dict(attention="flash"), "attention must be one of auto, reference, xla, cudnn, splash"),
        ("cpu", dict(dtype="float16"), "float16 is not supported"),
    ],
)
def test_a_choice_the_platform_cannot_run_is_one_line(where, kwargs, message):
    with pytest.raises(JaxlmError, match=message) as e:
        kernels.resolve(where, **kwargs)
    assert "\n" not in str(e.value)


def test_commands_refuse_an_impossible_attention_in_one_line(capsys, tmp_path):
    with pytest.raises(JaxlmError, match="--attention splash has no attention dropout"):
        TrainConfig(attention="splash", dropout=0.1)
    rc = run_cli(sample_main, ["--init-from", str(tmp_path), "--out-dir", str(tmp_path), "--attention", "cudnn"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "error: --attention cudnn runs on an NVIDIA GPU, not on cpu; use --attention auto"
    argv = [str(tmp_path / "nothing"), "--task", "wikitext2", "--attention", "cudnn", "--return-freed-memory"]
    rc = run_cli(eval_main, argv)  # before the (missing) model is looked for
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: --attention cudnn runs on an NVIDIA GPU")
    out = tmp_path / "run"  # training refuses it before anything is written
    with pytest.raises(JaxlmError, match="runs on an NVIDIA GPU"):
        jaxlm.train.train(TrainConfig(attention="cudnn", dtype="bfloat16", out_dir=str(out)), log=lambda *a: None)
    assert not out.exists()


def test_no_default_backend_in_model_decode_eval_or_cpu_code():
    """Kernels are chosen from where a program runs (the record), never by asking JAX's default backend in an op."""
    found = []
    for package in ("model", "generation", "eval", "cpu"):
        for path in sorted((ROOT / "jaxlm" / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
                if name == "default_backend" or (isinstance(node, ast.alias) and node.name == "default_backend"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
    tree = ast.parse("import jax\nx = jax.default_backend()")
    assert any(isinstance(n, ast.Attribute) and n.attr == "default_backend" for n in ast.walk(tree))


def test_cudnn_is_called_through_jax_for_whole_bf16_sequences_only():
    """Without CUDA, jax's cuDNN attention raises as it traces: that error shows the call reaches cuDNN; a KV
    cache (decode) and float32 take the reference form instead."""
    gpu = kernels.Kernels(platform="gpu", attention="cudnn")
    q = jnp.ones((1, 2, 128, 64), jnp.bfloat16)
    with pytest.raises(RuntimeError, match="cuDNN is not detected"):
        jax.eval_shape(lambda q: attend(q, q, q, kernels=gpu), q)
    mask = jnp.ones((1, 128, 128), bool)
    assert jax.eval_shape(lambda q: attend(q, q, q, mask, kernels=gpu), q).shape == q.shape
    assert jax.eval_shape(lambda q: attend(q, q, q, kernels=gpu), q.astype(jnp.float32)).shape == q.shape
    with pytest.raises(JaxlmError, match="attention cudnn has no dropout"):
        jax.eval_shape(lambda q: attend(q, q, q, dropout=0.1, rng=jax.random.key(0), kernels=gpu), q)


def test_xla_attention_equals_the_reference_with_and_without_padding():
    xla = kernels.resolve("cpu", attention="xla")
    q, k, v = (jax.random.normal(key, (2, 3, 40, 16)) for key in jax.random.split(jax.random.key(0), 3))
    valid = jnp.arange(40)[None] >= jnp.array([0, 11])[:, None]

    @jax.jit
    def both(q, k, v):
        return [(attend(q, k, v, kernels=xla, **x), attend(q, k, v, **x)) for x in ({}, {"valid_BxS": valid})]

    (whole, whole_ref), (padded, padded_ref) = both(q, k, v)
    np.testing.assert_allclose(whole, whole_ref, atol=2e-6)
    rows = np.asarray(valid)[:, None, :, None]  # padding rows are never read
    np.testing.assert_allclose(np.where(rows, padded, 0), np.where(rows, padded_ref, 0), atol=2e-6)


def _count_dots(lowered) -> int:
    return lowered.as_text().count("stablehlo.dot_general")


def test_accelerator_kernels_forced_on_the_cpu_decode_each_row_as_alone():
    """With the GPU/TPU record (plain products at the default precision: no CPU multiply-reduce), a row
    generates what it would alone at batch 1, 3 and 8."""
    c = jaxlm.GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=97, block_size=64)
    params = jax.jit(jaxlm.init_params, static_argnums=0)(c, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 12, params)  # sharp logits: greedy text that does not collapse
    gpu = kernels.resolve("gpu", decode=True)
    assert (gpu.attention, gpu.decode_products) == ("reference", "plain")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 8, 1, 5, 6, 4, 2, 7)]  # one prompt bucket
    gen = jaxlm.Generator(params, c, kernels=gpu)
    alone = [gen([p], max_new_tokens=12, eos_id=None)[0] for p in prompts]
    assert len({tuple(r) for r in alone}) > 4  # the rows differ: the comparison below is not of one text
    assert gen(prompts[:3], max_new_tokens=12, eos_id=None) == alone[:3]
    assert gen(prompts, max_new_tokens=12, eos_id=None) == alone

    # plain products are matmuls (dot_general) at 3 rows; the CPU record's float32 ones a multiply-reduce
    args = (gen.dparams, np.zeros(3, np.int32), np.zeros(3, np.int32))
    cache = [(jnp.zeros((3, 2, 8, 16)),) * 2] * c.n_layer
    step = jax.jit(decode.step, static_argnames=("c", "kernels"))
    cpu = kernels.resolve("cpu", decode=True)
    plain_dots = _count_dots(step.lower(*args, cache, 0, np.ones((3, 8), bool), c=c, kernels=gpu))
    cpu_dp = decode.prepare(params, c, cpu)
    if cpu.decode_products == "cpu_fused":
        cpu_dots = _count_dots(step.lower(cpu_dp, *args[1:], cache, 0, np.ones((3, 8), bool), c=c, kernels=cpu))
        assert plain_dots == cpu_dots + 4 * c.n_layer + 1  # every layer's 4 products and the head


def test_the_cpu_record_keeps_the_cpu_paths_and_the_scorer_follows_its_record():
    """CPU programs: query blocks, the chunked head, 2,048-token batches; an accelerator's record scores the
    same numbers in one piece with no token cap."""
    from jaxlm.eval.loglik import Request, Scorer

    cpu = kernels.resolve("cpu", decode=True)
    assert (cpu.attention, cpu.eval_head, cpu.eval_batch_tokens) == ("cpu_blocked", "cpu_chunked", 2048)
    c = jaxlm.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=97)
    params = jax.jit(jaxlm.init_params, static_argnums=0)(c, jax.random.key(1))
    here, tpu = Scorer(params, c), Scorer(params, c, kernels=kernels.resolve("tpu"))
    assert here.kernels == kernels.resolve("cpu") and (here.head_rows, here.batch_tokens) == (512, 2048)
    assert (tpu.head_rows, tpu.batch_tokens) == (None, None)
    rng = np.random.default_rng(0)
    reqs = [Request(tuple(rng.integers(0, 97, n + 1).tolist()), min(n, 40)) for n in (64, 50, 20)]
    for a, b in zip(here.score(reqs), tpu.score(reqs), strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)


def test_train_names_its_kernels_in_the_log_and_runtime_json(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    lines = []
    cfg = TrainConfig(
        out_dir=str(tmp_path / "run"), n_layer=1, n_head=2, n_embd=16, block_size=32, batch_size=4, max_iters=2,
        eval_interval=2, eval_iters=1, log_interval=1, tensorboard=False,
    )  # fmt: skip
    jaxlm.train.train(cfg, log=lines.append)
    assert "kernels: attention: cpu_blocked (cpu: query blocks from 256 tokens)" in lines
    runtime = json.loads((tmp_path / "run" / "runtime.json").read_text())
    assert runtime["platform"] == "cpu" and runtime["keep_freed_memory"] is True
    assert runtime["kernels"]["attention"] == "cpu_blocked" and runtime["kernels"]["why"]["attention"]


PROBE = """
import importlib, json, os, sys
from jax._src import xla_bridge
from jaxlm.kernels import expected_platform
from jaxlm.train.runtime import host_layout
values = dict(mesh=None, init_from="scratch", n_layer=4, n_embd=128, batch_size=16, vocab_size=65, dataset="x",
              out_dir="out")
found = {}
sys.modules["libtpu"] = None  # a host without libtpu (the test extra installs it): find_spec finds nothing
os.environ.pop("TPU_LIBRARY_PATH", None)  # which importing jax sets where libtpu is installed
for name, platforms in (("cpu", None), ("tpu", "tpu,cpu"), ("cuda", "cuda"), ("libtpu", None), ("plugin", None)):
    os.environ.pop("JAX_PLATFORMS", None)
    if platforms:
        os.environ["JAX_PLATFORMS"] = platforms
    if name == "libtpu":  # libtpu installed, as `pip install jaxlm[tpu]` does
        os.environ["TPU_LIBRARY_PATH"] = "libtpu.so"
    if name == "plugin":  # a jax_plugins namespace package, as an accelerator plugin installs
        os.environ.pop("TPU_LIBRARY_PATH")
        sys.path.insert(0, sys.argv[1])
        importlib.invalidate_caches()
    found[name] = [expected_platform(), host_layout(values)]
print(json.dumps([found, xla_bridge.backends_are_initialized()]))
"""


def test_host_tunings_follow_the_platform_the_command_will_use(tmp_path):
    """keep_freed_memory and CPU cores as devices are decided before JAX starts: on for the CPU, off when
    JAX_PLATFORMS names an accelerator or an accelerator plugin is installed (only JAX could tell then)."""
    (tmp_path / "jax_plugins" / "fake_accelerator").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "fake_accelerator" / "__init__.py").write_text("")
    drop = ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_PLATFORMS", "TPU_LIBRARY_PATH", "PJRT_NAMES_AND_LIBRARY_PATHS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    found, started = json.loads(r.stdout.strip().splitlines()[-1])
    assert not started  # decided without starting JAX
    for name, platform in (("cpu", "cpu"), ("tpu", "tpu"), ("cuda", "gpu"), ("libtpu", None), ("plugin", None)):
        expected, layout = found[name]
        cpu = platform == "cpu"
        assert expected == platform, name
        assert layout["keep_freed_memory"] is cpu and (layout["cpu_devices"] is not None) is cpu, (name, layout)


def test_every_phase_and_platform_is_covered():
    assert set(PHASE) == set(kernels.PHASES)
    combos = set(itertools.product(kernels.PLATFORMS, ("float32", "bfloat16"), (0.0, 0.1)))
    assert set(AUTO) == combos
    assert Path(kernels.__file__).parent == ROOT / "jaxlm"
