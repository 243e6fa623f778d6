"""What an upstream's response head says before any event is relayed: an error status, an
HTML page (a captive portal, a wrong base_url) or one JSON body for a streaming request.

Each becomes the client's error (a real HTTP status, since nothing went out yet), with the
upstream's failure counted in `sluice_upstream_errors_total`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, NoReturn

import orjson

from gateway.context import Outcome, RequestContext
from gateway.errors import GatewayError, upstream_error
from gateway.proxy_support import is_json, status_kind
from gateway.upstreams.base import Upstream, UpstreamBroken, UpstreamCall
from gateway.upstreams.errors import error_from_event

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics

__all__ = ["check_answer"]

_ERROR_BODY_BYTES = 64 << 10


async def _error_body(call: UpstreamCall, limit: float) -> bytes:
    """The (bounded) body of an answer that is not a stream; the connection is dropped."""
    try:
        async with asyncio.timeout(limit):
            return await call.read_body(_ERROR_BODY_BYTES)
    except (TimeoutError, GatewayError, UpstreamBroken):
        return b""
    finally:
        call.abort()


async def check_answer(
    ctx: RequestContext,
    upstream: Upstream,
    call: UpstreamCall,
    limit: float,
    metrics: GatewayMetrics,
) -> None:
    """Raise the client's error when the upstream's answer is no usable answer."""
    if call.status >= 400:
        metrics.upstream_error(upstream.name, status_kind(call.status))
        raw = await _error_body(call, limit)
        ctx.outcome = Outcome.UPSTREAM_ERROR
        error = upstream.map_status_error(call.status, raw)
        retry_after = call.headers.get("Retry-After")  # a 503's too, though it becomes 502
        if retry_after and call.status in (429, 503) and len(retry_after) < 64:
            error.headers["Retry-After"] = retry_after
        raise error
    content_type = call.headers.get("Content-Type", "")
    if "text/html" in content_type:
        # A captive portal, a login page or a base_url that points at a web server.
        call.abort()
        ctx.outcome = Outcome.UPSTREAM_ERROR
        metrics.upstream_error(upstream.name, "malformed")
        raise upstream_error(
            f"Upstream {upstream.name!r} answered {call.status} with an HTML page, not an "
            "API response (check its base_url, or a proxy or login page in the way).",
            code="upstream_not_an_api",
        )
    if ctx.stream and not upstream.json_streams and is_json(content_type):
        await _not_streaming(ctx, upstream, call, limit, metrics)


async def _not_streaming(
    ctx: RequestContext,
    upstream: Upstream,
    call: UpstreamCall,
    limit: float,
    metrics: GatewayMetrics,
) -> NoReturn:
    """A streaming request answered with one JSON body: an error object is the error it
    says (as if it came with its status); anything else is no stream at all."""
    raw = await _error_body(call, limit)
    ctx.outcome = Outcome.UPSTREAM_ERROR
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        payload = None
    in_band = error_from_event(payload)
    if in_band is not None:
        metrics.upstream_error(upstream.name, "in_band")
        raise upstream.map_status_error(in_band.status, raw)
    metrics.upstream_error(upstream.name, "malformed")
    raise upstream_error(
        "The upstream answered a streaming request with a JSON body instead of an event stream.",
        code="upstream_not_streaming",
    )
