"""WikiText-2 test perplexity, two ways, both as their sources compute them.

1. Hugging Face's "Perplexity of fixed-length models" guide: the text is `"\\n\\n".join(rows)` of the
   `wikitext-2-raw-v1` test split, tokenised whole; windows of block_size tokens start every `stride`
   tokens; each window scores only the tokens the previous window did not (the first scores all but
   token 0), so every token from the second on is counted once, with at least block_size - stride
   tokens of context. Perplexity = exp(mean NLL per scored token).
2. lm-evaluation-harness's `wikitext` task: the file split into Wikipedia articles (EleutherAI's
   `wikitext_document_level` rule), each article detokenised and scored by `loglikelihood_rolling`
   (see loglik.rolling_requests); word_perplexity, byte_perplexity and bits_per_byte divide the summed
   log-likelihood by the words and UTF-8 bytes of the article as it was before detokenising.

A char-level model has no BPE and no end-of-text token: it gets method 1 over characters, reported in
bits per byte (characters outside its alphabet are dropped, and counted).
"""

from __future__ import annotations

import math
import re

from ..tokenizer import GPT2_EOT_ID
from .common import check_max_examples, is_bpe, score, scorer_for
from .files import WIKITEXT2, locate, read_wikitext
from .loglik import Request, rolling_requests


def hf_rows_text(raw: str) -> str:
    """The HF guide's text from wiki.test.raw: HF's dataset keeps each line with its "\\n" as a row,
    and a blank line (" " in the file) as ""; the guide joins the rows with "\\n\\n"."""
    lines = raw.split("\n")[:-1]
    return "\n\n".join(line + "\n" if line.strip() else "" for line in lines)


def documents(raw: str) -> list[str]:
    """Articles as EleutherAI/wikitext_document_level builds them: a new article starts at each
    top-level heading line (" = Title = "); lines are kept as they are and joined with "\\n"."""
    pages, current = [], []
    for line in raw.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return pages


# lm-eval's wikitext_detokenizer, in its order: (kind, pattern, replacement); "s" = str.replace.
_DETOKENIZE = [
    ("s", "s '", "s'"),
    ("r", r"/' [0-9]/", r"/'[0-9]/"),
    ("s", " @-@ ", "-"),
    ("s", " @,@ ", ","),
    ("s", " @.@ ", "."),
    ("s", " : ", ": "),
    ("s", " ; ", "; "),
    ("s", " . ", ". "),
    ("s", " ! ", "! "),
    ("s", " ? ", "? "),
    ("s", " , ", ", "),
    ("r", r"\(\s*([^\)]*?)\s*\)", r"(\1)"),
    ("r", r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    ("r", r"{\s*([^}]*?)\s*}", r"{\1}"),
    ("r", r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    ("r", r"'\s*([^']*?)\s*'", r"'\1'"),
    ("s", "= = = =", "===="),
    ("s", "= = =", "==="),
    ("s", "= =", "=="),
    ("s", " \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    ("s", " \n", "\n"),
    ("s", "\n ", "\n"),
    ("s", " N ", " 1 "),
    ("s", " 's", "'s"),
]


def detokenize(page: str) -> str:
    for kind, pattern, repl in _DETOKENIZE:
        page = page.replace(pattern, repl) if kind == "s" else re.sub(pattern, repl, page)
    return page


def stride_requests(ids, block_size: int, stride: int, limit: int | None = None) -> list[Request]:
    """The HF guide's windows: [begin, begin + block_size) every `stride` tokens, each scoring the
    tokens after the previous window's end; stops at the window that reaches the end (or at `limit`)."""
    out, prev_end, n = [], 0, len(ids)
    for begin in range(0, n, stride):
        end = min(begin + block_size, n)
        window = ids[begin:end]
        n_score = min(end - prev_end, len(window) - 1)  # token `begin` itself has no prediction
        if n_score > 0:
            out.append(Request(tuple(window), n_score))
        prev_end = end
        if end == n or len(out) == limit:
            break
    return out


def wikitext2(
    params,
    config,
    tokenizer,
    *,
    stride: int = 512,
    batch_size: int = 8,
    max_examples: int | None = None,
    path=None,
    data_dir=None,
    progress: bool = False,
    scorer=None,
) -> dict:
    """WikiText-2 test: HF-guide token perplexity at `stride`, plus lm-eval's `wikitext` numbers
    (BPE models). `max_examples` keeps the first N windows and the first N articles."""
    check_max_examples(max_examples)
    if stride < 1:
        from ..errors import JaxlmError

        raise JaxlmError(f"--stride must be >= 1, got {stride}")
    raw = read_wikitext(locate(WIKITEXT2, path, data_dir))
    scorer = scorer_for(params, config, batch_size, scorer)
    L = config.block_size
    stride = min(stride, L)  # a stride past the window would skip tokens
    text = hf_rows_text(raw)
    out: dict = {"window": L, "stride": stride}
    if not is_bpe(tokenizer):
        alphabet = set(tokenizer.chars)
        kept = "".join(ch for ch in text if ch in alphabet)
        out["dropped_chars"] = len(text) - len(kept)
        text = kept
    requests = stride_requests(tokenizer.encode(text), L, stride, limit=max_examples)
    scored = score(scorer, requests, progress, "wikitext2 windows")
    nll = -sum(s.total for s in scored)
    n_tokens = sum(r.n_score for r in requests)
    out.update(windows=len(requests), tokens_scored=n_tokens)
    if is_bpe(tokenizer):
        out["token_perplexity"] = math.exp(nll / n_tokens)
        out.update(_lm_eval_wikitext(raw, tokenizer, scorer, L, max_examples, progress))
    else:
        chars = [tokenizer.chars[t] for r in requests for t in r.tokens[-r.n_score :]]
        n_bytes = sum(len(ch.encode("utf-8")) for ch in chars)
        out.update(bits_per_byte=nll / n_bytes / math.log(2), bytes_scored=n_bytes)
    out["compiles"] = scorer.compiles
    return out


def _lm_eval_wikitext(raw, tokenizer, scorer, block_size, max_examples, progress) -> dict:
    pages = documents(raw)[:max_examples]
    per_page = [rolling_requests(tokenizer.encode(detokenize(p)), GPT2_EOT_ID, block_size) for p in pages]
    flat = [r for reqs in per_page for r in reqs]
    scored = iter(score(scorer, flat, progress, "wikitext2 documents"))
    loglik = sum(next(scored).total for reqs in per_page for _ in reqs)
    words = sum(len(re.split(r"\s+", p)) for p in pages)
    n_bytes = sum(len(p.encode("utf-8")) for p in pages)
    return {
        "documents": len(pages),
        "word_perplexity": math.exp(-loglik / words),
        "byte_perplexity": math.exp(-loglik / n_bytes),
        "bits_per_byte": -loglik / n_bytes / math.log(2),
    }
