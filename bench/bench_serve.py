"""Serving: python -m jaxlm.serve against transformers serve, the same random GPT-2 124M, this machine, one run.

    python bench/bench_serve.py                       # 1, 8, 32 and 64 clients; everything below
    python bench/bench_serve.py --clients 1,8 --no-transformers --dtypes float32    # a quicker look

N concurrent streaming clients (each one request: a 50-300 character prompt cut from Tiny Shakespeare, 128
new tokens, greedy) against each server in turn: `python -m jaxlm.serve` (float32, and bfloat16 rows), and
`transformers serve` with `--continuous-batching` (its KV cache bounded for 64 sequences: unbounded it took
half the RAM) and without it (requests one at a time: run at 1 and 8 clients only). Per level: throughput
(completion tokens / wall time of the burst), time to first token p50 / p99 (from sending to the first text),
time per output token p50 (a request's time after its first token / its other tokens). Then jaxlm's offline
`Generator` on the same prompts at the same batch size (prefill included, compile excluded): the engine's
own limit. And the decode step the engine runs, at 32 rows attending to 256 positions, timed alone against the float32
matmul peak measured in the same run. The client is a few lines of asyncio + httpx (no openai client: its
parsing would take CPU from the servers on a 2-core machine). Results: bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import record

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"  # the shared data folder beside the worktrees (../shared/data)
MODEL_NAME = "bench"


# ---- the model and the prompts -------------------------------------------------------------------------------
def make_model(path: Path, tokenizer_json: Path):
    """Random-init GPT-2 124M (float32) written by transformers, with GPT-2's tokenizer (transformers serve
    needs its files; jaxlm uses its own copy of the same BPE)."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(path)
    tok = transformers.GPT2TokenizerFast(tokenizer_file=str(tokenizer_json))  # not vocab_file=: empty in v5
    assert tok("Hello world").input_ids == [15496, 995]
    tok.save_pretrained(path)


def make_prompts(n: int, text: str, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(50, 301))
        start = int(rng.integers(0, len(text) - length))
        out.append(text[start : start + length])
    return out


# ---- the client ----------------------------------------------------------------------------------------------
async def one(client, url, model, prompt, max_tokens, t0):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    first = end = None
    usage = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if first is None and '"text":"' in line and '"text":""' not in line:
                first = time.perf_counter() - t0
            if '"usage":{' in line:
                usage = json.loads(line[6:])["usage"]
    end = time.perf_counter() - t0
    return {"ttft": first if first is not None else end, "end": end, "tokens": usage["completion_tokens"]}


async def burst(url: str, model: str, prompts: list[str], max_tokens: int):
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=limits) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(client, url, model, p, max_tokens, t0) for p in prompts))
        return res, time.perf_counter() - t0


def summarize(res, wall) -> dict:
    tokens = sum(r["tokens"] for r in res)
    ttft = [r["ttft"] for r in res]
    tpot = [(r["end"] - r["ttft"]) / (r["tokens"] - 1) for r in res if r["tokens"] > 1]
    return {
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
        "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3),
        "tpot_p50_ms": round(1000 * statistics.median(tpot), 1) if tpot else None,
    }


# ---- the servers ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cmd, env, log: Path, url: str | None = None, model_name: str = MODEL_NAME):
        self.log, self.model_name = log, model_name
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env})
        self.url = url
        self.t0 = time.perf_counter()

    def wait(self, health: str, timeout: float = 1800):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.url is None:
                m = re.search(r"listening on (http://[\d.]+:\d+)", self.log.read_text(errors="replace"))
                self.url = m.group(1) if m else None
            if self.url is not None:
                try:
                    if httpx.get(self.url + health, timeout=5).status_code == 200:
                        self.ready_s = time.perf_counter() - self.t0
                        return self
                except httpx.HTTPError:
                    pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"server did not start:\n{self.log.read_text(errors='replace')[-3000:]}")

    def peak_rss_mib(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 0)
        except OSError:
            return None
        return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_levels(server: Server, label: dict, prompts, levels, max_tokens, log) -> list[dict]:
    asyncio.run(burst(server.url, server.model_name, prompts[:2], 8))  # warm: first requests, allocations
    rows = []
    for n in levels:
        res, wall = asyncio.run(burst(server.url, server.model_name, prompts[:n], max_tokens))
        row = {**label, "clients": n, **summarize(res, wall)}
        rows.append(row)
        log(row)
    for row in rows:
        row["server_peak_rss_mib"] = server.peak_rss_mib()
        row["server_ready_s"] = round(server.ready_s, 1)
    return rows


def jaxlm_server(model, dtype, slots, max_len, tmp: Path) -> Server:
    cmd = [sys.executable, "-m", "jaxlm.serve", str(model), "--port", "0", "--slots", str(slots), "--max-len",
           str(max_len), "--dtype", dtype, "--model-name", MODEL_NAME, "--no-access-log"]  # fmt: skip
    return Server(cmd, {}, tmp / f"jaxlm-{dtype}.log").wait("/health")


def transformers_server(model, cb: bool, tmp: Path) -> Server:
    port = free_port()
    cli = "import sys; from transformers.cli.transformers import main; sys.exit(main())"
    cmd = [sys.executable, "-c", cli, "serve", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--device", "cpu", "--dtype", "float32"]
    if cb:  # the KV cache bounded for 64 sequences of 256 tokens (unbounded it took half of this machine's RAM)
        cmd += ["--continuous-batching", "--cb-num-blocks", "64", "--cb-block-size", "256"]
        cmd += ["--cb-max-batch-tokens", "512"]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # pinned to MODEL, it takes only that string as the model name
    log = tmp / f"transformers-{'cb' if cb else 'plain'}.log"
    return Server(cmd, env, log, url=f"http://127.0.0.1:{port}", model_name=str(model)).wait("/v1/models")


# ---- jaxlm in-process: the offline Generator and the decode step ------------------------------------------------
def generator_rows(model, dtype, prompts, levels, max_tokens, log) -> list[dict]:
    import jaxlm

    config, params = jaxlm.load(model)
    gen = jaxlm.Generator(params, config, dtype=dtype)
    tok = jaxlm.GPT2Tokenizer()
    rows = []
    for n in levels:
        ids = [tok.encode(p) for p in prompts[:n]]
        gen(ids, max_new_tokens=max_tokens, do_sample=False)  # compile
        t0 = time.perf_counter()
        out = gen(ids, max_new_tokens=max_tokens, do_sample=False)
        wall = time.perf_counter() - t0
        tokens = sum(len(o) for o in out)
        row = {"server": "jaxlm Generator (offline)", "dtype": dtype, "clients": n, "tokens": tokens,
               "wall_s": round(wall, 2), "tok_per_s": round(tokens / wall, 1),
               "prefill_s": round(gen.stats.prefill_s, 2), "decode_s": round(gen.stats.decode_s, 2)}  # fmt: skip
        rows.append(row)
        log(row)
    return rows


def step_row(model, dtype, rows: int, window: int, peak_gflops: float, log) -> dict:
    """The engine's decode step (all `rows` slots, each attending to `window` positions) timed alone."""
    import jax

    import jaxlm
    from jaxlm.generation import decode
    from jaxlm.kernels import placed_on, resolve
    from jaxlm.serve.programs import Programs, for_serving

    config, params = jaxlm.load(model)
    config = config.replace(dtype=dtype, param_dtype=dtype)
    kernels = for_serving(resolve(placed_on(params), dtype=dtype, decode=True), dtype)  # as jaxlm.serve picks
    p = Programs(decode.prepare(params, config, kernels), config, rows, window, kernels)
    p.compile_all(only=lambda key: key == ("step", rows))
    cache = p.new_cache()
    tokens = np.zeros(rows, np.int32)
    positions = np.full(rows, window - 1, np.int32)
    times = []
    for _ in range(12):
        t0 = time.perf_counter()
        logits, cache = p.step(cache, np.arange(rows, dtype=np.int32), tokens, positions)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times[2:])
    D, L = config.n_embd, config.n_layer
    flops = 2 * rows * (L * 12 * D * D + config.vocab_size * D) + 4 * rows * L * window * D
    gflops = flops / ms / 1e6
    row = {"server": "jaxlm decode step", "dtype": dtype, "rows": rows, "window": window, "step_ms": round(ms, 1),
           "gflop": round(flops / 1e9, 2), "gflops": round(gflops, 1),
           "pct_of_matmul_peak": round(100 * gflops / peak_gflops, 1)}  # fmt: skip
    log(row)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="jaxlm's rows (transformers serve: float32)")
    ap.add_argument("--slots", type=int, default=64, help="jaxlm.serve --slots (a step runs the busy ones)")
    ap.add_argument("--max-len", type=int, default=256, help="jaxlm.serve --max-len (prompts + 128 fit in 256)")
    ap.add_argument("--plain-clients", default="1,8", help="levels for transformers serve without batching")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-generator", action="store_true")
    ap.add_argument("--model", default=None, help="an HF GPT-2 directory with tokenizer files (None: a random 124M)")
    ap.add_argument("--data", default=str(DATA), help="the folder with tinyshakespeare/ and gpt2_tokenizer/")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    rows: list[dict] = []
    load_before = os.getloadavg()

    def log(row):
        print(json.dumps(row), flush=True)

    machine = record.machine()
    log({"machine": machine})
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = Path(args.model) if args.model else tmp / "gpt2-random"
        if args.model is None:
            make_model(model, Path(args.data) / "gpt2_tokenizer" / "tokenizer.json")
        prompts = make_prompts(max(levels), (Path(args.data) / "tinyshakespeare" / "input.txt").read_text())
        for dtype in args.dtypes.split(","):
            rows.append(step_row(model, dtype, 32, args.max_len, machine["matmul_f32_gflops"], log))
            s = jaxlm_server(model, dtype, args.slots, args.max_len, tmp)
            try:
                label = {"server": f"jaxlm.serve --slots {args.slots}", "dtype": dtype}
                rows += run_levels(s, label, prompts, levels, args.new_tokens, log)
            finally:
                s.stop()
        if not args.no_transformers:
            for cb in (True, False):
                s = transformers_server(model, cb, tmp)
                try:
                    label = {"server": f"transformers serve {'--continuous-batching' if cb else '(no batching)'}",
                             "dtype": "float32"}  # fmt: skip
                    these = levels if cb else [n for n in levels if str(n) in args.plain_clients.split(",")]
                    rows += run_levels(s, label, prompts, these, args.new_tokens, log)
                finally:
                    s.stop()
        if not args.no_generator:
            for dtype in args.dtypes.split(","):
                rows += generator_rows(model, dtype, prompts, levels, args.new_tokens, log)
    notes = (
        f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} (other jobs share the cores); "
        f"greedy, {args.new_tokens} new tokens, prompts of 50-300 characters from Tiny Shakespeare; one burst "
        "of N requests per level; transformers serve without batching serves one request at a time (1 and 8 "
        "clients only)"
    )
    print(record.save("serve", rows, machine_info=machine, notes=notes))


if __name__ == "__main__":
    main()
