"""jaxlm.eval against an independent computation: transformers PyTorch on the same random-init HF
checkpoints, with the HF tokenizer (tokenizer.json via `tokenizers`, not tiktoken), each method written out again here
from the harnesses' definitions, one sequence at a time."""

import bz2
import json
import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import tokenizers
import torch
from helpers import save_random_hf

import jaxlm
from jaxlm.cli import run_cli
from jaxlm.eval import Scorer, encode_pair, hellaswag, lambada, pair_request, rolling_requests, wikitext2
from jaxlm.eval.cli import main as eval_main
from jaxlm.eval.perplexity import detokenize, documents, hf_rows_text, stride_requests

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ASSETS = Path(jaxlm.__file__).parent / "assets"  # the same files as ../shared/data, bundled
EOT = 50256
TOK = None


def hf_tok():
    global TOK
    if TOK is None:
        path = SHARED / "gpt2_tokenizer" / "tokenizer.json"
        if path.is_file():
            TOK = tokenizers.Tokenizer.from_file(str(path))
        else:  # no ../shared here: the bundled ranks through `tokenizers`' own BPE (still not tiktoken)
            from transformers.convert_slow_tokenizer import TikTokenConverter

            from jaxlm.tokenizer import GPT2_PATTERN

            TOK = TikTokenConverter(
                vocab_file=str(ASSETS / "gpt2.tiktoken"),
                pattern=GPT2_PATTERN,
                extra_special_tokens={"<|endoftext|>": EOT},
            ).converted()
    return TOK


def enc(text):
    return hf_tok().encode(text).ids


# ---- the oracle: torch logits, one sequence at a time ------------------------------------------------------


def torch_logprobs(model, inputs):
    """log p(next token) at every position of `inputs`: [T, V] float64."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([inputs])).logits[0], -1).double()


def split(text):
    """lambada_openai's doc_to_text and doc_to_target."""
    return " ".join(text.split(" ")[:-1]), " " + text.split(" ")[-1]


def oracle_pair(model, block, context, continuation):
    """lm-eval loglikelihood: (sum of continuation log-probs, all greedy)."""
    if context == "":
        ctx, cont = [EOT], enc(continuation)
    else:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = enc(context)
        cont = enc(context + continuation)[len(ctx) :]
    seq = (ctx + cont)[-(block + 1) :]
    lp = torch_logprobs(model, seq[:-1])[-len(cont) :]
    target = torch.tensor(cont)
    return float(lp[torch.arange(len(cont)), target].sum()), bool((lp.argmax(-1) == target).all())


def oracle_hf_guide(model, ids, block, stride, max_windows=None):
    """The HF guide's loop (labels, -100, loss times tokens), each scored token counted once."""
    ids = torch.tensor([ids])
    nll_sum, n_tokens, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + block, ids.size(1))
        trg_len = end - prev_end
        inp = ids[:, begin:end]
        target = inp.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(inp, labels=target).loss
        # the loss averages the labels left after HF's shift; the guide's code weights it by
        # (target != -100).sum() - 1, one token fewer than that for every window after the first
        n = int((target[:, 1:] != -100).sum())
        nll_sum += float(loss) * n
        n_tokens += n
        prev_end = end
        windows += 1
        if end == ids.size(1) or windows == max_windows:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def oracle_rolling(model, ids, block):
    """Every token predicted once: the first block from [EOT] + tokens, then blocks of `block` tokens
    each conditioned on the token before them, the last (shorter) one on a full block of context."""
    total, done = 0.0, 0
    while done < len(ids):
        m = min(block, len(ids) - done)
        seq = ([EOT] + ids[:m]) if done == 0 else ids[done + m - block - 1 : done + m]
        lp = torch_logprobs(model, seq[:-1])[-m:]
        total += float(lp[torch.arange(m), torch.tensor(seq[-m:])].sum())
        done += m
    return total


# ---- fixtures ----------------------------------------------------------------------------------------------

SHAPES = {
    "L2H2D32T64": dict(n_layer=2, n_head=2, n_embd=32, n_positions=64),
    "L3H4D64T128": dict(n_layer=3, n_head=4, n_embd=64, n_positions=128),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    torch_model = save_random_hf(path, seed=len(request.param), **SHAPES[request.param])
    config, params, tok = jaxlm.load_with_tokenizer(path)
    return torch_model, config, params, jaxlm.tokenizer.from_spec(tok), path


# ---- tokenisation of pairs and windows --------------------------------------------------------------------


def test_encode_pair_moves_trailing_spaces_and_encodes_whole():
    tok = jaxlm.GPT2Tokenizer()
    assert encode_pair(tok, "Hello  ", "world", EOT) == (enc("Hello"), enc("  world"))
    # "hel" + "lo" is one token encoded whole: the continuation is what follows the context's tokens
    ctx, cont = encode_pair(tok, "The hel", "lo there", EOT)
    assert ctx == enc("The hel") and cont == enc("The hello there")[len(ctx) :]
    assert cont != enc("lo there")
    assert encode_pair(tok, "", " word", EOT) == ([EOT], enc(" word"))


def test_pair_truncation_keeps_last_block_tokens():
    r = pair_request(list(range(100)), [100, 101, 102], block_size=16)
    assert r.tokens == tuple(range(103 - 17, 103)) and r.n_score == 3  # the model reads the last 16
    with pytest.raises(ValueError):
        pair_request([1], list(range(17)), block_size=16)


def test_rolling_windows_are_lm_evals():
    # lm_eval/api/model.py's example: tokens 0..9, prefix EOS, max length 4
    got = [(r.tokens[:-1], r.tokens[-r.n_score :]) for r in rolling_requests(list(range(10)), -1, 4)]
    assert got == [((-1, 0, 1, 2), (0, 1, 2, 3)), ((3, 4, 5, 6), (4, 5, 6, 7)), ((5, 6, 7, 8), (8, 9))]


def test_stride_windows_score_each_token_once():
    for n, block, stride in [(50, 16, 5), (10, 16, 4), (33, 8, 3)]:
        scored = [t for r in stride_requests(list(range(n)), block, stride) for t in r.tokens[-r.n_score :]]
        assert scored == list(range(1, n))
    # stride == block: as in the guide, a window's first token has no context in it and is not scored
    scored = [t for r in stride_requests(list(range(50)), 16, 16) for t in r.tokens[-r.n_score :]]
    assert scored == [t for t in range(50) if t % 16]


# ---- parity with torch -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["L2H2D32T64"], indirect=True)  # one shape: the slowest oracle
def test_wikitext2_matches_torch(model):
    torch_model, config, params, tok, _ = model
    raw = (ASSETS / "wiki.test.raw").read_text()
    got = wikitext2(params, config, tok, stride=24, max_examples=3, batch_size=4)
    text = hf_rows_text(raw)
    ids = enc(text)
    assert ids == tok.encode(text)  # tiktoken and tokenizers agree on the whole text
    ppl, n = oracle_hf_guide(torch_model, ids, config.block_size, 24, max_windows=3)
    assert got["tokens_scored"] == n == 63 + 24 + 24 and got["windows"] == 3
    assert got["token_perplexity"] == pytest.approx(ppl, rel=1e-4)
    pages = documents(raw)[:3]
    assert len(documents(raw)) == 62 and pages[0].startswith(" = Robert Boulter = \n")
    loglik = sum(oracle_rolling(torch_model, enc(detokenize(p)), config.block_size) for p in pages)
    words = sum(len(re.split(r"\s+", p)) for p in pages)
    n_bytes = sum(len(p.encode()) for p in pages)
    assert got["word_perplexity"] == pytest.approx(math.exp(-loglik / words), rel=1e-4)
    assert got["byte_perplexity"] == pytest.approx(math.exp(-loglik / n_bytes), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(-loglik / n_bytes / math.log(2), rel=1e-4)
    assert got["compiles"] <= 4  # stride: one shape per scored-length bucket; rolling: one or two more


def test_lambada_matches_torch(model):
    torch_model, config, params, tok, _ = model
    texts = [json.loads(line)["text"] for line in (ASSETS / "lambada_test.jsonl").open()][:24]
    got = lambada(params, config, tok, max_examples=24, batch_size=8)
    ref = [
        oracle_pair(torch_model, config.block_size, " ".join(t.split(" ")[:-1]), " " + t.split(" ")[-1]) for t in texts
    ]
    assert got["details"]["greedy"] == [g for _, g in ref]
    np.testing.assert_allclose(got["details"]["loglik"], [ll for ll, _ in ref], rtol=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(-np.mean([ll for ll, _ in ref])), rel=1e-4)
    assert got["acc"] == np.mean([g for _, g in ref])


def test_greedy_flag_is_per_token_argmax(model):
    """A random model gets LAMBADA all wrong, so build continuations it does predict (its own greedy
    tokens, from torch) and ones that are wrong only at their last token."""
    torch_model, config, params, tok, _ = model
    cases = []
    for prompt in ["The quick brown fox", "In 1999, the", "She said that"]:
        ids = enc(prompt)
        greedy = []
        for _ in range(3):
            greedy.append(int(torch_logprobs(torch_model, ids + greedy)[-1].argmax()))
        cases += [(ids, greedy, True), (ids, greedy[:2] + [(greedy[2] + 1) % 50257], False)]
    scored = Scorer(params, config, batch_size=4).score([pair_request(c, g, config.block_size) for c, g, _ in cases])
    assert [s.is_greedy for s in scored] == [want for *_, want in cases]
    assert [bool(s.greedy[0]) for s in scored] == [True] * len(cases)


def test_hellaswag_matches_torch(model):
    torch_model, config, params, tok, _ = model
    lines = bz2.decompress((ASSETS / "hellaswag_val_full.txt.bz2").read_bytes()).decode().split("\n")
    n = 4
    got = hellaswag(params, config, tok, max_examples=n, batch_size=8)
    preds = {"acc": [], "acc_norm": [], "acc_norm_tokens": []}
    for i in range(n):
        context, label, endings = lines[6 * i], int(lines[6 * i + 1]), lines[6 * i + 2 : 6 * i + 6]
        sums = np.array([oracle_pair(torch_model, config.block_size, context, " " + e)[0] for e in endings])
        ntok = np.array([len(enc(context + " " + e)) - len(enc(context)) for e in endings])
        preds["acc"].append(int(sums.argmax()))
        preds["acc_norm"].append(int((sums / np.array([len(e) for e in endings])).argmax()))
        preds["acc_norm_tokens"].append(int((sums / ntok).argmax()))
        assert label in range(4)
    assert got["details"] == preds
    gold = [int(lines[6 * i + 1]) for i in range(n)]
    for metric in preds:
        assert got[metric] == np.mean(np.array(preds[metric]) == gold)


def test_gpt2_124m_shape_lambada_matches_torch(tmp_path):
    torch_model = save_random_hf(tmp_path, seed=3)  # GPT-2 124M: 12 layers, 768 wide, block 1024
    config, params, tok = jaxlm.load_with_tokenizer(tmp_path)
    tok = jaxlm.tokenizer.from_spec(tok)
    assert (config.n_layer, config.n_embd, config.block_size) == (12, 768, 1024)
    texts = [json.loads(line)["text"] for line in (ASSETS / "lambada_test.jsonl").open()][:4]
    got = lambada(params, config, tok, max_examples=4, batch_size=4)
    ref = [oracle_pair(torch_model, 1024, *split(t)) for t in texts]
    np.testing.assert_allclose(got["details"]["loglik"], [ll for ll, _ in ref], rtol=1e-4)
    assert got["details"]["greedy"] == [g for _, g in ref]


# ---- the command line and bad input ------------------------------------------------------------------------


def cli(capsys, *argv):
    rc = run_cli(eval_main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("model", ["L2H2D32T64"], indirect=True)  # the command line is the same for every shape
def test_cli_runs_all_tasks_and_writes_json(model, tmp_path, capsys):
    *_, config, _, _, path = model
    rc, out, err = cli(capsys, path, "--max-examples", 2, "--output", tmp_path / "r.json", "--no-progress")
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["tasks"]) == {"wikitext2", "lambada", "hellaswag"}
    assert report["tasks"]["lambada"]["examples"] == 2 and report["tasks"]["hellaswag"]["examples"] == 2
    assert report["kernels"]["attention"] == "cpu_blocked" and report["kernels"]["why"]["eval_head"]  # what ran
    assert "token_perplexity" in out and "acc_norm_tokens" in out and "compiles" in out


@pytest.mark.parametrize("model", ["L2H2D32T64"], indirect=True)
def test_cli_allocator_choice_changes_no_number(model, tmp_path, capsys):
    """--return-freed-memory only leaves glibc's malloc alone (tests/test_allocator.py checks what the default
    sets); the scores are the same either way."""
    *_, path = model
    reports = []
    for extra in ([], ["--return-freed-memory"]):
        out = tmp_path / f"r{len(extra)}.json"
        rc, _, err = cli(capsys, path, "--task", "lambada", "--max-examples", 3, "--output", out, *extra)
        assert rc == 0, err
        reports.append(json.loads(out.read_text())["tasks"]["lambada"])
    for r in reports:
        r.pop("seconds")
    assert reports[0] == reports[1] and reports[0]["examples"] == 3


@pytest.mark.parametrize("model", ["L2H2D32T64"], indirect=True)
def test_cli_adapter_scores_the_model_peft_merges(model, tmp_path, capsys):
    """--adapter DIR (written by peft's save_pretrained) scores what peft's own merge_and_unload gives,
    and not the base."""
    import peft
    import transformers

    *_, path = model
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel.from_pretrained(path)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    reports = {}
    for name, argv in {
        "adapter": [path, "--adapter", tmp_path / "adapter"],
        "merged": [tmp_path / "merged"],
        "base": [path],
    }.items():
        out = tmp_path / f"{name}.json"
        rc, _, err = cli(capsys, *argv, "--task", "wikitext2,lambada", "--max-examples", 3, "--output", out)
        assert rc == 0, err
        reports[name] = json.loads(out.read_text())["tasks"]
    for task, key in (("wikitext2", "token_perplexity"), ("lambada", "perplexity")):
        got, want, base_value = (reports[n][task][key] for n in ("adapter", "merged", "base"))
        assert abs(got - want) <= 1e-4 * want and abs(base_value - want) > 1e-3 * want, (task, got, want, base_value)
    assert reports["adapter"]["lambada"]["acc"] == reports["merged"]["lambada"]["acc"]
    rc, _, err = cli(capsys, path, "--adapter", tmp_path / "missing", "--task", "lambada")
    assert rc == 2 and err.startswith("error: ") and "missing" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--task", "lambda"],
            "unknown task 'lambda'; choose from wikitext2, lambada, hellaswag, summarize, translate, qa, all",
        ),
        (["--max-examples", "0"], "--max-examples must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--task", "lambada=NOFILE"], "dataset file NOFILE not found"),
        (["--task", "hellaswag", "--data-dir", "."], "hellaswag_val_full.txt.bz2 not found"),
    ],
)
def test_cli_bad_input_is_one_line(model, capsys, argv, message):
    *_, path = model
    rc, out, err = cli(capsys, path, *argv)
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_max_examples_zero_subprocess():
    from helpers import run_py

    r = run_py("-m", "jaxlm.eval", "gpt2", "--max-examples", "0")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --max-examples must be >= 1 (or left out for all), got 0"
    ]


def test_malformed_dataset_files(model, tmp_path, capsys):
    *_, path = model
    bad = tmp_path / "lambada_test.jsonl"
    bad.write_text('{"text": "a b c"}\n{"text": 3}\n')
    rc, _, err = cli(capsys, path, "--task", f"lambada={bad}")
    assert rc == 2 and f"{bad} line 2: expected an object" in err
    bad.write_text('{"text": "a b c"\n')
    rc, _, err = cli(capsys, path, "--task", f"lambada={bad}")
    assert rc == 2 and "line 1: not JSON" in err
    hs = tmp_path / "hs.txt"
    hs.write_text("ctx\n1\na\nb\nc\n")
    rc, _, err = cli(capsys, path, "--task", f"hellaswag={hs}")
    assert rc == 2 and "5 lines, not a multiple of 6" in err
    hs.write_text("ctx\n7\na\nb\nc\nd\n")
    rc, _, err = cli(capsys, path, "--task", f"hellaswag={hs}")
    assert rc == 2 and "line 2: label '7' is not 0-3" in err
    bz = tmp_path / "hs.txt.bz2"
    bz.write_bytes(b"not bzip2")
    rc, _, err = cli(capsys, path, "--task", f"hellaswag={bz}")
    assert rc == 2 and "cannot read it as bzip2-compressed UTF-8 text" in err


def test_char_model_gets_bits_per_byte_only(tmp_path, capsys):
    chars = "".join(sorted(set((ASSETS / "tinyshakespeare.txt").read_text())))
    tok = jaxlm.CharTokenizer(chars)
    config = jaxlm.GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    jaxlm.save(tmp_path / "char", config, jaxlm.init_params(config, jax.random.key(0)), tok)
    rc, _, err = cli(capsys, tmp_path / "char", "--task", "lambada")
    assert rc == 2 and "lambada need GPT-2's BPE tokenizer; this model is char-level" in err
    rc, out, err = cli(capsys, tmp_path / "char", "--max-examples", "5", "--output", tmp_path / "r.json")
    assert rc == 0 and "lambada, hellaswag skipped" in err
    metrics = json.loads((tmp_path / "r.json").read_text())["tasks"]
    assert list(metrics) == ["wikitext2"]
    wt = metrics["wikitext2"]
    assert wt["stride"] == 32 and wt["windows"] == 5 and wt["tokens_scored"] == 5 * 31
    assert wt["dropped_chars"] > 0  # digits, '@', '=' are not in Shakespeare's alphabet
    assert 0 < wt["bits_per_byte"] < 10 and "token_perplexity" not in wt


def test_token_limit_changes_batches_not_scores():
    """On a CPU a batch holds at most CPU_BATCH_TOKENS padded tokens; the scores stay what wide batches give."""
    import flax.linen as nn

    from jaxlm.eval.loglik import CPU_BATCH_TOKENS, Request

    config = jaxlm.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=128, vocab_size=97)
    params = nn.unbox(jaxlm.GPT(config).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    rng = np.random.default_rng(0)
    reqs = [Request(tuple(rng.integers(0, 97, n + 1).tolist()), min(n, 5)) for n in (128, 100, 60, 30, 20, 9, 3)]
    capped, wide = (
        Scorer(params, config, batch_size=8, batch_tokens=64),
        Scorer(params, config, batch_size=8, batch_tokens=0),
    )
    a, b = capped.score(reqs), wide.score(reqs)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.logprobs, y.logprobs, rtol=1e-5, atol=1e-6)
        assert (x.greedy == y.greedy).all()
    assert all(B * T <= 64 or B == 1 for B, T, _ in capped.shapes) and {B for B, *_ in capped.shapes} == {1, 2, 4}
    assert {B for B, *_ in wide.shapes} == {8}
    assert Scorer(params, config).batch_tokens == CPU_BATCH_TOKENS  # this machine's default
    with pytest.raises(ValueError, match="batch_tokens must be >= 0"):
        Scorer(params, config, batch_tokens=-1)


def test_head_chunks_and_first_max_equal_logsumexp_and_argmax():
    """Row groups (with a padded last group), vocabulary chunks (with a shorter last chunk, or none) and
    the first-index-of-the-max test give what jax.nn.logsumexp and jnp.argmax give, ties included, within
    a chunk and across chunks (argmax takes the first of equal maxima)."""
    import jax.numpy as jnp

    from jaxlm.cpu.eval_head import score_targets
    from jaxlm.kernels import resolve

    rng = np.random.default_rng(0)
    N, D, V = 300, 16, 1000  # 300 rows: full chunks of 64 or 128 and a padded one
    # Small integers: every logit is exact whatever order a matmul sums in, so ties are ties on any CPU.
    hidden = rng.integers(-3, 4, (N, D)).astype(np.float32)
    wte = rng.integers(-3, 4, (V, D)).astype(np.float32)
    wte[3] = 3 * rng.choice([-1, 1], D)  # the longest row a [-3, 3] vocabulary can have: rows 10 * wte[3] max at 3
    wte[7] = wte[900] = wte[3]  # rows whose max is at 3 hold it at 7 and 900 too: argmax says 3
    hidden[40:50] = 10 * wte[3]
    logits = hidden @ wte.T
    targets = rng.integers(0, V, N).astype(np.int32)
    am = logits.argmax(-1)
    targets[:40] = am[:40]  # some targets are the argmax
    tied = np.flatnonzero(am == 3)
    targets[tied] = 7
    targets[tied[::2]] = 900
    targets[tied[1::4]] = 3
    want_lp = np.asarray(jnp.take_along_axis(logits, targets[:, None], -1)[:, 0] - jax.nn.logsumexp(logits, -1))
    want_greedy = np.asarray(jnp.argmax(logits, -1)) == targets
    assert len(tied) >= 10 and want_greedy.sum() >= 30 and (want_greedy[tied] == (targets[tied] == 3)).all()
    assert resolve().eval_head == "cpu_chunked"  # this machine's programs take the chunked forms
    forms = [(None, 128), (128, 128), (64, 250), (512, 128), (512, 250), (512, 1000)]
    for rows, chunk in forms:
        lp, greedy = jax.jit(score_targets, static_argnums=(3, 4))(hidden, wte, targets, rows, chunk)
        np.testing.assert_allclose(np.asarray(lp), want_lp, rtol=1e-6, atol=1e-5, err_msg=f"{rows}, {chunk}")
        assert (np.asarray(greedy) == want_greedy).all(), (rows, chunk)
