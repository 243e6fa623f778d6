"""A Messages request as the native lane sees it: checked only for what the gateway needs.

The upstream that owns the protocol judges the rest, so everything else passes through
untouched: ``thinking`` (``adaptive`` too), ``cache_control`` anywhere, ``system`` as
blocks, ``role: "system"`` messages, ``context_management``, ``output_config``, tools,
metadata and fields not invented yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from gateway.errors import bad_request

__all__ = ["VERSION_HEADERS", "check_request"]

VERSION_HEADERS: Final = frozenset({"anthropic-version"})
"""Configured headers a client's own value replaces (its API version)."""


def check_request(body: Mapping[str, Any]) -> None:
    """What the gateway itself relies on: a model to route by, the stream flag, a list of
    messages (what it counts and filters). A 400 naming the field otherwise."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("`model` is required and must be a non-empty string.", param="model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("`stream` must be a boolean.", param="stream", code="invalid_type")
    if not isinstance(body.get("messages"), list):
        raise bad_request("`messages` is required and must be an array.", param="messages")
