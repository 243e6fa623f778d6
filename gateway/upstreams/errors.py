"""Map upstream error bodies (HTTP status or in-band) to the client's OpenAI-shaped error."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import GatewayError, sanitise_message


def _code_of(payload: Any) -> str | None:
    """The upstream's own string error code (e.g. `context_length_exceeded`), if any."""
    err = payload.get("error") if isinstance(payload, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return code if isinstance(code, str) and len(code) <= 64 else None


def _message_of(payload: Any) -> tuple[str | None, str | None, int | None]:
    """(message, type, code-as-status) from the common error shapes.

    OpenAI: {"error": {"message", "type", "code"}}; vLLM: {"object": "error", "message",
    "type", "code": 400}; TGI: {"error": "text", "error_type": "..."}; Anthropic:
    {"type": "error", "error": {"type", "message"}}.
    """
    if not isinstance(payload, dict):
        return None, None, None
    err = payload.get("error")
    if isinstance(err, dict):
        msg, typ = err.get("message"), err.get("type")
        code = err.get("code")
        return (
            msg if isinstance(msg, str) else None,
            typ if isinstance(typ, str) else None,
            code if isinstance(code, int) else None,
        )
    if isinstance(err, str):
        typ = payload.get("error_type")
        return err, typ if isinstance(typ, str) else None, None
    if payload.get("object") == "error":
        msg, typ, code = payload.get("message"), payload.get("type"), payload.get("code")
        return (
            msg if isinstance(msg, str) else None,
            typ if isinstance(typ, str) else None,
            code if isinstance(code, int) else None,
        )
    return None, None, None


def client_status(upstream_status: int) -> int:
    """4xx keep their status (the client's request was at fault); the rest become 502."""
    if 400 <= upstream_status < 500 and upstream_status not in (401, 403, 407):
        return upstream_status
    return 502


def error_from_upstream(status: int, body: bytes) -> GatewayError:
    """An upstream's non-2xx response as the client's error."""
    try:
        payload = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        payload = None
    message, typ, _ = _message_of(payload)
    code = "upstream_error"
    if status in (401, 403, 407):
        # The gateway's credentials were refused: the client cannot fix that.
        message = f"The upstream refused the gateway's credentials (HTTP {status})."
        code = "upstream_auth_error"
    elif message is None:
        message = f"The upstream answered HTTP {status}."
    out_status = client_status(status)
    return GatewayError(
        out_status,
        sanitise_message(message),
        type=typ if typ and out_status < 500 else "upstream_error",
        code=code if out_status >= 500 else (_code_of(payload) or typ or "upstream_error"),
    )


def error_from_event(payload: Any) -> GatewayError | None:
    """An in-band error event (a 200 stream whose event is an error object), else None."""
    message, typ, code = _message_of(payload)
    if message is None:
        return None
    status = code if code is not None and 400 <= code < 600 else 502
    out_status = client_status(status)
    return GatewayError(
        out_status,
        sanitise_message(message),
        type=typ if typ and out_status < 500 else "upstream_error",
        code="upstream_error",
    )
