"""The edges of the native Anthropic lane: nothing to translate, Anthropic's error shapes."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.context import RequestContext
from gateway.dialects import Dialect, StreamEgress
from gateway.errors import GatewayError
from gateway.protocols.anthropic.errors import error_body, error_event
from gateway.sse import SSEEvent

__all__ = ["NativeAnthropic"]


class NativeAnthropic(Dialect):
    """An Anthropic client on an Anthropic upstream: the body and the events pass as they are."""

    name = "anthropic"

    def admit(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        return body  # checked by `check_request`; the upstream judges the rest

    def egress(self, ctx: RequestContext) -> StreamEgress | None:
        return None

    def final_error_event(self, ctx: RequestContext, err: GatewayError) -> SSEEvent | None:
        return error_event(err, request_id=ctx.request_id)

    def unary(self, ctx: RequestContext, payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    def error_response(self, ctx: RequestContext, err: GatewayError) -> web.Response:
        return web.Response(
            status=err.status,
            body=orjson.dumps(error_body(err, request_id=ctx.request_id)),
            content_type="application/json",
            headers={**err.headers, "X-Request-Id": ctx.request_id, **ctx.response_headers},
        )
