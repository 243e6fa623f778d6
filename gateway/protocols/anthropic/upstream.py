"""An Anthropic upstream spoken natively: the client's Messages body, the upstream's bytes.

`NativeMessages` is the view of a `kind: anthropic` adapter that the native lane uses per
attempt: same pool, credentials, timeouts and name (health, metrics), but no translation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.config import ServerConfig
from gateway.context import Endpoint, RequestContext
from gateway.errors import GatewayError
from gateway.protocols.anthropic.errors import error_from_status
from gateway.protocols.anthropic.events import (
    AnthropicUsage,
    NativeObserver,
    merge_usage,
    openai_usage,
)
from gateway.protocols.anthropic.request import VERSION_HEADERS
from gateway.sse import SSEDecoder
from gateway.translate.anthropic_openai import error_from_anthropic
from gateway.upstreams.base import (
    Continuation,
    StreamDecoder,
    StreamObserver,
    Upstream,
    UpstreamCall,
    with_assistant_prefix,
)
from gateway.upstreams.http import HttpUpstream

__all__ = ["NativeMessages", "prefill"]


def prefill(body: dict[str, Any], text: str) -> Continuation:
    """`body` (Messages or chat) with `text` as the assistant's prefill, minus trailing
    whitespace (which the Messages API refuses)."""
    kept = text.rstrip()
    return Continuation(with_assistant_prefix(body, kept), withheld=text[len(kept) :])


class NativeMessages(Upstream):
    """`POST {base_url}/v1/messages` with the client's body (model replaced) and headers
    (its ``anthropic-version`` and ``anthropic-beta`` kept, the configured key instead of
    the client's); the answer as the upstream sent it."""

    def __init__(self, adapter: HttpUpstream, base_url: str) -> None:
        super().__init__(adapter.name, adapter.timeouts, adapter.request_id_header)
        self._adapter = adapter
        # `<base>/v1/...` whether the configured base ends in `/v1` or not
        base = base_url.rstrip("/").removesuffix("/v1")
        self._url = base + "/v1/messages"
        self.count_tokens_url = base + "/v1/messages/count_tokens"

    def supports(self, endpoint: Endpoint) -> bool:
        return endpoint is Endpoint.CHAT

    async def open(
        self, ctx: RequestContext, body: dict[str, Any], headers: Mapping[str, str]
    ) -> UpstreamCall:
        return await self._adapter.post(self._url, body, headers, client_wins=VERSION_HEADERS)

    def continuation(self, body: dict[str, Any], text: str) -> Continuation | None:
        """A trailing assistant turn is a prefill; it may not end in whitespace."""
        return prefill(body, text)

    async def count_tokens(self, body: dict[str, Any], headers: Mapping[str, str]) -> UpstreamCall:
        """`POST /v1/messages/count_tokens`, the body as given."""
        return await self._adapter.post(
            self.count_tokens_url, body, headers, client_wins=VERSION_HEADERS
        )

    def stream_parts(
        self, ctx: RequestContext, server: ServerConfig
    ) -> tuple[StreamDecoder, StreamObserver]:
        decoder = SSEDecoder(
            max_line_bytes=server.max_line_bytes, max_event_bytes=server.max_event_bytes
        )
        return decoder, NativeObserver()

    def translate_response(self, ctx: RequestContext, payload: dict[str, Any]) -> dict[str, Any]:
        """The Message unchanged; its usage recorded (an error object raises)."""
        if payload.get("type") == "error":
            raise self._adapter.scrubbed(error_from_anthropic(payload))
        usage: AnthropicUsage = {}
        merge_usage(usage, payload.get("usage"))
        if usage:
            ctx.usage.set_from_upstream(openai_usage(usage))
        return payload

    def map_status_error(self, status: int, body: bytes) -> GatewayError:
        return self._adapter.scrubbed(error_from_status(status, body))
