"""Property-based fuzzing of every command line and of the model's inputs: each run works or fails
as a user error (exit 2, one `error:` line; a ValueError naming the problem) -- never a traceback,
a hang or a silent NaN. Flags come from the real argparse parsers, so a new flag is fuzzed too."""

from __future__ import annotations

import contextlib
import io
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, run_py
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxlm
from jaxlm.cli import run_cli
from jaxlm.data import cli as data_cli
from jaxlm.generation import cli as sample
from jaxlm.io import convert

FUZZ = settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TINY = jaxlm.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=40)
JUNK = st.sampled_from(["", "-", "--", "-1", "0", "1e309", "nan", "inf", "\x00", "é", "--=", "=x", " ", "a b"])


@contextlib.contextmanager
def time_limit(seconds: float):
    """A hang fails the example (SIGALRM raises in the main thread) instead of stalling the suite."""

    def boom(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def call_cli(main, argv, seconds: float = 60) -> tuple[int, str]:
    """`run_cli(main, argv)` in-process: (exit code, stderr); argparse's SystemExit is its exit code."""
    err = io.StringIO()
    with time_limit(seconds), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = run_cli(main, argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
    return rc, err.getvalue()


def assert_works_or_user_error(rc: int, stderr: str):
    assert "Traceback" not in stderr, stderr
    assert rc in (0, 2), f"exit {rc}: {stderr}"
    if rc == 2:  # argparse: "usage: ..." lines, then "prog: error: ..."; ours: "error: ..."
        errors = [line for line in stderr.splitlines() if line.startswith("error: ") or ": error: " in line]
        assert len(errors) == 1 and errors[0].strip() == stderr.strip().splitlines()[-1].strip(), stderr


def flags_of(parser) -> list:
    """(option string, action) for every optional flag of `parser` and its subparsers."""
    out = []
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            out += [(s, action) for s in action.option_strings]
        if isinstance(action.choices, dict):  # subcommands
            for sub in action.choices.values():
                out += flags_of(sub)
    return out


def values_for(action, paths):
    typed = {int: st.integers(-(2**40), 2**40) | st.integers(-3, 20), float: st.floats(allow_nan=True)}
    options = [JUNK, st.sampled_from(paths), st.text(max_size=8).filter(lambda s: not s.startswith(("/", "~")))]
    if action.choices:
        options.insert(0, st.sampled_from(list(action.choices)))
    if action.type in typed:
        options.insert(0, typed[action.type].map(str))
    return st.one_of(options)


def argv_strategy(parser, positionals, paths):
    """Random lists of the parser's real flags with typed, path or junk values, plus positionals."""
    flags = flags_of(parser)
    flag_value = st.sampled_from(flags).flatmap(
        lambda fa: (values_for(fa[1], paths) if fa[1].nargs != 0 else st.just(None)).map(lambda v: (fa[0], v))
    )
    pieces = st.lists(flag_value | JUNK.map(lambda j: (j, None)), max_size=5)
    pos = st.tuples(*[st.sampled_from(paths) | JUNK for _ in positionals])

    def build(p):
        head, rest = p
        argv = [a for a in positionals if a.startswith("prepare")] + list(head)
        for flag, value in rest:
            argv += [flag] if value is None else [flag, value]
        return argv

    return st.tuples(pos, pieces).map(build)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working directory with a tiny HF dir, a jaxlm checkpoint, text and junk files: fuzzed paths
    are relative, so whatever a run writes stays in here."""
    d = tmp_path_factory.mktemp("fuzz")
    params = jaxlm.init_params(TINY, jax.random.key(0))
    jaxlm.to_hf(TINY, params, d / "hf")
    jaxlm.save(d / "ck", TINY, params)
    (d / "text.txt").write_text("To be, or not to be, that is the question.\n" * 40)
    (d / "docs.jsonl").write_text('{"text": "a b c"}\n{"text": 3}\nnot json\n')
    (d / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (d / "empty").mkdir()
    return d


PATHS = ["hf", "ck", "text.txt", "docs.jsonl", "binary.bin", "empty", "absent", "out", "hf/config.json", "."]


@pytest.fixture
def in_sandbox(sandbox, monkeypatch):
    monkeypatch.chdir(sandbox)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a junk --init-from that looks like a hub id must not go online
    monkeypatch.setenv("JAXLM_CACHE", str(sandbox / "cache"))
    return sandbox


@FUZZ
@given(data=st.data())
def test_fuzz_convert_cli(in_sandbox, data):
    argv = data.draw(argv_strategy(convert.build_parser(), ["src", "out"], PATHS + ["new1", "new2"]))
    assert_works_or_user_error(*call_cli(convert.main, argv))


@FUZZ
@given(data=st.data())
def test_fuzz_data_cli(in_sandbox, data):
    parser = data.draw(st.sampled_from([["prepare", "src", "out"], ["src"], []]))
    argv = data.draw(argv_strategy(jaxlm.data.cli.build_parser(), parser, PATHS + ["new3", "new4"]))
    assert_works_or_user_error(*call_cli(data_main, argv))


def data_main(argv):
    return data_cli.main(argv)


# sample.py is fuzzed without a loadable model (a valid one would compile and generate for seconds
# per example); test_sample_cli.py covers the runs that work.
SAMPLE_PATHS = [p for p in PATHS if p not in ("hf", "ck")]


@FUZZ
@given(data=st.data())
def test_fuzz_sample_cli(in_sandbox, data):
    argv = data.draw(argv_strategy(sample.build_parser(), [], SAMPLE_PATHS))
    assert_works_or_user_error(*call_cli(sample.main, argv))


def test_fuzzed_shapes_through_real_commands(in_sandbox):
    """A few of the same failures in fresh interpreters, through the entry points a user runs."""
    for args in (
        [str(ROOT / "sample.py"), "--num-samples", "nan"],
        [str(ROOT / "sample.py"), "--init-from", "binary.bin"],
        ["-m", "jaxlm.data", "prepare", "docs.jsonl", "new5"],
    ):
        r = run_py(*args, cwd=in_sandbox, env={"HF_HUB_OFFLINE": "1"}, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert sum(line.startswith("error: ") or ": error: " in line for line in r.stderr.splitlines()) == 1, (
            args,
            r.stderr,
        )


# ---------------------------------------------------------------------------------------------
# The model's inputs

DTYPES = [np.int32, np.int64, np.uint8, np.int8, np.float32, np.bool_]


@pytest.fixture(scope="module")
def tiny_params():
    return jaxlm.init_params(TINY, jax.random.key(1))


@settings(FUZZ, max_examples=15)  # each new shape compiles the model eagerly: slow
@given(
    shape=st.lists(st.integers(0, 18), min_size=0, max_size=3),
    dtype=st.sampled_from(DTYPES),
    low=st.integers(-3, 45),
    span=st.integers(0, 45),
)
def test_fuzz_gpt_apply(tiny_params, shape, dtype, low, span):
    rng = np.random.default_rng(abs(hash((tuple(shape), low, span))) % 2**32)
    tokens = (rng.integers(low, low + span + 1, size=shape)).astype(dtype)
    valid = (
        len(shape) == 2
        and shape[1] <= TINY.block_size
        and np.issubdtype(dtype, np.integer)
        and (tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < TINY.vocab_size))
    )
    try:
        logits = jaxlm.GPT(TINY).apply({"params": tiny_params}, jnp.asarray(tokens))
    except ValueError as e:
        assert not valid, f"valid tokens {shape} {dtype} refused: {e}"
        assert str(e) and "\n" not in str(e)
        return
    assert valid, f"invalid tokens {shape} {dtype} [{low}, {low + span}] accepted"
    assert logits.shape == (*shape, TINY.vocab_size) and bool(jnp.isfinite(logits).all())


@settings(FUZZ, max_examples=12)  # mostly valid values, so that generation runs, not only the checks
@given(
    prompts=st.one_of(
        st.lists(st.lists(st.integers(0, 39), min_size=1, max_size=8), min_size=1, max_size=2),
        st.lists(st.lists(st.integers(-2, 42), max_size=18), max_size=2),
        st.sampled_from([[], "text", [[1, 2], "ab"], [[[1]]], [1, 2], [[1.5, 2]], None, [[True]]]),
    ),
    max_new=st.integers(1, 8) | st.integers(-1, 17) | st.sampled_from([1.5, "3", None, True]),
    temperature=st.sampled_from([0.0, 0.8, 0.8, 1.0, -1.0, float("nan"), float("inf"), "hot"]),
    top_k=st.sampled_from([None, None, 1, 5, 1000, 0, -3]),
    top_p=st.sampled_from([1.0, 1.0, 0.5, 0.0, 1.5, float("nan")]),
    eos_id=st.sampled_from(["auto", None, None, 0, 39, 40, -1, "x"]),
)
def test_fuzz_generate(tiny_params, prompts, max_new, temperature, top_k, top_p, eos_id):
    try:
        out = jaxlm.generate(
            tiny_params,
            TINY,
            prompts,
            max_new_tokens=max_new,
            do_sample=None,  # jaxlm's rule: sampled unless temperature is 0
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=eos_id,
        )
    except ValueError as e:  # JaxlmError is a ValueError
        assert str(e) and "\n" not in str(e)
        return
    assert len(out) == len(prompts)
    for row in out:
        assert 1 <= len(row) <= max_new and all(0 <= t < TINY.vocab_size for t in row)
