"""Reading and checking client request bodies: clear 4xx errors, never a traceback."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.context import Endpoint
from gateway.errors import GatewayError, bad_request

_JSON_TYPES = ("application/json", "")


async def read_json_body(request: web.Request, max_bytes: int) -> dict[str, Any]:
    """The request's JSON object; 413, 415 or 400 with a message saying what is wrong."""
    ctype = request.content_type if request.headers.get("Content-Type") else ""
    if ctype not in _JSON_TYPES and not ctype.endswith("+json"):
        raise GatewayError(
            415,
            f"Content-Type must be application/json, not {ctype[:100]!r}.",
            code="unsupported_media_type",
        )
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    raw = bytearray()
    async for chunk in request.content.iter_chunked(65536):
        raw += chunk
        if len(raw) > max_bytes:
            raise _too_large(max_bytes)
    if not raw:
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        detail = "it is not valid UTF-8" if "utf-8" in str(err).lower() else str(err)
        raise bad_request(f"The request body is not valid JSON: {detail[:200]}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _too_large(max_bytes: int) -> GatewayError:
    return GatewayError(
        413, f"The request body exceeds {max_bytes} bytes.", code="request_too_large"
    )


def _expect(body: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> None:
    value = body.get(name)
    if value is None:
        return
    # bool is an int subclass in Python; JSON true is not a number.
    wrong_bool = isinstance(value, bool) and bool not in (
        kind if isinstance(kind, tuple) else (kind,)
    )
    if wrong_bool or not isinstance(value, kind):
        raise bad_request(f"`{name}` must be {what}.", param=name, code="invalid_type")


def _check_common_fields(body: dict[str, Any]) -> None:
    """Types of the optional fields every endpoint shares."""
    _expect(body, "stream", bool, "a boolean")
    _expect(body, "max_tokens", int, "an integer")
    _expect(body, "max_completion_tokens", int, "an integer")
    _expect(body, "stream_options", dict, "an object")
    # Sampling numbers pass through untouched (ranges are the upstream's call), but a
    # string or a list where a number belongs is refused here rather than upstream.
    for name in ("temperature", "top_p"):
        _expect(body, name, (int, float), "a number")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and value < 1:
            raise bad_request(f"`{name}` must be at least 1.", param=name, code="invalid_value")


def validate_body(endpoint: Endpoint, body: dict[str, Any]) -> None:
    """Check the fields the gateway relies on; everything else passes through untouched."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("`model` is required and must be a non-empty string.", param="model")
    _check_common_fields(body)
    if endpoint is Endpoint.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise bad_request("`messages` is required and must be an array.", param="messages")
        if not messages:
            raise bad_request("`messages` must contain at least one message.", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad_request(
                    f"`messages[{i}]` must be an object with a string `role`.",
                    param=f"messages[{i}]",
                )
    elif endpoint is Endpoint.COMPLETIONS:
        if "prompt" not in body:
            raise bad_request("`prompt` is required.", param="prompt")
    elif endpoint is Endpoint.EMBEDDINGS and "input" not in body:
        raise bad_request("`input` is required.", param="input")
