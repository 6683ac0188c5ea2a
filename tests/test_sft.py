"""jaxlm.data.sft (prompt/completion data, masks, batches), jaxlm.data.templates and jaxlm.eval's task scoring."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm import GPTConfig, cross_entropy, generate, init_params
from jaxlm.cli import run_cli
from jaxlm.data import cli as data_cli
from jaxlm.data import sft, templates
from jaxlm.data import tokens as data
from jaxlm.errors import JaxlmError
from jaxlm.eval import metrics, tasks
from jaxlm.tokenizer import GPT2Tokenizer

# ../shared/data beside the clone (as CI has it); JAXLM_SHARED_DATA points elsewhere (e.g. from a git worktree)
SHARED = Path(os.environ.get("JAXLM_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
TOK = GPT2Tokenizer()
EOT = TOK.eot_id


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pairs(n, prompt="Q: what is {i}?\nA:", completion=" {i}"):
    return [{"prompt": prompt.format(i=i), "completion": completion.format(i=i)} for i in range(n)]


def prepared(tmp_path, rows, name="ds", **kw):
    return sft.open_sft(sft.prepare(write_jsonl(tmp_path / f"{name}.jsonl", rows), tmp_path / name, **kw))


def all_examples(ds):
    return [ds.split(s).example(i) for s in sft.SPLITS for i in range(len(ds.split(s)))]


# ---------------------------------------------------------------------------------------------
# Tokens and masks


def test_mask_counts_completion_and_eos_only(tmp_path):
    ds = prepared(tmp_path, pairs(10))
    ids, mask = ds.train.example(3)
    p, c = TOK.encode("Q: what is 3?\nA:"), TOK.encode(" 3")
    np.testing.assert_array_equal(ids, p + c + [EOT])
    np.testing.assert_array_equal(mask, [0] * len(p) + [1] * (len(c) + 1))
    assert ds.meta["counts"] == {"train": 9, "val": 1} and ds.meta["stats"]["prefix_mismatch"] == 0


def test_eos_appended_once_and_text_rows_count_every_token(tmp_path):
    rows = [{"prompt": "a b", "completion": " c<|endoftext|>"}, {"text": "plain text"}, *pairs(3)]
    ds = prepared(tmp_path, rows)
    (ids0, m0), (ids1, m1) = ds.train.example(0), ds.train.example(1)
    assert list(ids0).count(EOT) == 1 and ids0[-1] == EOT and list(m0[-2:]) == [1, 1]
    np.testing.assert_array_equal(ids1, TOK.encode("plain text") + [EOT])
    assert m1.all() and ds.meta["stats"]["text_rows"] == 1 and ds.meta["stats"]["pairs"] == 4


def test_prefix_mismatch_is_counted_and_masked_by_prompt_length_as_trl_does(tmp_path):
    # The trailing space of "TL;DR: " merges into " The" when followed by the completion.
    rows = [{"prompt": "Text.\nTL;DR: ", "completion": "The end."}, *pairs(3)]
    ds = prepared(tmp_path, rows)
    ids, mask = ds.train.example(0)
    n = len(TOK.encode("Text.\nTL;DR: "))
    np.testing.assert_array_equal(ids, TOK.encode("Text.\nTL;DR: The end.") + [EOT])
    np.testing.assert_array_equal(mask, [0] * n + [1] * (len(ids) - n))
    assert ds.meta["stats"]["prefix_mismatch"] == 1 and ds.meta["stats"]["first_mismatch_line"] == 1
    assert "1 examples (first at line 1)" in sft.summary(ds.meta)


@pytest.mark.parametrize("mode", ["left", "right", "drop"])
def test_long_examples_truncated_or_dropped_and_counted(tmp_path, mode):
    long = {"prompt": "Say it:", "completion": " word" * 30}
    ds = prepared(tmp_path, [long, *pairs(4)], truncate=mode, block_size=15)
    s = ds.meta["stats"]
    assert s["longest"] <= 16 and ds.meta["truncate"] == mode
    whole = TOK.encode(long["prompt"] + long["completion"]) + [EOT]
    if mode == "drop":
        assert (s["dropped"], s["truncated"]) == (1, 0) and len(ds.train) + len(ds.val) == 4
        return
    assert (s["dropped"], s["truncated"]) == (0, 1)
    ids, mask = ds.train.example(0)
    np.testing.assert_array_equal(ids, whole[-16:] if mode == "left" else whole[:16])
    if mode == "left":  # the completion's end and its EOS survive, the prompt is cut
        assert mask.all() and ids[-1] == EOT
    else:
        n = len(TOK.encode("Say it:"))
        np.testing.assert_array_equal(mask, [0] * n + [1] * (16 - n))
        assert EOT not in ids


def test_right_truncation_leaving_no_completion_drops_it(tmp_path):
    long = {"prompt": "word " * 30, "completion": " yes"}
    ds = prepared(tmp_path, [long, *pairs(4)], truncate="right", block_size=15)
    assert ds.meta["stats"]["dropped"] == 1 and "1 dropped" in sft.summary(ds.meta)


TASK_FILES = [
    ("summarize", "summarization/xsum_test_subset.jsonl", "summary"),
    ("summarize", "summarization/dialogsum_test.jsonl", "summary"),
    ("translate", "translation/newstest2021.de-en.jsonl", "reference"),
    ("qa", "qa/xquad_en.jsonl", "answers"),
    ("qa", "qa/nq_open_dev.jsonl", "answers"),
]


@pytest.mark.parametrize("template,name,ref", TASK_FILES)
def test_bundled_task_files_with_each_template(tmp_path, template, name, ref):
    rows = [json.loads(line) for line in (SHARED / name).read_text().splitlines()[:6]]
    ds = prepared(tmp_path, rows, template=template, truncate="left")
    assert ds.meta["stats"]["rows"] == 6 and ds.meta["stats"]["prefix_mismatch"] == 0
    ids, mask = ds.train.example(0)
    answer = rows[0][ref][0] if template == "qa" else rows[0][ref]
    assert TOK.decode(ids[mask == 1]) == " " + answer + "<|endoftext|>"
    prompt = TOK.decode(ids[mask == 0])
    cue = {"summarize": "\nTL;DR:", "translate": "\nEnglish phrase:", "qa": "\nA:"}[template]
    assert prompt.endswith(cue)
    if template == "translate":
        assert prompt == f"German phrase: {rows[0]['source']}\nEnglish phrase:"
    if name.startswith("qa/nq"):
        assert prompt == f"Q: {rows[0]['question']}\nA:"  # closed-book: no context line


def test_custom_template(tmp_path):
    rows = [{"q": f"{i}+{i}", "a": str(2 * i)} for i in range(5)]
    ds = prepared(tmp_path, rows, template="Sum {q}\\n=> {a}")
    ids, mask = ds.train.example(2)
    assert TOK.decode(ids) == "Sum 2+2\n 4<|endoftext|>" and TOK.decode(ids[mask == 1]) == " 4<|endoftext|>"
    with pytest.raises(JaxlmError, match="PROMPT=>COMPLETION"):
        templates.parse("no separator {q}")
    with pytest.raises(JaxlmError, match="not a plain field name"):
        templates.parse("{q!r}=>{a}")


# ---------------------------------------------------------------------------------------------
# Batches


@pytest.fixture
def mixed(tmp_path):
    rows = [{"prompt": "x " * (3 + 11 * (i % 9)), "completion": f" {i}"} for i in range(60)]
    return prepared(tmp_path, rows, block_size=128)


def test_batches_are_a_pure_function_of_seed_and_step(mixed):
    a = sft.get_batch(mixed, "train", 7, 3, (2, 4), 128)
    b = sft.get_batch(mixed, "train", 7, 3, (2, 4), 128)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    tokens, mask = a
    assert tokens.dtype == np.int32 and mask.dtype == np.float32
    assert tokens.shape[:2] == (2, 4) and mask.shape == (*tokens.shape[:2], tokens.shape[2] - 1)
    assert tokens.shape[2] - 1 in sft.bucket_lengths(128) == [32, 64, 128]
    part = sft.get_batch(mixed, "train", 7, 3, (2, 4), 128, rows=slice(2, 4))
    np.testing.assert_array_equal(part[0], tokens[:, 2:4])
    steps = [sft.get_batch(mixed, "train", 7, s, (2, 4), 128)[0] for s in range(6)]
    assert len({x.tobytes() for x in steps}) == 6
    assert not np.array_equal(sft.get_batch(mixed, "train", 8, 3, (2, 4), 128)[0], tokens)


def test_every_batch_row_is_one_whole_example_then_padding(mixed):
    examples = {tuple(ids): m for ids, m in all_examples(mixed)}
    T_seen = set()
    for step in range(16):
        tokens, mask = sft.get_batch(mixed, "train", 0, step, (1, 4), 128)
        T_seen.add(mask.shape[-1])
        for row, m in zip(tokens[0], mask[0], strict=True):
            n = int(np.flatnonzero(m)[-1]) + 2  # the EOS closes the example
            ids = tuple(int(t) for t in row[:n])
            assert ids in examples and (row[n:] == EOT).all() and not m[n - 1 :].any()
            np.testing.assert_array_equal(m[: n - 1], examples[ids][1:])
            assert n <= mask.shape[-1] + 1
    lengths = mixed.train.lengths
    used = {T for T in sft.bucket_lengths(128) if ((lengths <= T + 1) & (lengths > T // 2 + 1)).any()}
    assert len(used) == 3 and T_seen == used  # every bucket drawn; short rows never padded to 128


def test_masked_loss_across_padded_rows_by_hand(mixed):
    tokens, mask = sft.get_batch(mixed, "train", 1, 0, (1, 3), 128)
    tokens, mask = tokens[0], mask[0]
    _, small = np.unique(tokens, return_inverse=True)  # renumber the ids used: a small vocab, same targets
    small = small.reshape(tokens.shape)
    logits = np.random.default_rng(0).normal(size=(*mask.shape, small.max() + 1)).astype(np.float32)
    got = float(cross_entropy(logits, small[:, 1:], mask))
    b, t = np.nonzero(mask)  # only completion targets and each row's EOS; prompts and padding are 0
    z = logits[b, t].astype(np.float64)
    nll = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1) - z[np.arange(len(b)), small[b, t + 1]]
    assert len(b) == sum(int(mixed.train.example(i)[1][1:].sum()) for i in _rows_of(mixed, tokens))
    assert got == pytest.approx(nll.mean(), rel=1e-5)


def _rows_of(ds, tokens):
    """Which train examples the batch rows hold (each row starts with its example's tokens)."""
    found = []
    for row in tokens:
        found.append(
            next(i for i in range(len(ds.train)) if np.array_equal(row[: ds.train.lengths[i]], ds.train.example(i)[0]))
        )
    return found


# ---------------------------------------------------------------------------------------------
# Opening and the command line


def test_resolve_dataset_opens_sft_dirs_and_pairs_files_only_when_allowed(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", pairs(20))
    out = tmp_path / "prep"
    assert run_cli(data_cli.main, ["prepare", str(src), str(out)]) == 0
    assert isinstance(data.resolve_dataset(str(out), allow_sft=True), sft.SFTData)
    with pytest.raises(JaxlmError, match="prompt/completion"):
        data.resolve_dataset(str(out))
    cached = data.resolve_dataset(str(src), block_size=64, allow_sft=True)
    assert isinstance(cached, sft.SFTData) and cached.meta["block_size"] == 64
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world " * 20}] * 3)
    assert isinstance(data.resolve_dataset(str(text)), data.TokenData)  # {"text"} files: unchanged


def test_prepare_prints_the_summary(tmp_path, capsys):
    src = write_jsonl(tmp_path / "p.jsonl", pairs(20))
    assert run_cli(data_cli.main, ["prepare", str(src), str(tmp_path / "o"), "--block-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "20 rows (20 prompt/completion, 0 text) -> 18 train + 2 val examples" in out
    assert "0 truncated (drop), 0 dropped" in out and "a prefix of prompt+completion tokens in every" in out


BAD = [
    (["{oops", *pairs(3)], [], "line 1 is not valid JSON"),
    ([*pairs(2), "[1, 2]"], [], "line 3 is a JSON list"),
    ([{"prompt": "p"}, *pairs(3)], [], "line 1 has no 'completion'"),
    ([*pairs(2), {"prompt": 3, "completion": "c"}], [], "line 3 has a non-string (int) 'prompt'"),
    ([*pairs(2), {"prompt": "p", "completion": "  "}], [], "line 3 has an empty completion"),
    ([{"document": "d"}] * 3, ["--template", "summarize"], "line 1 has no field 'summary'"),
    ([{"q": "d"}] * 3, ["--template", "{q}=>{a}"], "has no field 'a'"),
    ([{"prompt": "w " * 99, "completion": " c"}] * 3, ["--block-size", "16"], "no usable examples"),
    ([{"x": 1}], ["--template", "summarize"], "no field 'document'"),
]


@pytest.mark.parametrize("lines,flags,message", BAD)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, lines, flags, message):
    src = write_jsonl(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "out"
    assert run_cli(data_cli.main, ["prepare", str(src), str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]


# ---------------------------------------------------------------------------------------------
# Metrics and task scoring


def test_rouge_against_the_library_and_by_hand():
    from rouge_score import rouge_scorer

    preds, refs = ["the cats sat on a mat", "nothing alike"], ["the cat sat on the mat", "a dog ran"]
    got = metrics.rouge(preds, refs)
    lib = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in got:
        expected = 100 * np.mean([lib.score(r, p)[key].fmeasure for p, r in zip(preds, refs, strict=True)])
        assert got[key] == pytest.approx(expected)
    # stemmed unigrams: the cat sat on a mat vs the cat sat on the mat -> 5 of 6 match; second pair 0
    assert got["rouge1"] == pytest.approx(100 * (5 / 6) / 2)


def test_bleu_chrf_against_sacrebleu():
    import sacrebleu

    preds = ["The cat sat on the mat.", "A quick brown fox jumps."]
    refs = ["The cat sat on the mat.", "The quick brown fox jumped."]
    got = metrics.bleu_chrf(preds, refs)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    assert 0 < got["bleu"] < 100 and metrics.bleu_chrf(refs, refs) == pytest.approx({"bleu": 100.0, "chrf": 100.0})


def test_squad_em_f1_official_formula_by_hand():
    preds = ["The Denver Broncos!", "in 1972", "Paris"]
    answers = [["Denver Broncos"], ["December 1972", "14 December 1972"], ["London"]]
    got = metrics.squad(preds, answers)
    # 1: normalised equal (article, punctuation, case) -> EM 1, F1 1; 2: "in 1972" vs "december 1972":
    # overlap 1, P 1/2, R 1/2 -> F1 1/2 (vs the 3-token answer: P 1/2, R 1/3 -> 0.4); 3: 0
    assert got["exact_match"] == pytest.approx(100 / 3)
    assert got["f1"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)


def test_generate_and_score_end_to_end_on_a_random_model():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)
    params = init_params(config, jax.random.key(0))
    rows = [json.loads(line) for line in (SHARED / "qa/nq_open_dev.jsonl").read_text().splitlines()[:3]]
    result = tasks.qa(params, config, TOK, rows, max_new_tokens=6, batch_size=3)
    assert result["examples"] == 3 and result["truncated_prompts"] == 0
    prompts = [TOK.encode(f"Q: {r['question']}\nA:") for r in rows]
    order = sorted(range(3), key=lambda i: len(prompts[i]))
    outs = generate(params, config, [prompts[i] for i in order], max_new_tokens=6, temperature=0.0)
    expected = [""] * 3
    for i, out in zip(order, outs, strict=True):
        expected[i] = TOK.decode([t for t in out if t != EOT]).split("\n")[0].strip()
    assert [p["prediction"] for p in result["predictions"]] == expected
    assert [p["answers"] for p in result["predictions"]] == [r["answers"] for r in rows]
    assert result["metrics"] == metrics.squad(expected, [r["answers"] for r in rows])
