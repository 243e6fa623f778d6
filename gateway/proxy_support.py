"""Pieces of the request handler (`gateway.proxy`) that need none of its state: waiting for
an upstream's concurrency slot, classifying and logging upstream failures, parsing a unary
answer, ending a trace."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import orjson

from gateway.auth import PRINCIPAL
from gateway.balancer import QueueFull, QueueTimeout, Slot
from gateway.context import Outcome, RequestContext
from gateway.errors import GatewayError, upstream_error
from gateway.routing import UpstreamHealth
from gateway.upstreams.base import UpstreamBroken

if TYPE_CHECKING:
    from gateway.tracing import RequestTrace

log = logging.getLogger("sluice.proxy")


async def acquire(health: UpstreamHealth, ctx: RequestContext) -> Slot | None:
    """A concurrency slot at the upstream, waiting in its fair-share queue if needed."""
    if health.gate is None:
        return None
    try:
        principal = ctx.get(PRINCIPAL)
        weight = principal.weight if principal is not None else 1.0
        return await health.gate.acquire(ctx.identity.team, weight)
    except QueueFull as full:
        status, message, wait = 429, "The upstream's queue is full", full.retry_after
    except QueueTimeout as late:
        status, message, wait = 503, "Timed out waiting in the upstream's queue", late.retry_after
    ctx.outcome = Outcome.UPSTREAM_ERROR
    seconds = str(max(1, math.ceil(wait)))
    raise GatewayError(
        status,
        f"{message}; retry in {seconds} s.",
        type="upstream_error",
        code="upstream_queue_full" if status == 429 else "upstream_queue_timeout",
        headers={"Retry-After": seconds},
    )


def status_kind(status: int) -> str:
    """The `kind` of an upstream's error status in sluice_upstream_errors_total."""
    if status == 429:
        return "status_429"
    return "status_5xx" if status >= 500 else "status_4xx"


def is_json(content_type: str) -> bool:
    """`application/json` (any parameters), not `application/x-ndjson` and the like."""
    return content_type.partition(";")[0].strip().lower() == "application/json"


def log_broken(ctx: RequestContext, upstream: str, when: str, err: UpstreamBroken) -> None:
    """One warning for an upstream connection that broke (`when`: before or while answering)."""
    log.warning(
        "upstream %s broke %s (request %s): %s (%s)",
        upstream,
        when,
        ctx.request_id,
        err.reason,
        err.cause,
    )


def parse_unary(raw: bytes) -> Any:
    """A non-streaming upstream answer's JSON object (upstream_error if it is not one)."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise upstream_error("The upstream answered with a body that is not JSON.") from None
    if not isinstance(payload, dict):
        raise upstream_error("The upstream answered with JSON that is not an object.")
    return payload


def end_trace(trace: RequestTrace, ctx: RequestContext) -> None:
    """End the request's span; a failing exporter never fails the request."""
    try:
        trace.end(ctx)
    except Exception:
        log.exception("ending the request's trace failed (request %s)", ctx.request_id)
