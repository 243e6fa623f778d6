"""Plugin views of Anthropic events and bodies: the text, reasoning and tool input in them,
and the events a plugin builds (a text delta, the end of a stopped message).

A "choice" in the format-neutral views (`gateway.deltas`) is a content block here: text
deltas are keyed by the block's ``index``, and ``content_block_stop`` finishes it. A plain
text delta, as Anthropic writes it (compact JSON, this key order), is read from the event's
bytes without parsing; anything else is parsed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from gateway.context import Endpoint
from gateway.sse import SSEEvent

__all__ = [
    "BLOCK_STOP",
    "PromptPiece",
    "block_stops",
    "block_texts",
    "generated_texts",
    "prompt_pieces",
    "prompt_texts",
    "response_texts",
    "stop_events",
    "text_event",
    "text_view",
    "with_block_texts",
    "without_blocks",
]

BLOCK_STOP: Final = "content_block_stop"
"""The finish reason of a content block in `block_stops` (its ``content_block_stop``)."""

_HEAD: Final = b'{"type":"content_block_delta","index":'
_MID: Final = b',"delta":{"type":"text_delta","text":"'
_TAIL: Final = b'"}}'

View = tuple[Endpoint, tuple[int, str], int, int]
"""As `gateway.deltas`: endpoint, (block index, text), where the quoted text is in the data."""


def text_view(endpoint: Endpoint, data: bytes | None) -> View | None:
    """The plain text delta view of `data`, found by its bytes, if it is one."""
    if data is None or not data.startswith(_HEAD) or not data.endswith(_TAIL):
        return None
    mid = data.find(_MID, len(_HEAD))
    digits = data[len(_HEAD) : mid]
    if mid < 0 or not digits.isdigit():
        return None
    start, end = mid + len(_MID), len(data) - len(_TAIL)
    raw = data[start:end]
    if not raw:
        return None
    try:  # a quote or backslash (34, 92): let JSON decide what the string is
        text = orjson.loads(b'"' + raw + b'"') if 34 in raw or 92 in raw else raw.decode()
    except ValueError:  # not one string (more keys after it), or invalid UTF-8
        return None
    if not isinstance(text, str):
        return None
    return endpoint, (int(digits), text), start - 1, end + 1


def _index(payload: Mapping[str, Any]) -> int | None:
    index = payload.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else None


def block_texts(payload: Any) -> dict[int, str]:
    """{block index: text} of a ``content_block_delta`` carrying a text delta, else {}."""
    if not isinstance(payload, dict) or payload.get("type") != "content_block_delta":
        return {}
    delta, index = payload.get("delta"), _index(payload)
    if not isinstance(delta, dict) or delta.get("type") != "text_delta" or index is None:
        return {}
    text = delta.get("text")
    return {index: text} if isinstance(text, str) and text else {}


def block_stops(payload: Any) -> dict[int, str]:
    """{block index: `BLOCK_STOP`} for a ``content_block_stop``, else {}."""
    if not isinstance(payload, dict) or payload.get("type") != BLOCK_STOP:
        return {}
    index = _index(payload)
    return {} if index is None else {index: BLOCK_STOP}


def generated_texts(payload: Any) -> list[str]:
    """Every generated string in an event: text, thinking, tool input JSON, tool names."""
    if not isinstance(payload, dict):
        return []
    if payload.get("type") == "content_block_delta":
        delta = payload.get("delta")
        if not isinstance(delta, dict):
            return []
        for key in ("text", "thinking", "partial_json"):
            value = delta.get(key)
            if isinstance(value, str) and value:
                return [value]
        return []
    if payload.get("type") == "content_block_start":
        block = payload.get("content_block")
        if isinstance(block, dict) and isinstance(block.get("name"), str):
            return [block["name"]]
    return []


def with_block_texts(event: SSEEvent, payload: Any, texts: Mapping[int, str]) -> SSEEvent:
    """`event` (a text delta) with its text replaced, if its block is in `texts`."""
    found = block_texts(payload)
    if not found:
        return event
    (index,) = found
    if index not in texts:
        return event
    delta = {**payload["delta"], "text": texts[index]}
    return SSEEvent.from_json(
        {**payload, "delta": delta}, event=event.event or "content_block_delta"
    )


def text_event(index: int, text: str) -> SSEEvent:
    """A new ``content_block_delta`` carrying `text` for block `index`."""
    payload = {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "text_delta", "text": text},
    }
    return SSEEvent.from_json(payload, event="content_block_delta")


def stop_events(index: int, stop_reason: str, output_tokens: int) -> list[SSEEvent]:
    """What ends a message a plugin stopped inside block `index`: the block's stop, then
    ``message_delta`` with `stop_reason` (``message_stop`` follows from the observer)."""
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": output_tokens},
    }
    return [
        SSEEvent.from_json({"type": BLOCK_STOP, "index": index}, event=BLOCK_STOP),
        SSEEvent.from_json(delta, event="message_delta"),
    ]


def without_blocks(event: SSEEvent, payload: Any, drop: set[int]) -> SSEEvent | None:
    """None if `event` belongs to a block in `drop` (its start, deltas or stop), else it."""
    if not isinstance(payload, dict):
        return event
    kind = payload.get("type")
    if isinstance(kind, str) and kind.startswith("content_block_") and _index(payload) in drop:
        return None
    return event


# ----- request and response bodies ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PromptPiece:
    """One countable piece of a Messages request: text, a JSON value (tools, tool use and
    results), or a part counted at a fixed cost (image, document, ...)."""

    kind: Literal["text", "json", "image", "other"]
    text: str = ""
    name: str = ""  # json: what it is ("tools", "tool_use"); other: the block type
    value: Any = None


def _system_pieces(system: Any) -> Iterator[PromptPiece]:
    if isinstance(system, str):
        yield PromptPiece("text", system)
    elif isinstance(system, list):
        for block in system:
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                yield PromptPiece("text", block["text"])


def _block_pieces(block: Any) -> Iterator[PromptPiece]:
    if not isinstance(block, dict):
        return
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        yield PromptPiece("text", block["text"])
    elif kind == "thinking" and isinstance(block.get("thinking"), str):
        yield PromptPiece("text", block["thinking"])
    elif kind == "tool_use":
        yield PromptPiece(
            "json", name="tool_use", value={"name": block.get("name"), "input": block.get("input")}
        )
    elif kind == "tool_result":
        content = block.get("content")
        if isinstance(content, str):
            yield PromptPiece("text", content)
        elif isinstance(content, list):
            for part in content:
                yield from _block_pieces(part)
    elif kind == "image":
        yield PromptPiece("image", name="image")
    elif kind != "redacted_thinking":  # opaque: the upstream does not count it as text
        yield PromptPiece("other", name=str(kind) if isinstance(kind, str) else "part")


def prompt_pieces(body: Mapping[str, Any]) -> Iterator[PromptPiece]:
    """The countable pieces of a Messages request: system, messages (any role), tools."""
    yield from _system_pieces(body.get("system"))
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            yield PromptPiece("text", content)
        elif isinstance(content, list):
            for block in content:
                yield from _block_pieces(block)
    if body.get("tools"):
        yield PromptPiece("json", name="tools", value=body["tools"])


def prompt_texts(body: Mapping[str, Any]) -> list[str]:
    """The prompt's text: system, then every message's text (what filters and logs read)."""
    return [piece.text for piece in prompt_pieces(body) if piece.kind == "text"]


def response_texts(body: Mapping[str, Any]) -> list[str]:
    """The generated text of a non-streaming Message: text and thinking blocks, tool input."""
    out: list[str] = []
    for block in body.get("content") or ():
        if not isinstance(block, dict):
            continue
        for key in ("text", "thinking"):
            if isinstance(block.get(key), str):
                out.append(block[key])
        if block.get("type") == "tool_use":
            out.append(orjson.dumps(block.get("input")).decode())
    return out
