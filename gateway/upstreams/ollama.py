"""Upstream kind `ollama`: Ollama's native API (NDJSON), re-emitted as OpenAI SSE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.config import OllamaUpstream, ServerConfig
from gateway.context import Endpoint, RequestContext
from gateway.translate.ollama_openai import (
    OllamaSSEDecoder,
    OllamaStreamToChat,
    chat_request_to_ollama,
    completion_request_to_ollama,
    ollama_response_to_chat,
    ollama_response_to_completion,
)
from gateway.upstreams.base import StreamDecoder, StreamObserver, UpstreamCall
from gateway.upstreams.http import HttpUpstream
from gateway.upstreams.openai import client_wants_usage
from gateway.upstreams.translated import TranslatedObserver


class Ollama(HttpUpstream):
    """Adapter for `kind: ollama`: /api/chat and /api/generate (no embeddings yet)."""

    json_streams = True

    def __init__(self, name: str, config: OllamaUpstream) -> None:
        super().__init__(name, config)
        self.config = config
        self._base = config.base_url.rstrip("/")

    def supports(self, endpoint: Endpoint) -> bool:
        return endpoint in (Endpoint.CHAT, Endpoint.COMPLETIONS)

    async def open(
        self, ctx: RequestContext, body: dict[str, Any], headers: Mapping[str, str]
    ) -> UpstreamCall:
        defaults = self.config.options
        if ctx.endpoint is Endpoint.CHAT:
            request = chat_request_to_ollama(body, body["model"], defaults=defaults)
            return await self.post(self._base + "/api/chat", request, headers)
        request = completion_request_to_ollama(body, body["model"], defaults=defaults)
        return await self.post(self._base + "/api/generate", request, headers)

    def stream_parts(
        self, ctx: RequestContext, server: ServerConfig
    ) -> tuple[StreamDecoder, StreamObserver]:
        chat = ctx.endpoint is Endpoint.CHAT
        translator = OllamaStreamToChat(ctx.model, client_wants_usage(ctx), chat)
        decoder = OllamaSSEDecoder(translator, max_line_bytes=server.max_line_bytes)
        return decoder, TranslatedObserver(translator)

    def translate_response(self, ctx: RequestContext, payload: dict[str, Any]) -> dict[str, Any]:
        if ctx.endpoint is Endpoint.CHAT:
            return ollama_response_to_chat(payload, ctx.model)
        return ollama_response_to_completion(payload, ctx.model)
