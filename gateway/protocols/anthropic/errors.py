"""Anthropic's error shapes on the native lane, and an upstream error body as the client's.

Before headers an error is an HTTP status with ``{"type": "error", "error": {"type",
"message"}, "request_id"}``; after headers it is one final ``event: error`` with the same
object. An Anthropic upstream's own error type (``invalid_request_error``,
``overloaded_error``, ...) is kept; the gateway's errors get the type of their status.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from gateway.errors import GatewayError
from gateway.sse import SSEEvent
from gateway.translate.anthropic_openai import error_from_anthropic
from gateway.translate.openai_anthropic import anthropic_error_type
from gateway.upstreams.errors import error_from_upstream

__all__ = ["ERROR_TYPES", "error_body", "error_event", "error_from_status"]

ERROR_TYPES: Final = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "api_error",
        "timeout_error",
        "overloaded_error",
    }
)
"""Anthropic's documented error types."""


def error_body(err: GatewayError, *, request_id: str | None = None) -> dict[str, Any]:
    """``err`` as an Anthropic error object; an Anthropic type on ``err`` is kept."""
    kind = err.type if err.type in ERROR_TYPES else anthropic_error_type(err)
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": err.message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def error_event(err: GatewayError, *, request_id: str | None = None) -> SSEEvent:
    """``err`` as the final event of an Anthropic stream."""
    return SSEEvent.from_json(error_body(err, request_id=request_id), event="error")


def error_from_status(status: int, body: bytes) -> GatewayError:
    """An Anthropic upstream's non-2xx answer as the client's error.

    A 4xx with Anthropic's error object keeps its status, type and (sanitised) message:
    the client's request was at fault and the upstream said why. The gateway's own
    credentials refused (401/403, or an authentication/permission/billing type) are a 502
    the client cannot fix; 5xx are 502 (529 overloaded keeps ``overloaded_error``).
    """
    try:
        payload = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        payload = None
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("type"), str):
        return error_from_upstream(status, body)
    mapped = error_from_anthropic(payload)
    if 400 <= status < 500 and status not in (401, 403, 407) and mapped.status < 500:
        mapped.status = status
    return mapped
