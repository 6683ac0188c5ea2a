"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure the server
answers: its own refusals, FastAPI's validation errors (422, answered as 400 as OpenAI does), Starlette's
404/405, and the pure-ASGI guards (API key, body size) that run before any route.

The guards are plain ASGI callables, not `@app.middleware("http")`: behind Starlette's BaseHTTPMiddleware,
`request.is_disconnected()` never turns true, and the server relies on it to free the slots of clients
that leave during a non-streaming request.
"""

from __future__ import annotations

import hmac
import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         503: "server_error"}  # fmt: skip


class ApiError(Exception):
    """Raised by a handler: becomes `status` with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    # A client error will fail the same way again: tell the openai client not to retry it (429 and 503 may).
    retry = {} if status in (429, 503) else {"x-should-retry": "false"}
    return JSONResponse(error_body(status, message, param, code), status, headers={**retry, **(headers or {})})


def install(app):
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
        loc = [str(x) for x in err["loc"]]
        if loc[:1] == ["body"]:
            loc = loc[1:]
        param = loc[0] if loc else None
        where = ".".join(x for x in loc if not _is_type_tag(x))
        if err["type"] == "missing" and not loc:
            return error_response(400, "the body must be a JSON object")
        if err["type"] in ("model_attributes_type", "dict_type") and not where:
            return error_response(400, "the body must be a JSON object (and the content-type application/json)")
        return error_response(400, f"{where}: {err['msg']}" if where else err["msg"], param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))


def _is_type_tag(part: str) -> bool:
    """pydantic names the union member that failed in an error's location (`prompt.list[int]`): not a field."""
    return "[" in part or part in ("str", "int", "float", "bool", "function-after")


PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")
COUNTED = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/", "/tokenize",
           "/detokenize", "/tokenizer_info")  # fmt: skip


class Guard:
    """Pure ASGI: 401 without the API key (when one is set) on the API's routes; 413 for a body over
    `max_body` bytes, by its Content-Length or, for a chunked upload, by the bytes actually received; each
    request counted by route and status in `metrics`."""

    def __init__(self, app, *, api_key: str | None, max_body: int, metrics=None):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.metrics is None:
            return await self._guarded(scope, receive, send)
        status = 0

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, counted)
        finally:
            path = scope["path"] if scope["path"] in COUNTED else "other"
            self.metrics.requests.labels(path, str(status or 499)).inc()

    async def _guarded(self, scope, receive, send):
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"].startswith(PROTECTED):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth[:7].lower() == "bearer " else None
            if given is None or not hmac.compare_digest(given.encode(), self.api_key.encode()):
                what = "no API key given" if given is None else "wrong API key"
                msg = f"{what}: send the server's --api-key as 'Authorization: Bearer KEY'"
                return await _send(send, 401, error_body(401, msg, code="invalid_api_key"))
        length = headers.get(b"content-length")
        too_big = f"the request body is larger than {self.max_body} bytes"
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _send(send, 413, error_body(413, too_big, code="body_too_large"))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the whole body first (a chunked upload has no Content-Length), then hand it on in one piece.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await _send(send, 413, error_body(413, too_big, code="body_too_large"))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the client to leave (disconnect checks)

        await self.app(scope, replay, send)


async def _send(send, status: int, body: dict):
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if status != 429:
        headers.append((b"x-should-retry", b"false"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
