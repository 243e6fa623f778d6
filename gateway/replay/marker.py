"""Marking a kept answer as cached: `"x_sluice": {"usage_source": "cache"}` where usage is.

The mark goes on the answer's last event that reports usage (an OpenAI usage chunk,
Anthropic's `message_delta`, the Responses `response.completed`) and on a unary body, as a
top-level field next to the others; an `x_sluice` already there (the local usage chunk's)
keeps its fields. Every other byte is replayed as it was first sent.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from gateway.replay.store import StoredEvent
from gateway.sse import SSEEvent

MARK: Final = {"usage_source": "cache"}


def _reports_usage(obj: Any) -> bool:
    if not isinstance(obj, dict):
        return False
    if isinstance(obj.get("usage"), dict):
        return True
    response = obj.get("response")
    return isinstance(response, dict) and isinstance(response.get("usage"), dict)


def _marked(obj: dict[str, Any]) -> dict[str, Any]:
    extra = obj.get("x_sluice")
    return {**obj, "x_sluice": {**(extra if isinstance(extra, dict) else {}), **MARK}}


def mark_events(events: list[StoredEvent]) -> list[StoredEvent]:
    """`events` with the last usage-reporting one marked (unchanged if there is none)."""
    for i in range(len(events) - 1, -1, -1):
        event = events[i]
        data = event.data
        if data is None or b'"usage"' not in data:
            continue
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if not _reports_usage(obj):
            continue
        new_data = orjson.dumps(_marked(obj))
        raw = SSEEvent(new_data, event=event.event).encode()
        marked = StoredEvent(event.offset, event.event, new_data, raw)
        return [*events[:i], marked, *events[i + 1 :]]
    return events


def mark_body(body: bytes) -> bytes:
    """A unary JSON body with the mark (unchanged if it is not a JSON object)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(obj, dict):
        return body
    return orjson.dumps(_marked(obj))
