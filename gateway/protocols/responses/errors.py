"""Errors on the Responses API: OpenAI JSON before headers, events after.

Before headers a request gets OpenAI's error JSON (``GatewayError.to_response``). After
``response.created`` went out the stream ends with ``response.failed`` (the Response with
``status: failed`` and ``error: {code, message}``): the official SDKs surface it as that
event, and its ``responses.stream()`` helper raises on it in ``get_final_response()``.
Before ``response.created`` (headers committed while the upstream was still silent) it
ends with an ``error`` event (``{"type": "error", "code", "message", "param"}``).
"""

from __future__ import annotations

from typing import Any

from gateway.errors import GatewayError
from gateway.protocols.responses.types import ResponseError

__all__ = ["error_event_body", "response_error"]


def _code(err: GatewayError) -> str:
    """The ``code`` of a failed Response: OpenAI's names for what the SDKs know."""
    if err.status == 429:
        return "rate_limit_exceeded"
    if 400 <= err.status < 500:
        return "invalid_prompt"
    return "server_error"


def response_error(err: GatewayError) -> ResponseError:
    """``err`` as a failed Response's ``error`` (the gateway's own code stays in the message
    when it says more than the generic one)."""
    message = err.message if err.code is None else f"{err.message} ({err.code})"
    return {"code": _code(err), "message": message}


def error_event_body(err: GatewayError, sequence_number: int) -> dict[str, Any]:
    """``err`` as an ``error`` stream event."""
    return {
        "type": "error",
        "code": err.code or _code(err),
        "message": err.message,
        "param": err.param,
        "sequence_number": sequence_number,
    }
