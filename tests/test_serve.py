"""python -m jaxlm.serve driven by the real `openai` client and httpx: the OpenAI contract, streaming, stop
strings, log-probs against jaxlm.eval, greedy against jaxlm.generate, outputs independent of the load,
bad input, a full queue, clients that leave, and the web page in a headless browser."""

import asyncio
import json
import re

import httpx
import numpy as np
import openai
import pytest
from cdp import Browser, find_chromium
from serve_helpers import KEY, serve_cache, start, tiny_model  # noqa: F401  (fixtures)

import jaxlm
from jaxlm.eval.lambada import split_example
from jaxlm.eval.loglik import encode_pair
from jaxlm.tokenizer import GPT2_EOT_ID, GPT2Tokenizer

MODEL = "tiny"
SLOTS, MAX_LEN, MAX_QUEUE = 8, 128, 48
TOK = GPT2Tokenizer()
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["Once upon a time", "The meaning of life is", "To be, or not to be", "In 1905 Einstein", "Hello"]


@pytest.fixture(scope="module")
def server(tiny_model, serve_cache, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("serve") / "server.log"
    s = start(tiny_model, "--slots", SLOTS, "--max-len", MAX_LEN, "--api-key", KEY, "--max-queue", MAX_QUEUE,
              "--model-name", MODEL, cache=serve_cache, log=log)  # fmt: skip
    yield s
    assert s.stop() == 0, s.text()[-2000:]
    assert "Traceback" not in s.text(), s.text()[-4000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(tiny_model):  # noqa: F811
    return jaxlm.load(tiny_model)


_HTTP = {}


def _http(server) -> httpx.Client:
    """One client for the module: a new httpx.Client costs a few hundred ms (its SSL context)."""
    if server.url not in _HTTP:
        _HTTP[server.url] = httpx.Client(base_url=server.url, timeout=60)
    return _HTTP[server.url]


def post(server, path, body, headers=AUTH, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _http(server).post(path, content=data, headers={"content-type": "application/json", **headers}, **kw)


def health(server):
    return _http(server).get("/health").json()


def metric(server, name, **labels) -> float:
    text = _http(server).get("/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def stream_choices(chunks):
    """Joined text, finish reasons and the position of each finish, per choice index, from streamed chunks."""
    texts, finishes, last = {}, {}, {}
    for k, ch in enumerate(chunks):
        for c in ch.choices:
            text = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + text
            last[c.index] = k
            if c.finish_reason is not None:
                finishes.setdefault(c.index, []).append((k, c.finish_reason))
    return texts, finishes, last


# ---- the contract ------------------------------------------------------------------------------------------


def test_stream_equals_whole_one_finish_reason_exact_usage(client):
    for prompt in PROMPTS[:3]:
        whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))  # fmt: skip
        texts, finishes, last = stream_choices(chunks)
        assert texts[0] == whole.choices[0].text and whole.choices[0].text
        assert finishes[0] == [(last[0], whole.choices[0].finish_reason)]  # once, in the choice's last chunk
        assert len({c.id for c in chunks}) == 1
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        assert all(c.usage is None for c in chunks[:-1])
        n_prompt = len(TOK.encode(prompt))
        done = whole.choices[0].finish_reason == "length"
        assert whole.usage.prompt_tokens == n_prompt
        assert whole.usage.completion_tokens == 12 if done else whole.usage.completion_tokens <= 12
        assert whole.usage.total_tokens == n_prompt + whole.usage.completion_tokens


def test_chat_stream_equals_whole_role_first(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    texts, finishes, last = stream_choices(chunks)
    assert whole.choices[0].message.role == "assistant"
    assert texts[0] == whole.choices[0].message.content
    assert finishes[0] == [(last[0], whole.choices[0].finish_reason)]
    assert "User:" not in texts[0]  # the plain template's reply ends before the next user turn
    prompt = "System: Be brief.\nUser: Tell me a story.\nAssistant:"
    assert whole.usage.prompt_tokens == len(TOK.encode(prompt)) == chunks[-1].usage.prompt_tokens


def test_n_choices_differ_seeds_repeat(client):
    def texts(seed, stream=False):
        r = client.completions.create(model=MODEL, prompt="The cat", max_tokens=10, n=3, temperature=1.0,
                                      seed=seed, stream=stream)  # fmt: skip
        if stream:
            return [t for _, t in sorted(stream_choices(list(r))[0].items())]
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    a = texts(7)
    assert len(set(a)) == 3
    assert texts(7) == a == texts(7, stream=True)
    assert texts(8) != a


def test_stop_strings_across_token_boundaries_never_leak(client):
    base = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=30, temperature=0, logprobs=0)
    pieces, full = base.choices[0].logprobs.tokens, base.choices[0].text
    i = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]  # ends inside one token, starts inside the one before
    expected = full[: full.find(stop)]
    never = pieces[i][-2:] + "\u00a7\u00a7"  # starts like a stop string, never completes one
    for stops in ([stop], [never, stop], [stop, "zzqx"]):
        whole = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=stops)
        assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
        chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                                stop=stops, stream=True))  # fmt: skip
        texts, finishes, _ = stream_choices(chunks)
        assert texts[0] == expected and [f for _, f in finishes[0]] == ["stop"]
    held = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=[never])
    assert held.choices[0].text == full  # what was held back is released at the end


def test_echo_logprobs_equal_jaxlm_eval(server, model, tmp_path):
    config, params = model
    texts = ["the quick brown fox jumps over the lazy dog", "we went down to the river and saw a boat",
             "she opened the door and said hello"]  # fmt: skip
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ref = jaxlm.eval.lambada(params, config, TOK, path=path, batch_size=4)["details"]
    pairs = [encode_pair(TOK, *split_example(t), GPT2_EOT_ID) for t in texts]
    # lm-evaluation-harness's local-completions payload, verbatim
    body = {"model": MODEL, "prompt": [c + x for c, x in pairs], "max_tokens": 1, "temperature": 0, "logprobs": 1,
            "seed": 1234, "echo": True}  # fmt: skip
    out = post(server, "/v1/completions", body).json()
    for choice, (ctx, cont), loglik, greedy in zip(sorted(out["choices"], key=lambda c: c["index"]), pairs,
                                                   ref["loglik"], ref["greedy"], strict=True):  # fmt: skip
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ctx) + len(cont) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        span = slice(len(ctx), len(ctx) + len(cont))
        assert sum(lp["token_logprobs"][span]) == pytest.approx(loglik, abs=1e-5)
        scored = zip(lp["token_logprobs"][span], lp["top_logprobs"][span], strict=True)
        is_greedy = all(t == max(top.values()) for t, top in scored)
        assert is_greedy == greedy
        assert choice["text"].startswith(TOK.decode(ctx + cont))


def test_greedy_equals_jaxlm_generate(client, model):
    config, params = model
    prompts = [TOK.encode(p) for p in PROMPTS]
    expected = jaxlm.generate(params, config, prompts, max_new_tokens=24, do_sample=False)
    for ids, want in zip(prompts, expected, strict=True):
        got = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0).choices[0]
        assert got.text == TOK.decode([t for t in want if t != GPT2_EOT_ID])
        assert got.finish_reason == ("stop" if want[-1] == GPT2_EOT_ID else "length")


def _mixed_requests():
    """32 requests of every kind: greedy, seeded draws (top-p, top-k), penalties, n = 2, prompts of any length."""
    out = []
    for i in range(32):
        body = {"model": MODEL, "prompt": PROMPTS[i % 5] + " and" * (i % 6), "max_tokens": 8 + i % 9}
        kind = i % 4
        if kind == 0:
            body["temperature"] = 0
        elif kind == 1:
            body.update(temperature=0.9, top_p=0.9, seed=100 + i)
        elif kind == 2:
            body.update(temperature=0, frequency_penalty=0.8, presence_penalty=0.5)
        else:
            body.update(temperature=1.2, top_k=40, seed=i, n=2, frequency_penalty=0.3)
        out.append(body)
    return out


def test_outputs_do_not_depend_on_the_load(server):
    bodies = _mixed_requests()

    def texts(r):
        return [c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])]

    alone = [texts(post(server, "/v1/completions", b).json()) for b in bodies]

    async def together():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as c:
            rs = await asyncio.gather(*(c.post(server.url + "/v1/completions", json=b) for b in bodies))
        return [texts(r.json()) for r in rs]

    busiest = []

    async def watch():
        async with httpx.AsyncClient(timeout=10) as c:
            for _ in range(40):
                busiest.append((await c.get(server.url + "/health")).json()["slots_busy"])
                await asyncio.sleep(0.01)

    async def both():
        return (await asyncio.gather(together(), watch()))[0]

    loaded = asyncio.run(both())
    assert loaded == alone
    assert max(busiest) > 1  # they were decoded side by side
    n2 = [t for b, t in zip(bodies, alone, strict=True) if b.get("n") == 2]
    assert all(a != b for a, b in n2)


# ---- bad input ---------------------------------------------------------------------------------------------

GOOD = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
BAD = [
    ("bad JSON", b'{"model": "tiny", "prompt": ', AUTH, 400, None),
    ("not an object", b"[1, 2]", AUTH, 400, None),
    ("no model", {"prompt": "Hi"}, AUTH, 400, "model"),
    ("no prompt", {"model": MODEL}, AUTH, 400, "prompt"),
    ("max_tokens a string", {**GOOD, "max_tokens": "16"}, AUTH, 400, "max_tokens"),
    ("max_tokens negative", {**GOOD, "max_tokens": -1}, AUTH, 400, "max_tokens"),
    ("max_tokens zero", {**GOOD, "max_tokens": 0}, AUTH, 400, "max_tokens"),
    ("max_tokens huge", {**GOOD, "max_tokens": 10**9}, AUTH, 400, "max_tokens"),
    ("temperature < 0", {**GOOD, "temperature": -0.5}, AUTH, 400, "temperature"),
    ("temperature a string", {**GOOD, "temperature": "hot"}, AUTH, 400, "temperature"),
    ("top_p > 1", {**GOOD, "top_p": 1.5}, AUTH, 400, "top_p"),
    ("top_p 0", {**GOOD, "top_p": 0}, AUTH, 400, "top_p"),
    ("top_k < -1", {**GOOD, "top_k": -5}, AUTH, 400, "top_k"),
    ("n = 0", {**GOOD, "n": 0}, AUTH, 400, "n"),
    ("5 stop strings", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, AUTH, 400, "stop"),
    ("empty stop string", {**GOOD, "stop": [""]}, AUTH, 400, "stop"),
    ("logprobs 6", {**GOOD, "logprobs": 6}, AUTH, 400, "logprobs"),
    ("presence_penalty 3", {**GOOD, "presence_penalty": 3}, AUTH, 400, "presence_penalty"),
    ("seed a float", {**GOOD, "seed": 1.5}, AUTH, 400, "seed"),
    ("stream_options without stream", {**GOOD, "stream_options": {"include_usage": True}}, AUTH, 400, None),
    ("logit_bias", {**GOOD, "logit_bias": {"50256": -100}}, AUTH, 400, None),
    ("unknown model", {**GOOD, "model": "gpt-9"}, AUTH, 404, "model"),
    ("context overflow", {**GOOD, "prompt": "hello " * 200}, AUTH, 400, "max_tokens"),
    ("empty prompt", {**GOOD, "prompt": ""}, AUTH, 400, "prompt"),
    ("empty prompt list", {**GOOD, "prompt": []}, AUTH, 400, "prompt"),
    ("token id outside the vocabulary", {**GOOD, "prompt": [15496, 50257]}, AUTH, 400, "prompt"),
    ("negative token id", {**GOOD, "prompt": [-1, 2]}, AUTH, 400, "prompt"),
    ("mixed prompt list", {**GOOD, "prompt": [1, "a"]}, AUTH, 400, "prompt"),
    ("no API key", GOOD, {}, 401, None),
    ("wrong API key", GOOD, {"Authorization": "Bearer nope"}, 401, None),
    ("oversized body", {**GOOD, "prompt": "x" * (5 << 20)}, AUTH, 413, None),
]


@pytest.mark.parametrize("name,body,headers,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_in_openais_shape_and_the_server_keeps_serving(server, name, body, headers, status, param):
    r = post(server, "/v1/completions", body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if name in ("max_tokens huge", "context overflow"):
        assert re.search(rf"{MAX_LEN} tokens.*prompt 0 has \d+ tokens and max_tokens is \d+", err["message"])
    assert post(server, "/v1/completions", GOOD).status_code == 200


def test_bad_chat_and_routes(server, client):
    msgs = [{"role": "user", "content": "Hi"}]
    for body, status in [
        ({"model": MODEL, "messages": []}, 400),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "Hi"}]}, 400),
        ({"model": MODEL, "messages": msgs, "top_logprobs": 2}, 400),
        ({"model": MODEL, "messages": "Hi"}, 400),
    ]:
        r = post(server, "/v1/chat/completions", body)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    r = _http(server).get("/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and "error" in r.json()
    r = _http(server).get("/v1/completions", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()
    r = post(server, "/v1/completions", json.dumps(GOOD).encode(), headers={**AUTH, "content-type": "text/plain"})
    assert r.status_code == 400 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="Hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="Hi", logprobs=6)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text


def test_queue_full_is_429_with_retry_after(server, client):
    with httpx.Client(timeout=60, headers=AUTH) as c:
        body = {"model": MODEL, "prompt": "Go", "max_tokens": 100, "n": SLOTS + MAX_QUEUE, "stream": True}
        with c.stream("POST", server.url + "/v1/completions", json=body) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the response (the client leaves)
            next(lines)  # submitted: its slots are busy, the rest of its choices fill the queue
            r = c.post(server.url + "/v1/completions", json=GOOD)
            assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                client.completions.create(**GOOD)
    _wait_idle(server)
    assert post(server, "/v1/completions", GOOD).status_code == 200


def _wait_idle(server, timeout=30):
    for _ in range(int(timeout / 0.05)):
        h = health(server)
        if h["slots_busy"] == 0 and h["queue"] == 0:
            return h
        asyncio.run(asyncio.sleep(0.05))
    raise AssertionError(f"slots still busy: {h}")


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "not-streaming"])
def test_a_client_that_leaves_frees_its_slots(server, stream):
    _wait_idle(server)
    before = metric(server, "jaxlm_choices_total", finish="cancelled")
    body = {"model": MODEL, "prompt": "Go", "max_tokens": 120, "n": SLOTS, "temperature": 0, "stream": stream}
    with httpx.Client(headers=AUTH) as c:
        if stream:
            with c.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                next(lines)
                assert health(server)["slots_busy"] > 0
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.1))
    _wait_idle(server)
    assert metric(server, "jaxlm_choices_total", finish="cancelled") == before + SLOTS


def test_health_models_metrics_tokenizer(server, client):
    h = health(server)
    assert h["status"] == "ok" and h["slots"] == SLOTS and {"slots_busy", "slots_free", "queue"} <= set(h)
    assert [m.id for m in client.models.list().data] == [MODEL]
    text = _http(server).get("/metrics").text
    for name in ("jaxlm_requests_total", "jaxlm_completion_tokens_total", "jaxlm_time_to_first_token_seconds_bucket",
                 "jaxlm_time_per_output_token_seconds_bucket", "jaxlm_queue_depth", "jaxlm_slots_in_use"):  # fmt: skip
        assert name in text
    info = _http(server).get("/tokenizer_info", headers=AUTH).json()
    assert info["eos_token"] == "<|endoftext|>"
    ids = post(server, "/tokenize", {"prompt": "Hello world<|endoftext|>"}).json()["tokens"]
    assert ids == TOK.encode("Hello world<|endoftext|>") and ids[-1] == GPT2_EOT_ID
    assert post(server, "/detokenize", {"tokens": ids}).json()["prompt"] == "Hello world<|endoftext|>"


def test_logprobs_shapes(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4 and top[tok] == value == max(top.values())  # greedy: the chosen is the top
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
    if not any("\ufffd" in t for t in lp.tokens):  # a token may end inside a character
        assert "".join(lp.tokens) == r.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)


# ---- the page ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium (apt-get install chromium-headless-shell)")
def test_the_page_streams_a_completion_in_a_browser(server, client):
    page_html = _http(server).get("/").text
    assert "http://" not in page_html.replace(server.url, "") and "https://" not in page_html  # works offline
    expected = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0)
    with Browser() as b:
        page = b.new_page(server.url + "/")
        page.wait_for("document.querySelector('#health').textContent.includes('slots')", timeout=20)
        page.type_into("#prompt", "Once upon a time")
        page.type_into("#max_tokens", "40")
        page.type_into("#temperature", "0")
        page.type_into("#key", KEY)
        page.click("#go")
        page.wait_for("['done', 'error'].some(s => document.querySelector('#status').textContent.startsWith(s))",
                      timeout=60)  # fmt: skip
        assert page.text("#status") == "done"
        assert page.text("#out") == "Once upon a time" + expected.choices[0].text
        assert page.console_errors() == []
