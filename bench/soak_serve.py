"""Soak: thousands of mixed requests against python -m jaxlm.serve; nothing may leak, hang or go wrong.

    python bench/soak_serve.py                        # 2000 requests, 32 at a time, random GPT-2 124M
    python bench/soak_serve.py --requests 200 --model DIR

Each request draws its settings at random: completions or chat, streamed or not, a prompt of 1-400 characters
from Tiny Shakespeare (or token ids), max_tokens 1-64, greedy or sampled (temperature, top-p, top-k, seed),
penalties, n 1-3, stop strings, logprobs, echo. 10% of the clients leave mid-stream (after a few chunks) and 5%
send a malformed body. Checked: every well-formed request is answered 200 with exact usage, one finish
reason per choice (stop or length), streams that end in [DONE]; every malformed one gets a 4xx in OpenAI's
shape; afterwards no slot is busy and nothing is queued; a sample of the greedy and seeded requests, sent
again alone on the idle server, returns the same text as under load; the server's resident memory after the
soak (and a pause) is within 5% of what it was after a warm-up. Results: bench/results/serve_soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path

import httpx
import record
from bench_serve import DATA, Server, jaxlm_server, make_model

MALFORMED = [
    b'{"model": "bench", "prompt": ',
    b"[]",
    b'{"model": "bench"}',
    b'{"model": "bench", "prompt": "hi", "max_tokens": "8"}',
    b'{"model": "bench", "prompt": "hi", "temperature": -1}',
    b'{"model": "bench", "prompt": "hi", "top_p": 2}',
    b'{"model": "bench", "prompt": "hi", "n": 0}',
    b'{"model": "bench", "prompt": "hi", "logprobs": 9}',
    b'{"model": "bench", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}',
    b'{"model": "nope", "prompt": "hi"}',
    b'{"model": "bench", "prompt": [50257]}',
    b'{"model": "bench", "prompt": ""}',
    b'{"model": "bench", "prompt": "hi", "max_tokens": 100000}',
    b'{"model": "bench", "messages": []}',
]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def draw_request(rng: random.Random, text: str, max_chars: int) -> dict:
    chat = rng.random() < 0.25
    start = rng.randrange(len(text) - max_chars)
    prompt = text[start : start + rng.randint(1, max_chars)]
    body = {"model": "bench", "max_tokens": rng.randint(1, 64), "stream": rng.random() < 0.6}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    elif rng.random() < 0.1:
        body["prompt"] = [rng.randrange(50257) for _ in range(rng.randint(1, 40))]
    else:
        body["prompt"] = prompt
    if rng.random() < 0.4:
        body["temperature"] = 0
    else:
        body.update(temperature=round(rng.uniform(0.3, 1.5), 2), seed=rng.randrange(2**31))
        if rng.random() < 0.4:
            body["top_p"] = round(rng.uniform(0.5, 1.0), 2)
        if rng.random() < 0.3:
            body["top_k"] = rng.randint(1, 200)
    if rng.random() < 0.2:
        body["frequency_penalty"] = round(rng.uniform(-1, 1.5), 2)
        body["presence_penalty"] = round(rng.uniform(-1, 1.5), 2)
    if rng.random() < 0.2:
        body["n"] = rng.randint(2, 3)
    if rng.random() < 0.2:
        body["stop"] = rng.sample(["\n", ".", " the", ",", "and", "e"], rng.randint(1, 3))
    if rng.random() < 0.15:
        if chat:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
        else:
            body["logprobs"] = rng.randint(0, 5)
            body["echo"] = rng.random() < 0.5
    if body["stream"] and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return body


def check_whole(body: dict, out: dict, problems: list):
    n = body.get("n", 1)  # one prompt per request here
    choices = sorted(out["choices"], key=lambda c: c["index"])
    if [c["index"] for c in choices] != list(range(n)):
        problems.append(f"choices {[c['index'] for c in choices]} for n={n}")
    for c in choices:
        if c["finish_reason"] not in ("stop", "length"):
            problems.append(f"finish_reason {c['finish_reason']}")
    u = out["usage"]
    if (
        u["total_tokens"] != u["prompt_tokens"] + u["completion_tokens"]
        or u["completion_tokens"] > n * body["max_tokens"]
    ):
        problems.append(f"usage {u}")
    if all(c["finish_reason"] == "length" for c in choices) and u["completion_tokens"] != n * body["max_tokens"]:
        problems.append(f"usage {u} with every choice at its length ({n} x {body['max_tokens']})")


def text_of(choices) -> list[str]:
    return [c.get("text", c.get("message", {}).get("content")) for c in sorted(choices, key=lambda c: c["index"])]


async def send(client: httpx.AsyncClient, url: str, body: dict, leave: bool, problems: list) -> list[str] | None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    if not body["stream"]:
        r = await client.post(url + path, json=body)
        if r.status_code != 200:
            problems.append(f"{r.status_code} {r.text[:200]} for {body}")
            return None
        out = r.json()
        check_whole(body, out, problems)
        return text_of(out["choices"])
    texts, finishes, usage, done, seen = {}, {}, None, False, 0
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            problems.append(f"{r.status_code} for {body}")
            return None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                problems.append(f"stream error {chunk}")
            for c in chunk["choices"]:
                piece = c["text"] if "text" in c else c["delta"].get("content") or ""
                texts[c["index"]] = texts.get(c["index"], "") + piece
                if c["finish_reason"] is not None:
                    finishes.setdefault(c["index"], []).append(c["finish_reason"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            seen += 1
            if leave and seen >= 3:
                return None  # the client leaves mid-stream (the connection closes here)
    n = body.get("n", 1)
    if not done or sorted(finishes) != list(range(n)) or any(len(f) != 1 for f in finishes.values()):
        problems.append(f"stream: done={done} finishes={finishes} for n={n}")
    if body.get("stream_options") and (
        usage is None or usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]
    ):
        problems.append(f"stream usage {usage}")
    return [texts.get(i, "") for i in range(n)]


async def soak(url: str, n_requests: int, concurrency: int, seed: int, text: str, max_len: int):
    max_chars = min(400, int(2.5 * (max_len - 64)))  # Tiny Shakespeare: over 2.5 characters a token
    rng = random.Random(seed)
    plan = []
    for _ in range(n_requests):
        u = rng.random()
        if u < 0.05:
            plan.append(("malformed", rng.choice(MALFORMED)))
        else:
            body = draw_request(rng, text, max_chars)
            leave = u < 0.15
            if leave:
                body["stream"] = True
                body["max_tokens"] = max(body["max_tokens"], 16)
            plan.append(("leave" if leave else "good", body))
    problems: list[str] = []
    results: dict[int, list[str] | None] = {}
    counts = {"good": 0, "leave": 0, "malformed": 0, "malformed_4xx": 0}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:

        async def run(i, kind, payload):
            async with sem:
                counts[kind] += 1
                if kind == "malformed":
                    r = await client.post(
                        url + "/v1/completions", content=payload, headers={"content-type": "application/json"}
                    )
                    err = (
                        r.json().get("error", {})
                        if r.headers.get("content-type", "").startswith("application/json")
                        else {}
                    )
                    if 400 <= r.status_code < 500 and set(err) == {"message", "type", "param", "code"}:
                        counts["malformed_4xx"] += 1
                    else:
                        problems.append(f"malformed {payload[:60]!r}: {r.status_code} {r.text[:120]}")
                else:
                    results[i] = await send(client, url, payload, kind == "leave", problems)

        t0 = time.perf_counter()
        await asyncio.gather(*(run(i, kind, payload) for i, (kind, payload) in enumerate(plan)))
        wall = time.perf_counter() - t0
        health = (await client.get(url + "/health")).json()
        for _ in range(100):  # a leaving client's slots are freed within a step or two
            if health["slots_busy"] == 0 and health["queue"] == 0:
                break
            await asyncio.sleep(0.1)
            health = (await client.get(url + "/health")).json()
        # Greedy and seeded requests again, alone: the same text as under load.
        replay = [i for i, (kind, b) in enumerate(plan) if kind == "good" and results.get(i) is not None][::25]
        mismatches = 0
        for i in replay:
            again = await send(client, url, {**plan[i][1]}, False, problems)
            if again != results[i]:
                mismatches += 1
                problems.append(f"request {i} gave other text alone: {results[i]!r} vs {again!r}")
    return {"wall_s": round(wall, 1), "health_after": health, "replayed": len(replay), "replay_mismatches": mismatches,
            **counts}, problems  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-len", type=int, default=256, help="prompts (up to ~100 tokens) + 64 new tokens fit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="an HF GPT-2 directory (None: a random 124M)")
    ap.add_argument("--data", default=str(DATA), help="the folder with tinyshakespeare/ and gpt2_tokenizer/")
    args = ap.parse_args()
    text = (Path(args.data) / "tinyshakespeare" / "input.txt").read_text()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = Path(args.model) if args.model else tmp / "gpt2-random"
        if args.model is None:
            make_model(model, Path(args.data) / "gpt2_tokenizer" / "tokenizer.json")
        server: Server = jaxlm_server(model, args.dtype, args.slots, args.max_len, tmp)
        try:
            # warm-up: every kind of request once, so that first-use allocations are in "before"
            asyncio.run(soak(server.url, 64, args.concurrency, args.seed + 1, text, args.max_len))
            time.sleep(2)
            before = rss_mib(server.proc.pid)
            summary, problems = asyncio.run(
                soak(server.url, args.requests, args.concurrency, args.seed, text, args.max_len)
            )
            time.sleep(2)
            after = rss_mib(server.proc.pid)
        finally:
            server.stop()
        log_text = server.log.read_text(errors="replace")
    summary.update(
        rss_before_mib=round(before, 1), rss_after_mib=round(after, 1),
        rss_growth_pct=round(100 * (after / before - 1), 2), problems=len(problems),
        tracebacks=log_text.count("Traceback"), exit_code=server.proc.returncode,
    )  # fmt: skip
    health = summary.pop("health_after")  # a result's rows are flat
    summary.update(slots_busy_after=health["slots_busy"], queue_after=health["queue"])
    ok = (not problems and summary["slots_busy_after"] == 0 and summary["queue_after"] == 0
          and abs(summary["rss_growth_pct"]) <= 5 and summary["tracebacks"] == 0)  # fmt: skip
    summary["passed"] = ok
    for p in problems[:20]:
        print("problem:", p)
    print(json.dumps(summary, indent=1))
    notes = (f"{args.requests} requests, {args.concurrency} at a time, --slots {args.slots}, {args.dtype}, "
             f"load average before {load_before:.1f}")  # fmt: skip
    print(record.save("serve_soak", [summary], notes=notes))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
