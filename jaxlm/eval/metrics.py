"""Task metrics as the field computes them, so numbers compare with papers and leaderboards.

ROUGE-1/2/L: Google's `rouge-score` with its Porter stemmer, the F-measure averaged over examples (x100).
BLEU and chrF: `sacrebleu` at corpus level with its defaults (13a tokenizer, chrF n=6, beta=2).
Exact match and F1: the official SQuAD v1.1 evaluation script's normalisation (lower case, no punctuation,
no articles a/an/the, single spaces), the best over an example's reference answers, averaged (x100).
"""

from __future__ import annotations

import re
import string
from collections import Counter

from ..utils.extras import require

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


# The task metrics' packages come with the `tasks` extra: name -> (module, what needs it).
NEEDS = {
    "summarize": ("rouge_score.rouge_scorer", "ROUGE (--task summarize)"),
    "translate": ("sacrebleu", "BLEU and chrF (--task translate)"),
}


def require_metric(task: str):
    """The metric package `task` needs (a one-line error naming `jaxlm[tasks]` when it is not installed)."""
    if task not in NEEDS:
        return None
    module, what = NEEDS[task]
    return require(module, "tasks", what)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    rouge_scorer = require_metric("summarize")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {t: 100 * sum(s[t].fmeasure for s in scores) / max(len(scores), 1) for t in ROUGE_TYPES}


def bleu_chrf(predictions: list[str], references: list[str]) -> dict[str, float]:
    sacrebleu = require_metric("translate")
    return {
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
    }


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalize_answer."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_em(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def squad(predictions: list[str], answers: list[list[str]]) -> dict[str, float]:
    pairs = list(zip(predictions, answers, strict=True))
    n = max(len(pairs), 1)
    return {
        "exact_match": 100 * sum(max(squad_em(p, a) for a in golds) for p, golds in pairs) / n,
        "f1": 100 * sum(max(squad_f1(p, a) for a in golds) for p, golds in pairs) / n,
    }
