"""``GET`` / ``DELETE /v1/responses/{id}`` for a Response a native upstream holds: the
same call to that upstream, its answer relayed (errors in the gateway's shape)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from aiohttp import web

from gateway.context import request_id_from, upstream_request_id
from gateway.errors import GatewayError, timeout_error, upstream_error
from gateway.headers import upstream_headers
from gateway.protocols import RESPONSES
from gateway.protocols.responses.upstream import NativeResponses
from gateway.upstreams.base import Upstream, UpstreamBroken

log = logging.getLogger("sluice.responses")

__all__ = ["forward"]

_MAX_BODY = 16 << 20


def native_view(adapters: Mapping[str, Upstream], name: str) -> NativeResponses | None:
    """Upstream `name`'s Responses view, if it still exists and speaks Responses."""
    adapter = adapters.get(name)
    view = adapter.native(RESPONSES) if adapter is not None else None
    return view if isinstance(view, NativeResponses) else None


async def forward(
    request: web.Request,
    upstream: NativeResponses,
    method: str,
    response_id: str,
    path: str = "",
    params: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """(status, body) of `method` on the upstream's Response; its errors raise as the
    client's GatewayError."""
    request_id = request_id_from(request.headers.get("X-Request-Id"))
    id_header = upstream.request_id_header
    headers = upstream_headers(request.headers, upstream_request_id(request_id), id_header)
    headers.pop("Content-Type", None)
    try:
        async with asyncio.timeout(upstream.timeouts.total):
            call = await upstream.item(method, response_id, headers, path, params)
            try:
                raw = await call.read_body(_MAX_BODY)
            finally:
                call.abort()
    except TimeoutError:
        raise timeout_error("total") from None
    except UpstreamBroken as err:
        log.warning("upstream %s broke on %s of a response: %s", upstream.name, method, err.cause)
        raise upstream_error(f"Upstream {upstream.name!r} failed: {err.reason}.") from None
    if call.status >= 400:
        raise upstream.map_status_error(call.status, raw)
    return call.status, raw


def relayed(status: int, raw: bytes) -> web.Response:
    """The upstream's JSON answer as the client's."""
    return web.Response(body=raw, status=status, content_type="application/json")


def gone(name: str) -> GatewayError:
    """The 404 when the upstream that held a Response is no longer configured natively."""
    return GatewayError(
        404,
        f"The upstream that held this response ('{name}') is no longer configured.",
        param="response_id",
        code="response_not_found",
    )
