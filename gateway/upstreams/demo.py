"""Upstream kind `demo`: a simulated model inside the gateway, for trying Sluice with no setup.

It speaks OpenAI's wire format byte for byte (so it runs through the same decoder, chain
and writer as a real upstream) and paces its tokens with a configurable time to first
token and inter-token latency.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from multidict import CIMultiDict

from gateway.config import DemoUpstream, ServerConfig
from gateway.context import Endpoint, RequestContext
from gateway.upstreams.base import (
    Continuation,
    StreamDecoder,
    StreamObserver,
    Upstream,
    UpstreamCall,
    with_assistant_prefix,
)
from gateway.upstreams.openai import OpenAIObserver, sse_decoder

_ANSWER = (
    "Hello from Sluice! This answer comes from the built-in demo model, streamed token by "
    "token through the gateway's plugin chain, exactly as a real upstream would be. "
    "Point a route at OpenAI, vLLM, llama.cpp, TGI or Ollama in your config file "
    "and the same stream flows from there. You asked about: {topic}. "
    "Every chunk leaves the gateway as soon as it arrives, a slow reader slows the "
    "upstream instead of filling memory, and a client that hangs up cancels the "
    "generation at once."
)
_TOKEN = re.compile(r"\s*\S+")


def _last_user_text(body: Mapping[str, Any]) -> str:
    if isinstance(body.get("prompt"), str):
        return str(body["prompt"])
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                texts = (p.get("text") for p in content if isinstance(p, dict))
                return " ".join(text for text in texts if isinstance(text, str))
    return ""


def _prefix(body: Mapping[str, Any]) -> str:
    """A trailing assistant message's text: the answer to continue (see `continuation`)."""
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if isinstance(last, dict) and last.get("role") == "assistant":
        content = last.get("content")
        return content if isinstance(content, str) else ""
    return ""


def _tokens(body: Mapping[str, Any], cap: int) -> tuple[list[str], str]:
    topic = " ".join(_last_user_text(body).split()[:12]) or "nothing in particular"
    answer, prefix = _ANSWER.format(topic=topic), _prefix(body)
    if prefix and answer.startswith(prefix):
        answer = answer[len(prefix) :]  # the rest, as if the answer had never stopped
    words = _TOKEN.findall(answer)
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or cap
    limit = min(int(limit), cap)
    if len(words) > limit:
        return words[:limit], "length"
    return words, "stop"


def _prompt_tokens(body: Mapping[str, Any]) -> int:
    return max(1, len(orjson.dumps(body.get("messages") or body.get("prompt") or "")) // 4)


class DemoCall(UpstreamCall):
    """Pre-built response chunks released on a schedule; cancelling a read loses nothing."""

    def __init__(self, chunks: list[bytes], due: list[float], content_type: str) -> None:
        self.status = 200
        self.headers = CIMultiDict({"Content-Type": content_type})
        self._chunks = chunks
        self._due = due
        self._next = 0
        self.aborted = False

    async def read_chunk(self) -> bytes:
        if self.aborted or self._next >= len(self._chunks):
            return b""
        delay = self._due[self._next] - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if self._next >= len(self._chunks):  # aborted while sleeping
            return b""
        chunk = self._chunks[self._next]
        self._next += 1
        return chunk

    def abort(self) -> None:
        self.aborted = True
        self._next = len(self._chunks)

    def release(self) -> None:
        self._next = len(self._chunks)


class Demo(Upstream):
    """The embedded demo model."""

    def __init__(self, name: str, config: DemoUpstream) -> None:
        super().__init__(name, config.timeouts, config.request_id_header)
        self.config = config

    async def open(
        self, ctx: RequestContext, body: dict[str, Any], headers: Mapping[str, str]
    ) -> UpstreamCall:
        start = time.monotonic()
        ttft, itl = self.config.ttft_ms / 1000, self.config.itl_ms / 1000
        if ctx.endpoint is Endpoint.EMBEDDINGS:
            return DemoCall([orjson.dumps(_embeddings(body))], [start], "application/json")
        tokens, finish = _tokens(body, self.config.max_tokens)
        if body.get("stream"):
            chunks = _stream_chunks(ctx.endpoint, body, tokens, finish)
            due = [start + ttft + i * itl for i in range(len(chunks))]
            due[-1] = due[-2] if len(due) > 1 else due[-1]  # [DONE] right after the last token
            return DemoCall(chunks, due, "text/event-stream")
        payload = _unary(ctx.endpoint, body, tokens, finish)
        return DemoCall(
            [orjson.dumps(payload)], [start + ttft + len(tokens) * itl], "application/json"
        )

    def continuation(self, body: dict[str, Any], text: str) -> Continuation | None:
        """The demo continues its canned answer from a trailing assistant message."""
        return Continuation(with_assistant_prefix(body, text))

    def stream_parts(
        self, ctx: RequestContext, server: ServerConfig
    ) -> tuple[StreamDecoder, StreamObserver]:
        return sse_decoder(server), OpenAIObserver()


def _usage(body: Mapping[str, Any], completion: int) -> dict[str, int]:
    prompt = _prompt_tokens(body)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _stream_chunks(
    endpoint: Endpoint, body: Mapping[str, Any], tokens: list[str], finish: str
) -> list[bytes]:
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body["model"]
    chat = endpoint is Endpoint.CHAT
    base: dict[str, Any] = {
        "id": rid if chat else rid.replace("chatcmpl", "cmpl"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
    }

    def choice(text: str | None, reason: str | None, first: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else {}
        if text is not None and not first:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    extra = {"usage": None} if include_usage else {}
    chunks = [
        _sse({**base, "choices": [choice(t, None, first=i == 0)], **extra})
        for i, t in enumerate(tokens)
    ]
    chunks.append(_sse({**base, "choices": [choice(None, finish)], **extra}))
    if include_usage:
        chunks.append(_sse({**base, "choices": [], "usage": _usage(body, len(tokens))}))
    chunks.append(b"data: [DONE]\n\n")
    return chunks


def _unary(
    endpoint: Endpoint, body: Mapping[str, Any], tokens: list[str], finish: str
) -> dict[str, Any]:
    text = "".join(tokens)
    rid, created = uuid.uuid4().hex[:24], int(time.time())
    if endpoint is Endpoint.CHAT:
        return {
            "id": f"chatcmpl-{rid}",
            "object": "chat.completion",
            "created": created,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": _usage(body, len(tokens)),
        }
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": created,
        "model": body["model"],
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": _usage(body, len(tokens)),
    }


def _embeddings(body: Mapping[str, Any]) -> dict[str, Any]:
    raw = body.get("input")
    inputs = raw if isinstance(raw, list) else [raw]
    data = []
    for i, item in enumerate(inputs):
        digest = hashlib.sha256(str(item).encode()).digest()
        vector = [round(b / 255 - 0.5, 6) for b in digest[:16]]
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = sum(max(1, len(str(item)) // 4) for item in inputs)
    return {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
