"""Plugin views of native Responses events and bodies: the text and reasoning in them.

A "choice" in the format-neutral views (`gateway.deltas`) is an output item here: text
deltas (``response.output_text.delta``) are keyed by their ``output_index``, and
``response.output_text.done`` finishes it. Only text deltas are views a plugin may edit
(`with_texts`); the events that repeat the whole text (``*.done``, ``response.completed``)
are not rewritten, which is why the content filter does not run on this lane.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final

import orjson

from gateway.context import Endpoint
from gateway.sse import SSEEvent

__all__ = [
    "TEXT_DONE",
    "generated_texts",
    "item_stops",
    "item_texts",
    "prompt_texts",
    "response_texts",
    "text_view",
    "with_item_texts",
]

TEXT_DELTA: Final = "response.output_text.delta"
TEXT_DONE: Final = "response.output_text.done"
"""The finish reason of an output item in `item_stops`."""
_HEAD: Final = b'{"type":"response.output_text.delta"'
_GENERATED: Final = frozenset(
    {
        TEXT_DELTA,
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
        "response.function_call_arguments.delta",
        "response.refusal.delta",
    }
)

View = tuple[Endpoint, tuple[int, str], int, int]
"""As `gateway.deltas`: endpoint, (output index, text), where the quoted text is in the data."""


def _index(payload: Mapping[str, Any]) -> int | None:
    index = payload.get("output_index")
    return index if isinstance(index, int) and not isinstance(index, bool) else None


def text_view(endpoint: Endpoint, data: bytes | None) -> View | None:
    """The text delta view of `data` (a ``response.output_text.delta`` as OpenAI writes it:
    ``type`` first), with where its ``delta`` string is in the bytes; else None."""
    if data is None or not data.startswith(_HEAD):
        return None
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    texts = item_texts(payload)
    if not texts:
        return None
    ((index, text),) = texts.items()
    quoted = orjson.dumps(text)
    at = data.find(b'"delta":' + quoted)
    if at < 0:  # escaped differently than orjson would: readable, but not spliced
        return None
    start = at + len(b'"delta":')
    return endpoint, (index, text), start, start + len(quoted)


def item_texts(payload: Any) -> dict[int, str]:
    """{output index: text} of a ``response.output_text.delta``, else {}."""
    if not isinstance(payload, dict) or payload.get("type") != TEXT_DELTA:
        return {}
    text, index = payload.get("delta"), _index(payload)
    return {index: text} if isinstance(text, str) and text and index is not None else {}


def item_stops(payload: Any) -> dict[int, str]:
    """{output index: `TEXT_DONE`} for a ``response.output_text.done``, else {}."""
    if not isinstance(payload, dict) or payload.get("type") != TEXT_DONE:
        return {}
    index = _index(payload)
    return {} if index is None else {index: TEXT_DONE}


def generated_texts(payload: Any) -> list[str]:
    """Every generated string in a delta event: text, reasoning (summary and raw),
    function call arguments, refusals; function names as their item is added."""
    if not isinstance(payload, dict):
        return []
    kind = payload.get("type")
    if kind in _GENERATED:
        delta = payload.get("delta")
        return [delta] if isinstance(delta, str) and delta else []
    if kind == "response.output_item.added":
        item = payload.get("item")
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            return [item["name"]]
    return []


def with_item_texts(event: SSEEvent, payload: Any, texts: Mapping[int, str]) -> SSEEvent:
    """`event` (a text delta) with its text replaced, if its output index is in `texts`."""
    found = item_texts(payload)
    if not found:
        return event
    (index,) = found
    if index not in texts:
        return event
    return SSEEvent.from_json({**payload, "delta": texts[index]}, event=event.event or TEXT_DELTA)


# ----- request and response bodies ------------------------------------------------------------


def _content_texts(content: Any) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def prompt_texts(body: Mapping[str, Any]) -> list[str]:
    """The prompt's text: instructions, then every input item's text (messages' content,
    function call outputs and arguments)."""
    out: list[str] = []
    if isinstance(body.get("instructions"), str):
        out.append(body["instructions"])
    source = body.get("input")
    if isinstance(source, str):
        out.append(source)
        return out
    for item in source if isinstance(source, list) else ():
        if not isinstance(item, dict):
            continue
        out.extend(_content_texts(item.get("content")))
        for key in ("output", "arguments"):
            if isinstance(item.get(key), str):
                out.append(item[key])
        for part in item.get("summary") or ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
    return out


def response_texts(body: Mapping[str, Any]) -> dict[int, str]:
    """The generated text of a non-streaming Response, by output index: message text,
    reasoning summaries, function call arguments."""
    out: dict[int, str] = {}
    for index, item in enumerate(body.get("output") or ()):
        if not isinstance(item, dict):
            continue
        pieces = list(_content_texts(item.get("content")))
        pieces += [
            p["text"]
            for p in item.get("summary") or ()
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
        if isinstance(item.get("arguments"), str):
            pieces.append(item["arguments"])
        if pieces:
            out[index] = "".join(pieces)
    return out
