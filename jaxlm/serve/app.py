"""The OpenAI-compatible FastAPI app: routes, request checks, streaming, and the loading state.

`create_app(state)` returns the ASGI app uvicorn runs (`httperrors.Guard` around FastAPI). Until the model
is loaded and every program compiled, `/health` and the `/v1/` routes answer 503. A handler tokenises and
checks its request, hands its sequences to the engine and turns their events into the response
(`jaxlm.serve.jobs`, `jaxlm.serve.responses`); the engine never waits on HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from .chat import ChatTemplate
from .engine import Engine, QueueFull, Sequence
from .httperrors import ApiError, Guard, error_body, install
from .jobs import EngineError, Job
from .metrics import Metrics
from .protocol import ChatRequest, CompletionRequest
from .responses import DONE, Shaper, sse

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.2


@dataclass
class Served:
    """What the routes need once the model is ready."""

    engine: Engine
    tokenizer: object
    vocab_size: int
    max_len: int
    eos_id: int | None
    chat: ChatTemplate


class State:
    """The server's state: `served` is None while loading; `name` is the model id requests must give."""

    def __init__(self, name: str, *, api_key: str | None = None, max_body: int = 4 << 20):
        self.name, self.api_key, self.max_body = name, api_key, max_body
        self.served: Served | None = None
        self.metrics = Metrics()
        self.on_shutdown = []

    def ready(self) -> Served:
        if self.served is None:
            raise ApiError(503, "the model is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "5"})  # fmt: skip
        return self.served

    def check_model(self, model: str):
        if model != self.name:
            raise ApiError(404, f"the model {model!r} does not exist here; this server serves {self.name!r}",
                           param="model", code="model_not_found")  # fmt: skip


def create_app(state: State):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for fn in state.on_shutdown:  # after uvicorn has finished the requests in flight
            fn()

    app = FastAPI(title="jaxlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install(app)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("jaxlm.serve").joinpath("static/index.html").read_text()

    @app.get("/health")
    async def health():
        if state.served is None:
            return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "5"})
        return {"status": "ok", "model": state.name, **state.served.engine.stats()}

    @app.get("/metrics")
    async def metrics():
        stats = state.served.engine.stats() if state.served is not None else None
        return Response(state.metrics.render(stats), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        s = state.ready()
        card = {"id": state.name, "object": "model", "created": 0, "owned_by": "jaxlm", "max_model_len": s.max_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        s = state.ready()
        state.check_model(body.model)
        prompts = [_encode(s, p, i) for i, p in enumerate(body.prompts)]
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        _check_lengths(s, prompts, max_tokens)
        want = body.logprobs
        echo = bool(body.echo)
        job = _job(state, s, body, prompts, max_tokens, body.stop_list, want, echo=echo and want is not None)
        shaper = Shaper("completion", state.name, s.tokenizer, _include_usage(body))
        prefix = [s.tokenizer.decode(c.prompt_ids) if echo else "" for c in job.choices]
        if body.stream:
            return StreamingResponse(_stream_completion(job, shaper, prefix), media_type="text/event-stream",
                                     headers=STREAM_HEADERS)  # fmt: skip
        await _whole(request, job)
        choices = [
            {"index": c.index, "text": prefix[c.index] + c.text.text, "finish_reason": c.finish,
             "logprobs": None if want is None else shaper.completion_logprobs(c.entries, 0)}
            for c in job.choices
        ]  # fmt: skip
        return shaper.completion(choices, job.usage())

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        s = state.ready()
        state.check_model(body.model)
        messages = [{"role": m.role, "content": m.text, **({"name": m.name} if m.name else {})} for m in body.messages]
        try:
            text = s.chat.render(messages)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        prompts = [_encode(s, text, 0, what="the chat prompt")]
        max_new = body.max_new if body.max_new is not None else max(1, s.max_len - len(prompts[0]))
        _check_lengths(s, prompts, max_new)
        want = (body.top_logprobs or 0) if body.logprobs else None
        job = _job(state, s, body, prompts, max_new, body.stop_list + s.chat.stops, want)
        shaper = Shaper("chat", state.name, s.tokenizer, _include_usage(body))
        if body.stream:
            return StreamingResponse(_stream_chat(job, shaper), media_type="text/event-stream", headers=STREAM_HEADERS)
        await _whole(request, job)
        choices = [
            {"index": c.index, "message": {"role": "assistant", "content": c.text.text}, "finish_reason": c.finish,
             "logprobs": None if want is None else shaper.chat_logprobs(c.entries, want)}
            for c in job.choices
        ]  # fmt: skip
        return shaper.chat(choices, job.usage())

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        s = state.ready()
        eos = None if s.eos_id is None else s.tokenizer.decode([s.eos_id])
        return {"eos_token": eos, "bos_token": eos, "pad_token": None, "chat_template": None,
                "model_max_length": s.max_len}  # fmt: skip

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        s = state.ready()
        tokens = s.tokenizer.encode(body.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": s.max_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        s = state.ready()
        bad = [t for t in body.tokens if not 0 <= t < s.vocab_size]
        if bad:
            raise ApiError(400, f"token ids outside the vocabulary [0, {s.vocab_size}): {bad[:5]}", param="tokens")
        return {"prompt": s.tokenizer.decode(body.tokens)}

    return Guard(app, api_key=state.api_key, max_body=state.max_body, metrics=state.metrics)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    tokens: list[int]


def _encode(s: Served, prompt, i: int, what: str | None = None) -> list[int]:
    what = what or f"prompt {i}"
    if isinstance(prompt, str):
        ids = s.tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < s.vocab_size]
        if bad:
            raise ApiError(400, f"{what} has token ids outside the vocabulary [0, {s.vocab_size}): {bad[:5]}",
                           param="prompt")  # fmt: skip
    if not ids:
        hint = "" if s.eos_id is None else f"; to generate from nothing, send '{s.tokenizer.decode([s.eos_id])}'"
        raise ApiError(400, f"{what} is empty{hint}", param="prompt")
    return ids


def _check_lengths(s: Served, prompts: list[list[int]], max_tokens: int):
    for i, p in enumerate(prompts):
        if len(p) + max_tokens > s.max_len:
            raise ApiError(
                400,
                f"this server's context is {s.max_len} tokens, but prompt {i} has {len(p)} tokens and max_tokens is "
                f"{max_tokens} ({len(p) + max_tokens} in all): shorten the prompt or lower max_tokens",
                param="max_tokens", code="context_length_exceeded",
            )  # fmt: skip


def _include_usage(body) -> bool:
    return bool(body.stream and body.stream_options is not None and body.stream_options.include_usage)


def _job(state: State, s: Served, body, prompts, max_tokens: int, stops, want, echo: bool = False) -> Job:
    n = body.n or 1
    seed = body.seed if body.seed is not None else secrets.randbits(64)
    temperature = 1.0 if body.temperature is None else body.temperature
    common = dict(
        max_tokens=max_tokens, sink=None, temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0), presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, seed=seed, logprobs=want is not None, echo=echo,
        stop_ids=frozenset(() if s.eos_id is None else (s.eos_id,)),
    )  # fmt: skip
    seqs = [Sequence(prompt=p, choice=j, **common) for p in prompts for j in range(n)]
    job = Job(s.engine, s.tokenizer, seqs, prompts, stops, want, asyncio.get_running_loop(), state.metrics)
    try:
        job.submit()
    except QueueFull as e:
        raise ApiError(429, f"the server is busy ({e}); retry later", code="queue_full",
                       headers={"Retry-After": "1"}) from None  # fmt: skip
    state.metrics.prompt_tokens.inc(job.prompt_tokens)
    return job


async def _whole(request: Request, job: Job):
    """Run the job to its end; if the client leaves first, free its slots (nothing else would notice)."""

    async def run():
        async for _ in job.updates():
            pass

    task = asyncio.ensure_future(run())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "the client disconnected")
        try:
            task.result()
        except EngineError as e:
            raise ApiError(500, f"the engine failed: {e}") from None
    finally:
        job.cancel()


def _stream_completion(job: Job, shaper: Shaper, prefix: list[str]):
    offsets = [0] * len(job.choices)
    echoed = [False] * len(job.choices)

    async def chunks():
        async for updates in job.updates():
            for u in updates:
                i = u.choice.index
                text = u.text if echoed[i] else prefix[i] + u.text
                echoed[i] = True
                lp = None
                if u.choice.want is not None:
                    lp = shaper.completion_logprobs(u.entries, offsets[i])
                    offsets[i] += sum(len(t) for t in lp["tokens"])
                yield sse(shaper.completion_chunk(i, text, lp, u.finish))

    return _framed(job, shaper, chunks())


def _stream_chat(job: Job, shaper: Shaper):
    async def chunks():
        for c in job.choices:
            yield sse(shaper.chat_chunk(c.index, {"role": "assistant", "content": ""}, None, None))
        async for updates in job.updates():
            for u in updates:
                delta = {"content": u.text} if u.text or u.finish is None else {}
                lp = None if u.choice.want is None else shaper.chat_logprobs(u.entries, u.choice.want)
                yield sse(shaper.chat_chunk(u.choice.index, delta, lp, u.finish))

    return _framed(job, shaper, chunks())


async def _framed(job: Job, shaper: Shaper, chunks):
    """A stream's events, then usage when asked for and [DONE]; an engine failure is the last event, and the
    job is cancelled however the stream ends (a client that goes away frees its slot)."""
    try:
        async for event in chunks:
            yield event
        if shaper.include_usage:
            yield sse(shaper.usage_chunk(job.usage()))
    except EngineError as e:
        yield sse(error_body(500, f"the engine failed: {e}"))
    finally:
        job.cancel()
    yield DONE
