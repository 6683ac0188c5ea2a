"""Fuzzing train.py's command line: argument lists from its real flag names with random values and junk.

Every example either trains (a tiny model, --max-iters 0..2) or exits 2 with one `error:` line or argparse's
usage error, never a traceback. Most run in-process through `run_cli(main, argv)` (as train.py does); a few
as real subprocesses. Fixed seed, bounded: `python -m pytest tests/test_train_fuzz.py -q -s` prints the count.
"""

import contextlib
import os

import jax
import pytest
import trainfaults as tf
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import jaxlm.train as trainer
from jaxlm.cli import run_cli
from jaxlm.train.flags import train_arg_parser

FLAGS = sorted(o for a in train_arg_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help")
# Flags whose any value would leave the tiny, local, quick run (multi-process jobs wait for peers; a
# pretrained --init-from would load a model): fuzzed as junk only through validation that precedes them.
SLOW = {"--coordinator-address", "--num-processes", "--process-id", "--process_id", "--num_processes"}
SLOW |= {"--coordinator_address", "--init-from", "--init_from", "--n-layer", "--n_layer", "--n-embd", "--n_embd"}
SLOW |= {"--block-size", "--block_size", "--batch-size", "--batch_size", "--eval-iters", "--eval_iters"}
SLOW |= {"--gradient-accumulation-steps", "--gradient_accumulation_steps", "--max-iters", "--max_iters", "--mesh"}
SLOW |= {"--dataset", "--tokenizer", "--config", "--vocab-size", "--vocab_size", "--n-head", "--n_head"}
JUNK = st.sampled_from(["", "-1", "0", "nan", "inf", "1e400", "none", "true", "x", "--", "=", "\x00", "é", "2**9"])
VALUE = st.one_of(JUNK, st.integers(-3, 5).map(str), st.floats(-2, 2, allow_nan=False).map(repr), st.text(max_size=6))
EXAMPLES = {"n": 0, "ok": 0}


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory):
    jax.devices()  # JAX starts now; main()'s device layout cannot change it mid-module
    old = os.environ.get("JAXLM_CACHE")
    os.environ["JAXLM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    print(f"\ntrain.py fuzz: {EXAMPLES['n']} in-process examples, {EXAMPLES['ok']} trained, the rest exit 2")
    if old is None:
        del os.environ["JAXLM_CACHE"]
    else:
        os.environ["JAXLM_CACHE"] = old


def argv_strategy(out):
    fast = [f for f in FLAGS if f not in SLOW]
    pair = st.tuples(st.sampled_from(fast), VALUE).map(lambda p: [p[0], p[1]] if p[1] != "" else [p[0]])
    junk = st.lists(
        st.one_of(pair, JUNK.map(lambda j: [j]), st.sampled_from(FLAGS).map(lambda f: [f, "x"])), max_size=4
    )
    iters = st.sampled_from(["0", "1", "2"])
    return st.tuples(junk, iters).map(
        lambda t: [*tf.FLAGS, f"--out-dir={out}", "--eval-interval=1", "--max-iters", t[1], *sum(t[0], [])]
    )


def _one_line_or_works(rc, err):
    assert "Traceback" not in err, err
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        lines = [line for line in err.strip().splitlines() if line.startswith(("error:", "usage:", "train.py: error"))]
        assert lines and (err.startswith("error: ") and err.count("\n") == 1 or err.startswith("usage:")), err


@seed(15)
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_train_argv_fuzz_in_process(data, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("fuzz")
    argv = data.draw(argv_strategy(out))
    with contextlib.chdir(out):  # a drawn --out-dir (or dataset) is relative: keep it inside the test's dir
        try:
            rc = run_cli(trainer.main, argv)
        except SystemExit as e:  # argparse's usage error (status 2)
            rc = e.code
    err = capsys.readouterr().err
    EXAMPLES["n"] += 1
    EXAMPLES["ok"] += rc == 0
    _one_line_or_works(rc, err)


@pytest.mark.parametrize(
    "extra",
    [
        ["--n-head", "3"],
        ["--bogus-flag", "1"],
        ["--init-from", "\x01no-such-model"],
    ],
)
def test_train_argv_in_a_subprocess(tmp_path, extra):
    proc = tf.run(tmp_path / "out", "--max-iters=1", "--eval-interval=1", *extra)
    _one_line_or_works(proc.returncode, proc.stderr)
