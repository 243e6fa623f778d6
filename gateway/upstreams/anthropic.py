"""Upstream kind `anthropic`: the Messages API, translated to OpenAI chunks for the chain."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.config import AnthropicUpstream, ServerConfig
from gateway.context import Endpoint, RequestContext
from gateway.protocols import ANTHROPIC
from gateway.protocols.anthropic.upstream import NativeMessages, prefill
from gateway.sse import SSEDecoder, SSEEvent
from gateway.translate.anthropic_openai import (
    MessagesStreamToChat,
    chat_request_to_messages,
    messages_response_to_chat,
)
from gateway.upstreams.base import (
    Continuation,
    StreamDecoder,
    StreamObserver,
    Upstream,
    UpstreamCall,
)
from gateway.upstreams.http import HttpUpstream
from gateway.upstreams.openai import client_wants_usage
from gateway.upstreams.translated import TranslatedObserver


class AnthropicDecoder:
    """Anthropic SSE bytes in, OpenAI chat chunks out; an `event: error` becomes one
    OpenAI-shaped error event (the observer then reports the translator's exact error)."""

    def __init__(self, translator: MessagesStreamToChat, server: ServerConfig) -> None:
        self.translator = translator
        self._sse = SSEDecoder(
            max_line_bytes=server.max_line_bytes, max_event_bytes=server.max_event_bytes
        )
        self._reported = False

    @property
    def has_pending(self) -> bool:
        return self._sse.has_pending

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        return self._translate(self._sse.feed(chunk))

    def flush(self) -> list[SSEEvent]:
        return self._translate(self._sse.flush())

    def _translate(self, events: list[SSEEvent]) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        for event in events:
            if event.data_bytes is None:
                out.append(event)  # keep-alive comments pass
                continue
            out += self.translator.feed(event)
            error = self.translator.error
            if error is not None and not self._reported:
                self._reported = True
                out.append(SSEEvent.from_json(error.body()))
        return out


def messages_url(base_url: str) -> str:
    """`<base>/v1/messages`; the base may end in `/v1` (as OpenAI-style URLs do) or not (as
    the Anthropic SDKs' do): `http://h:8000`, `http://h:8000/v1/` and the same under a path
    prefix all work."""
    base = base_url.rstrip("/")
    return base.removesuffix("/v1") + "/v1/messages"


class Anthropic(HttpUpstream):
    """Adapter for `kind: anthropic` (chat completions; not completions or embeddings)."""

    def __init__(self, name: str, config: AnthropicUpstream) -> None:
        super().__init__(name, config)
        self.config = config
        self._url = messages_url(config.base_url)
        self._static_headers["anthropic-version"] = config.anthropic_version
        if config.api_key is not None and config.api_key.get_secret_value():
            self._static_headers["x-api-key"] = config.api_key.get_secret_value()
        self._native = NativeMessages(self, config.base_url)

    def supports(self, endpoint: Endpoint) -> bool:
        return endpoint is Endpoint.CHAT

    def native(self, wire: str) -> Upstream | None:
        return self._native if wire == ANTHROPIC else None

    async def open(
        self, ctx: RequestContext, body: dict[str, Any], headers: Mapping[str, str]
    ) -> UpstreamCall:
        request = chat_request_to_messages(body, body["model"], self.config.default_max_tokens)
        return await self.post(self._url, request, headers)

    def continuation(self, body: dict[str, Any], text: str) -> Continuation | None:
        """A trailing assistant message becomes the Messages API's prefill."""
        return prefill(body, text)

    def stream_parts(
        self, ctx: RequestContext, server: ServerConfig
    ) -> tuple[StreamDecoder, StreamObserver]:
        translator = MessagesStreamToChat(
            ctx.model,
            include_usage=client_wants_usage(ctx),
            usage_at_start=ctx.client_format == "anthropic",
        )
        return AnthropicDecoder(translator, server), TranslatedObserver(translator)

    def translate_response(self, ctx: RequestContext, payload: dict[str, Any]) -> dict[str, Any]:
        return messages_response_to_chat(payload, ctx.model)
