"""jaxlm.data: preparing text into token files, and batches as a pure function of (seed, step, rows)."""

import json

import numpy as np
import pytest

from jaxlm.cli import run_cli
from jaxlm.data import cli as data_cli
from jaxlm.data import textfiles
from jaxlm.data import tokens as data
from jaxlm.errors import JaxlmError
from jaxlm.tokenizer import GPT2Tokenizer, from_spec

SHAKESPEARE = data.bundled_shakespeare()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))


def test_char_prepare_matches_nanogpt_split(tmp_path):
    out = data.prepare(SHAKESPEARE, tmp_path / "ds", tokenizer="char", progress=False)
    ds = data.open_dataset(out)
    text = SHAKESPEARE.read_text()
    n = len(text)
    assert ds.vocab_size == 65 and ds.meta["counts"] == {"train": int(n * 0.9), "val": n - int(n * 0.9)}
    tok = from_spec(ds.tokenizer_spec)
    assert tok.decode(ds.train[:200]) == text[:200]
    assert tok.decode(ds.val) == text[int(n * 0.9) :]
    assert ds.train.dtype == np.uint16


def test_gpt2_prepare_equals_tokenizing_the_whole_text(tmp_path, monkeypatch):
    # Files are read in pieces; cutting must never change the tokens (tiny pieces make many cuts).
    monkeypatch.setattr(textfiles, "_CHUNK_BYTES", 997)
    src = tmp_path / "in.txt"
    src.write_text(SHAKESPEARE.read_text()[:60_000])
    ds = data.open_dataset(data.prepare(src, tmp_path / "ds", progress=False))
    expected = GPT2Tokenizer().encode(src.read_text(), allow_eot=False) + [GPT2Tokenizer.eot_id]
    np.testing.assert_array_equal(np.concatenate([ds.train, ds.val]), expected)


def test_folder_and_jsonl_documents(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first document")
    (folder / "sub" / "b.txt").write_text("second one")
    (folder / "skip.md").write_text("not text")
    ds = data.open_dataset(data.prepare(folder, tmp_path / "f", progress=False))
    tok = GPT2Tokenizer()
    assert ds.meta["documents"] == 2
    assert tok.decode(np.concatenate([ds.train, ds.val])) == "first document<|endoftext|>second one<|endoftext|>"

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"line {i}", "id": i}) for i in range(5)) + "\n\n")
    ds = data.open_dataset(data.prepare(jsonl, tmp_path / "j", tokenizer="char", text_field="body", progress=False))
    assert ds.meta["documents"] == 5
    assert from_spec(ds.tokenizer_spec).decode(np.concatenate([ds.train, ds.val])) == "\n\n".join(
        f"line {i}" for i in range(5)
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.txt", "no such file"),
        (
            lambda p: _write(p / "latin1.txt", "caf\xe9 au lait".encode("latin-1")),
            "not UTF-8 text (byte 0xe9 at offset 3)",
        ),
        (lambda p: _write(p / "bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n'), "line 2 is not valid JSON"),
        (lambda p: _write(p / "nofield.jsonl", b'{"body": "x"}\n'), "no string field 'text'"),
        (lambda p: _write(p / "empty.txt", b""), "holds no text"),
        (lambda p: (p / "emptydir").mkdir() or p / "emptydir", "without .txt files"),
    ],
)
def test_bad_sources_are_clear_errors(tmp_path, make, message):
    src = make(tmp_path)
    with pytest.raises(JaxlmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.prepare(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no half-written temp dir left


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


def test_dataset_smaller_than_a_block(tmp_path):
    src = _write(tmp_path / "tiny.txt", b"to be or not to be, that is the question\n")
    ds = data.open_dataset(data.prepare(src, tmp_path / "ds", tokenizer="char", progress=False))
    with pytest.raises(JaxlmError, match="fewer than block_size"):
        ds.check_block_size(64)
    ds.check_block_size(2)


def test_batches_are_a_pure_function_of_seed_and_step():
    ds = data.resolve_dataset("shakespeare_char")
    b = data.get_batch(ds, "train", 7, 3, (2, 4), 16)
    assert b.shape == (2, 4, 17) and b.dtype == np.int32
    np.testing.assert_array_equal(b, data.get_batch(ds, "train", 7, 3, (2, 4), 16))
    assert not np.array_equal(b, data.get_batch(ds, "train", 7, 4, (2, 4), 16))
    assert not np.array_equal(b, data.get_batch(ds, "train", 8, 3, (2, 4), 16))
    # Windows are real text: targets are the inputs shifted by one.
    offsets = data.batch_offsets(7, "train", 3, 8, len(ds.train), 16).reshape(2, 4)
    np.testing.assert_array_equal(b[1, 2], ds.train[offsets[1, 2] : offsets[1, 2] + 17])
    # Each process reads only its rows, and the rows of all processes make the global batch.
    parts = [data.get_batch(ds, "train", 7, 3, (2, 4), 16, rows=slice(i, i + 2)) for i in (0, 2)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), b)
    # Val batches come from the val split.
    v = data.get_batch(ds, "val", 7, 0, (1, 4), 16)
    assert all(_is_window(ds.val, row) for row in v[0])


def test_steps_draw_independent_windows():
    # Consecutive steps must not share windows beyond chance (a counter-based stream once repeated a third
    # of each batch in the next, which cost nanoGPT's CPU config 0.1 of val loss).
    steps = [set(data.batch_offsets(1337, "train", s, 12, 1_000_000, 64)) for s in range(200)]
    assert sum(len(steps[s] & steps[s + 1]) for s in range(199)) <= 1
    assert not set(data.batch_offsets(1337, "train", 0, 12, 1_000_000, 64)) & set(
        data.batch_offsets(1337, "val", 0, 12, 1_000_000, 64)
    )


def _is_window(stream, row):
    starts = np.flatnonzero(stream[: len(stream) - len(row) + 1] == row[0])
    return any(np.array_equal(stream[s : s + len(row)], row) for s in starts)


def test_builtin_dataset_is_prepared_once_into_the_cache(tmp_path):
    a = data.resolve_dataset("shakespeare_char")
    assert a.path.parent == tmp_path / "cache" / "data" and a.vocab_size == 65
    stamp = (a.path / "train.bin").stat().st_mtime_ns
    b = data.resolve_dataset("shakespeare_char")
    assert b.path == a.path and (b.path / "train.bin").stat().st_mtime_ns == stamp
    assert data.resolve_dataset("shakespeare").tokenizer_spec == {"kind": "gpt2"}


def test_prepare_cli(tmp_path, capsys):
    out = tmp_path / "ds"
    assert (
        run_cli(data_cli.main, ["prepare", str(SHAKESPEARE), str(out), "--tokenizer", "char", "--val_fraction=0.2"])
        == 0
    )
    assert "train on it: python train.py --dataset" in capsys.readouterr().out
    assert data.open_dataset(out).meta["val_fraction"] == 0.2
    assert run_cli(data_cli.main, ["prepare", str(SHAKESPEARE), str(out)]) == 2  # exists: refuse
    assert "already exists" in capsys.readouterr().err
    assert run_cli(data_cli.main, ["prepare", str(tmp_path / "nope.txt"), str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
