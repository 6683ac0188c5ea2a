"""`python -m jaxlm.eval MODEL --task summarize|translate|qa FILE`: a table, JSON, predictions JSONL beside it,
and metrics that equal the libraries' own on those predictions."""

import json
from pathlib import Path

import pytest
import sacrebleu
from helpers import run_py, save_random_hf
from rouge_score import rouge_scorer

from jaxlm.cli import run_cli
from jaxlm.eval import cli
from jaxlm.eval.metrics import squad

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = {
    "summarize": DATA / "summarization" / "dialogsum_test.jsonl",
    "translate": DATA / "translation" / "newstest2021.de-en.jsonl",
    "qa": DATA / "qa" / "nq_open_dev.jsonl",
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "hf"
    save_random_hf(path, seed=3, n_layer=1, n_head=2, n_embd=32, vocab_size=50257, n_positions=256)
    return path


@pytest.mark.parametrize("task", list(FILES))
def test_task_file_scored_with_the_fields_libraries(task, model, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = [str(model), "--task", task, str(FILES[task]), "--max-examples", "3", "--output", str(out)]
    assert run_cli(cli.main, [*argv, "--no-progress", "--batch-size", "2", "--max-new-tokens", "5"]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())["tasks"][task]
    preds = [json.loads(line) for line in out.with_name(f"results.{task}.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in FILES[task].read_text().splitlines()[:3]]
    assert len(preds) == 3 and report["examples"] == 3
    assert report["max_new_tokens"] == 5  # --max-new-tokens reaches the decoder
    hyps = [p["prediction"] for p in preds]
    if task == "summarize":
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        scores = [scorer.score(r["summary"], h) for r, h in zip(rows, hyps, strict=True)]
        expected = {t: 100 * sum(s[t].fmeasure for s in scores) / 3 for t in ("rouge1", "rouge2", "rougeL")}
    elif task == "translate":
        refs = [[r["reference"] for r in rows]]
        expected = {"bleu": sacrebleu.corpus_bleu(hyps, refs).score, "chrf": sacrebleu.corpus_chrf(hyps, refs).score}
    else:
        expected = squad(hyps, [r["answers"] for r in rows])
    for name, value in expected.items():
        assert report[name] == pytest.approx(value, abs=1e-9), name
        assert name in table


def test_task_file_mistakes_are_one_line_errors(model, tmp_path, capsys):
    def fails(argv, message):
        assert run_cli(cli.main, [str(model), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err

    fails(["--task", "qa"], "task qa needs a data file")
    fails(["--task", "qa,summarize", str(FILES["qa"])], "goes with one task")
    fails(["--task", "qa", str(tmp_path / "missing.jsonl")], "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answers": ["a"]}\n{oops\n')
    fails(["--task", "qa", str(bad)], "line 2 is not valid JSON")


@pytest.mark.parametrize("task, package", [("summarize", "rouge_score"), ("translate", "sacrebleu")])
def test_a_missing_metric_package_names_the_extra_before_loading(task, package, tmp_path):
    """Without the `tasks` extra's packages, one line naming `pip install 'jaxlm[tasks]'`, before the model is
    read (the model path does not even exist here)."""
    code = (
        f"import sys; sys.modules[{package!r}] = None\n"  # as if not installed: import raises ImportError
        "from jaxlm.cli import run_cli; from jaxlm.eval import cli\n"
        f"sys.exit(run_cli(cli.main, [{str(tmp_path / 'no-model')!r}, '--task', {task!r}, {str(FILES[task])!r}]))"
    )
    r = run_py("-c", code)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {'ROUGE' if task == 'summarize' else 'BLEU and chrF'} (--task {task}) needs the {package} package: "
        "pip install 'jaxlm[tasks]'"
    )
