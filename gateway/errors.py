"""OpenAI-shaped errors: one exception type, rendered as JSON or as a final SSE event."""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web

# Strings that look like credentials never leave the gateway, even inside upstream messages.
_SECRET_PATTERNS = re.compile(
    r"(sk-[A-Za-z0-9_\-]{8,}|sk-ant-[A-Za-z0-9_\-]{8,}|Bearer\s+[A-Za-z0-9._\-]{8,}"
    r"|AKIA[0-9A-Z]{16}|xox[abpr]-[A-Za-z0-9\-]{8,}|gh[pousr]_[A-Za-z0-9]{20,})"
)
_MAX_MESSAGE_CHARS = 500


def sanitise_message(message: str) -> str:
    """Return `message` cut to a sane length with anything credential-like masked."""
    text = _SECRET_PATTERNS.sub("[redacted]", message)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 3] + "..."
    return text


class GatewayError(Exception):
    """An error that reaches the client in OpenAI's shape: `{"error": {message, type, code}}`.

    Before response headers it becomes an HTTP status with a JSON body; after, one final
    SSE event carrying the same object (see docs/streaming.md).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The `{"error": {...}}` object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_response(self, extra_headers: dict[str, str] | None = None) -> web.Response:
        """Render as an HTTP response with a JSON body."""
        headers = {**self.headers, **(extra_headers or {})}
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.body()),
            content_type="application/json",
            headers=headers,
        )


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> GatewayError:
    """A 400 `invalid_request_error`."""
    return GatewayError(400, message, param=param, code=code)


def upstream_error(
    message: str, *, status: int = 502, code: str = "upstream_error"
) -> GatewayError:
    """A failure of the upstream, as the client sees it (502 unless said otherwise)."""
    return GatewayError(status, message, type="upstream_error", code=code)


def timeout_error(which: str) -> GatewayError:
    """The upstream exceeded one of its timeouts (504)."""
    return GatewayError(
        504,
        f"The upstream did not answer in time ({which} timeout).",
        type="timeout_error",
        code=f"upstream_{which}_timeout",
    )


def internal_error() -> GatewayError:
    """A bug in the gateway; details go to the log, never to the client."""
    return GatewayError(500, "Internal gateway error.", type="server_error", code="internal_error")
