"""Upstream kind `openai`: OpenAI, vLLM, llama.cpp, TGI, Ollama /v1 and other compatibles."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from gateway.config import OpenAIUpstream, ServerConfig
from gateway.context import Endpoint, RequestContext
from gateway.errors import GatewayError
from gateway.local_usage import local_usage_event
from gateway.protocols import RESPONSES
from gateway.protocols.responses.upstream import openai_responses, speaks_responses
from gateway.sse import SSEDecoder, SSEEvent
from gateway.upstreams.base import (
    Batch,
    Continuation,
    StreamDecoder,
    StreamObserver,
    Upstream,
    UpstreamCall,
    with_assistant_prefix,
)
from gateway.upstreams.errors import error_from_event
from gateway.upstreams.http import HttpUpstream

_PATHS = {
    Endpoint.CHAT: "/chat/completions",
    Endpoint.COMPLETIONS: "/completions",
    Endpoint.EMBEDDINGS: "/embeddings",
}
_DONE = SSEEvent(data="[DONE]")


# In-band error objects lead with their key: OpenAI and TGI `{"error": ...}`, vLLM
# `{"object": "error", ...}`; a prefix test per event is all the hot path pays for them.
_ERROR_HEADS = (b'{"error"', b'{ "error"', b'{"object":"error"', b'{"object": "error"')
# The first 3 bytes of [DONE] and of every in-band error head: a 3-byte slice and one set
# lookup per event instead of five comparisons (most chunks start with `{"id"`).
_ODD_HEADS = frozenset({b"[DO", b'{"e', b'{ "', b'{"o'})


class OpenAIObserver(StreamObserver):
    """OpenAI's chunk stream: `[DONE]` ends it; usage rides on the last chunks.

    Usage is read once, at the end, from the last data events: OpenAI sends it in the last
    chunk before `[DONE]`, llama.cpp on the final chunk, vLLM's continuous usage as running
    totals on every chunk (so the last one is the truth). Nothing is parsed per event.
    """

    def __init__(self, *, drop_usage_chunk: bool = False) -> None:
        self._last: SSEEvent | None = None
        self._before_last: SSEEvent | None = None
        self._drop_usage = drop_usage_chunk

    def observe(self, ctx: RequestContext, event: SSEEvent) -> GatewayError | None:
        data = event.data_bytes
        if data is None:
            return None
        if data == b"[DONE]":
            self.done = True
            return None
        if data.startswith(_ERROR_HEADS):
            error = _error_of(event)
            if error is not None:
                return error
        self._before_last, self._last = self._last, event
        return None

    def classify(self, ctx: RequestContext, events: list[SSEEvent]) -> Batch:
        """The hot path: `observe` inlined over a batch."""
        batch = Batch([])
        out = batch.events
        last = before_last = None
        drop_usage = self._drop_usage
        for event in events:
            data = event._data  # bytes from the decoder: skip the property on the hot path
            if type(data) is not bytes:
                data = event.data_bytes
                if data is None:
                    out.append(event)
                    continue
            if data[:3] in _ODD_HEADS:  # rarely: not the usual `{"id":...` chunk
                batch.has_data = True
                if data == b"[DONE]":
                    self.done = True
                    batch.terminal = event
                    break
                if data.startswith(_ERROR_HEADS) and (error := _error_of(event)) is not None:
                    batch.error = error
                    break
            before_last, last = last, event
            if drop_usage and b"[]" in data and _usage_only(event):
                continue  # the gateway asked for it; the client did not
            out.append(event)
        if last is not None:
            batch.has_data = True
            self._before_last = before_last if before_last is not None else self._last
            self._last = last
        return batch

    def finish(self, ctx: RequestContext) -> None:
        for payload in self._usage_chunks():
            ctx.usage.set_from_upstream(payload["usage"])
            model = payload.get("model")
            if isinstance(model, str):
                ctx.response_model = model[:200]

    def _usage_chunks(self) -> Iterator[dict[str, Any]]:
        """The last two data events that carry a usage object (not `null`), in stream order."""
        for event in (self._before_last, self._last):
            data = event.data_bytes if event is not None else None
            if data is None or b'"usage"' not in data:
                continue
            payload = _parse(event)
            if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                yield payload

    def usage_event(self, ctx: RequestContext) -> SSEEvent | None:
        """The local usage chunk for a client that asked for usage the upstream never sent."""
        if not client_wants_usage(ctx) or next(self._usage_chunks(), None) is not None:
            return None
        return local_usage_event(ctx, _parse(self._last))

    def error_event(self, err: GatewayError) -> SSEEvent:
        return SSEEvent.from_json(err.body())

    def terminal_event(self) -> SSEEvent | None:
        return _DONE


def _usage_only(event: SSEEvent) -> bool:
    """The usage-only chunk (`"choices": []` plus usage) that include_usage adds at the end."""
    data = event.data_bytes or b""
    if b'"choices":[]' not in data and b'"choices": []' not in data:
        return False
    payload = _parse(event)
    return isinstance(payload, dict) and payload.get("choices") == [] and "usage" in payload


def _error_of(event: SSEEvent) -> GatewayError | None:
    payload = _parse(event)
    if isinstance(payload, dict) and ("error" in payload or payload.get("object") == "error"):
        return error_from_event(payload)
    return None


def _parse(event: SSEEvent | None) -> Any:
    if event is None:
        return None
    try:
        return event.json()
    except ValueError:
        return None


class OpenAICompatible(HttpUpstream):
    """Adapter for `kind: openai`: the body goes out as the client sent it (model replaced).

    For streams it asks for `stream_options.include_usage` (unless the upstream is set not
    to) so usage is exact; a client that did not ask never sees the usage-only chunk.
    """

    def __init__(self, name: str, config: OpenAIUpstream) -> None:
        super().__init__(name, config)
        self.config = config
        self._base = config.base_url.rstrip("/")
        if config.api_key is not None and config.api_key.get_secret_value():
            self._static_headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        self._responses = openai_responses(self, config) if speaks_responses(config) else None

    def native(self, wire: str) -> Upstream | None:
        return self._responses if wire == RESPONSES else None

    def url(self, ctx: RequestContext, body: dict[str, Any]) -> str:
        """Where this request goes."""
        return self._base + _PATHS[ctx.endpoint]

    def shape(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        """The body to send."""
        if ctx.stream and self.config.include_usage and ctx.endpoint is not Endpoint.EMBEDDINGS:
            options = body.get("stream_options")
            merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            return {**body, "stream_options": merged}
        return body

    async def open(
        self, ctx: RequestContext, body: dict[str, Any], headers: Mapping[str, str]
    ) -> UpstreamCall:
        return await self.post(self.url(ctx, body), self.shape(ctx, body), headers)

    def continuation(self, body: dict[str, Any], text: str) -> Continuation | None:
        """vLLM's `continue_final_message` (OpenAI's own API has no way to continue)."""
        if self.config.continuation != "vllm":
            return None
        extra = {"continue_final_message": True, "add_generation_prompt": False}
        return Continuation(with_assistant_prefix(body, text, **extra))

    def stream_parts(
        self, ctx: RequestContext, server: ServerConfig
    ) -> tuple[StreamDecoder, StreamObserver]:
        injected = ctx.stream and self.config.include_usage
        observer = OpenAIObserver(drop_usage_chunk=injected and not client_wants_usage(ctx))
        return sse_decoder(server), observer


def sse_decoder(server: ServerConfig) -> SSEDecoder:
    """An SSE decoder with the server's limits."""
    return SSEDecoder(max_line_bytes=server.max_line_bytes, max_event_bytes=server.max_event_bytes)


def client_wants_usage(ctx: RequestContext) -> bool:
    """Whether the client itself asked for `stream_options.include_usage`."""
    options = ctx.body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
