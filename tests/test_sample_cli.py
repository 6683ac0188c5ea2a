"""sample.py: streaming, timings, char-level runs, --start FILE:, seeds, and every bad input."""

import io
import re

import jax
import numpy as np
import pytest
from helpers import run_py, save_random_hf

import jaxlm
from jaxlm.cli import run_cli
from jaxlm.generation.cli import SEPARATOR, StreamPrinter, build_parser, main
from jaxlm.tokenizer import CharTokenizer, GPT2Tokenizer

TINY = dict(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
ALPHABET = "\n !',.?abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    save_random_hf(path, **TINY)
    return path


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    tok = CharTokenizer(ALPHABET)
    config = jaxlm.GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=tok.vocab_size)
    params = jax.jit(jaxlm.init_params, static_argnums=0)(config, jax.random.key(0))
    return jaxlm.save(tmp_path_factory.mktemp("char") / "ckpt", config, params, tok)


def _sample(capsys, *argv):
    rc = run_cli(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_script_streams_samples_and_reports_speed(hf_dir):
    r = run_py(
        "sample.py", "--init-from", hf_dir, "--start", "Hello, how are you?", "--num-samples", "3",
        "--max-new-tokens", "10", "--temperature", "0.8", "--top-k", "200", "--top-p", "0.95", "--seed", "1337",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Hello, how are you?") == 3 and r.stdout.count(SEPARATOR) == 3
    last = r.stderr.strip().splitlines()[-1]
    assert re.search(r"\d+ tokens in [\d.]+ s: [\d.]+ tokens/s .*compile excluded.*\| compile [\d.]+ s", last), last


def test_same_seed_same_samples_and_file_prompt(capsys, hf_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time")
    args = ["--init-from", hf_dir, "--num-samples", "2", "--max-new-tokens", "12"]
    rc, first, _ = _sample(capsys, *args, "--start", f"FILE:{prompt}", "--seed", "7")
    assert rc == 0 and first.startswith("Once upon a time") and first.count(SEPARATOR) == 2
    assert _sample(capsys, *args, "--start", f"FILE:{prompt}", "--seed", "7")[1] == first
    assert _sample(capsys, *args, "--start", f"FILE:{prompt}", "--seed", "8")[1] != first


def test_char_level_checkpoint_decodes_with_its_own_tokenizer(capsys, char_ckpt):
    rc, out, err = _sample(capsys, "--init-from", char_ckpt, "--start", "to be", "--num-samples", "2")
    assert rc == 0, err
    samples = out.split(SEPARATOR + "\n")[:2]
    # no --max-new-tokens: as many as the block size (32) leaves after the 5-character prompt
    assert [len(s) for s in samples] == [32 + 1, 32 + 1]  # + the newline before the separator
    assert set(out) <= set(ALPHABET + "-")


def test_printer_streams_in_order_and_never_splits_a_character():
    tok = GPT2Tokenizer()
    text = " héllo 👋 wörld"
    ids = tok.encode(text)
    assert len(tok.decode_bytes(ids[:1])) < len(text.encode())  # some characters span several tokens
    out = io.StringIO()
    printer = StreamPrinter(tok, [[15496], [15496]], out=out)
    seen = []
    for i, t in enumerate(ids):
        printer(np.array([t, t]), i, np.array([False, i == 2]))  # row 1 ends at step 2
        seen.append(out.getvalue())
        assert "\ufffd" not in seen[-1]
    assert seen[0].startswith("Hello") and all(a <= b for a, b in zip(seen, seen[1:], strict=False))
    assert SEPARATOR not in seen[-1]  # row 0 has not ended: row 1 waits
    printer.finish()
    assert out.getvalue() == f"Hello{text}\n{SEPARATOR}\nHello{tok.decode(ids[:3])}\n{SEPARATOR}\n"


def test_both_flag_spellings_and_defaults_in_help():
    args = build_parser().parse_args(["--max_new_tokens=5", "--top-k", "3", "--init_from=gpt2"])
    assert (args.max_new_tokens, args.top_k, args.init_from) == (5, 3, "gpt2")
    assert "(default: 0.8)" in build_parser().format_help()


def test_no_flags_samples_the_run_train_py_wrote(capsys, tmp_path, monkeypatch):
    import jaxlm.train as trainer
    from jaxlm.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    tiny = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=2, eval_iters=1, tensorboard=False)
    trainer.train(TrainConfig(**tiny, max_iters=1, eval_interval=1), log=lambda *a, **k: None)  # writes ./out
    capsys.readouterr()
    rc, out, err = _sample(capsys)
    assert rc == 0, err
    samples = out.split(SEPARATOR + "\n")
    assert len(samples) == 4 and samples[-1] == ""
    # char-level Shakespeare: decoded with the run's own tokenizer, 1 + 31 characters fill the block
    assert [len(s) for s in samples[:3]] == [33, 33, 33]


def test_no_flags_without_a_run_names_the_command_to_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _sample(capsys)
    assert rc == 2 and err.startswith("error: no training run in out/: train one first with `python train.py`")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--start", ""], "the prompt is empty; to sample without one, pass --start '<|endoftext|>'"),
        (["--start", " x" * 70], "longer than the model's block_size"),
        (["--max-new-tokens", "60", "--start", "a b c d e f"], "exceeds the model's block_size"),
        (["--top-p", "0"], r"top_p must be in \(0, 1\]"),
        (["--top-p", "1.01"], r"top_p must be in \(0, 1\]"),
        (["--top-k", "-1"], "--top-k must be >= 1"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--start", "FILE:/no/such/prompt.txt"], "no such file"),
        (["--num-beams", "0"], "num_beams must be an integer >= 1"),
        (["--num-beams", "2", "--num-return-sequences", "3"], r"num_return_sequences \(3\) cannot exceed num_beams"),
        (["--temperature", "0", "--num-return-sequences", "2"], "greedy decoding"),
        (["--repetition-penalty", "-1"], "repetition_penalty must be a number > 0"),
        (["--no-repeat-ngram-size", "65"], "bigger than the model's block_size"),
        (["--max-length", "2", "--start", "a b c"], "max_length .2. counts the prompt"),
        (["--min-new-tokens", "-1"], "min_new_tokens must be an integer >= 0"),
        (["--length-penalty", "nan", "--num-beams", "2"], "length_penalty must be a finite number"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, hf_dir, argv, message):
    rc, _, err = _sample(capsys, "--init-from", hf_dir, *argv)
    assert rc == 2
    assert re.search(message, err), err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err


def test_beam_search_prints_the_best_beams_best_first(capsys, hf_dir):
    args = ["--init-from", hf_dir, "--start", "Hello", "--max-length", "9", "--num-beams", "3"]
    rc, out, err = _sample(capsys, *args, "--num-return-sequences", "2", "--no-repeat-ngram-size", "2")
    assert rc == 0, err
    samples = out.split(SEPARATOR + "\n")
    assert len(samples) == 3 and samples[0] != samples[1] and all(s.startswith("Hello") for s in samples[:2])
    assert _sample(capsys, *args, "--num-return-sequences", "2", "--no-repeat-ngram-size", "2")[1] == out


def test_char_model_rejects_characters_it_cannot_encode(capsys, char_ckpt):
    rc, _, err = _sample(capsys, "--init-from", char_ckpt, "--start", "Hello")
    assert rc == 2 and "'H'" in err and "alphabet" in err


def test_missing_checkpoint_is_a_clear_error(capsys, tmp_path):
    rc, _, err = _sample(capsys, "--init-from", tmp_path / "nope")
    assert rc == 2 and "no such directory" in err
    rc, _, err = _sample(capsys, "--out-dir", tmp_path / "nope")
    assert rc == 2 and f"--out-dir {tmp_path / 'nope'}" in err
