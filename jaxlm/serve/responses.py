"""OpenAI's response bodies from a job's updates: completions and chat completions, whole or as stream chunks.

Streams follow OpenAI (and vLLM's tests): `data: {json}` events ending with `data: [DONE]`, one id for the
whole response, one choice per chunk (`index` says which), `finish_reason` only in each choice's last chunk
(which carries its last text), chat's first chunk per choice carrying the role, and with
`stream_options.include_usage` a final chunk with empty `choices` and the usage (every other chunk has
`usage: null`).
"""

from __future__ import annotations

import json
import time
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


class Shaper:
    """Builds one response's bodies (completion or chat) with its id, model and creation time."""

    def __init__(self, kind: str, model: str, tokenizer, include_usage: bool = False):
        self.kind, self.model, self.tok = kind, model, tokenizer
        self.id = new_id("cmpl" if kind == "completion" else "chatcmpl")
        self.created = int(time.time())
        self.include_usage = include_usage
        self._piece_cache: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        s = self._piece_cache.get(token_id)
        if s is None:
            s = self._piece_cache[token_id] = self.tok.decode([token_id])
        return s

    # ---- completions --------------------------------------------------------------------------------------
    def completion_logprobs(self, entries, offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for tok, lp, top in entries:
            s = self.piece(tok)
            tokens.append(s)
            lps.append(lp)
            tops.append(None if top is None else {self.piece(i): v for i, v in top.items()})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def completion(self, choices: list[dict], usage: dict) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}  # fmt: skip

    def completion_chunk(self, index: int, text: str, logprobs, finish) -> dict:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": [choice]}  # fmt: skip
        if self.include_usage:
            out["usage"] = None
        return out

    # ---- chat -------------------------------------------------------------------------------------------------
    def chat_logprobs(self, entries, want: int) -> dict:
        def one(tok, lp):
            s = self.piece(tok)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        content = [
            {**one(tok, lp), "top_logprobs": [one(i, v) for i, v in sorted(top.items(), key=lambda kv: -kv[1])[:want]]}
            for tok, lp, top in entries
        ]
        return {"content": content, "refusal": None}

    def chat(self, choices: list[dict], usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}  # fmt: skip

    def chat_chunk(self, index: int, delta: dict, logprobs, finish) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [choice]}  # fmt: skip
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: dict) -> dict:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                "usage": usage}  # fmt: skip
