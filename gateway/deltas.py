"""Format-agnostic views of streamed text, for plugins that read or rewrite it.

Plugins see events in the format of their lane (`RequestContext.wire`). These helpers find
the generated text in an event (per choice index), rebuild an event with replaced text, and
build the events that stop an answer, so a plugin works the same on every lane: OpenAI chat
completions and completions, and Anthropic Messages on its native lane, where a "choice" is
a content block (text deltas keyed by the block's index; ``content_block_stop`` finishes
it; see `gateway.protocols.anthropic.views`), and OpenAI Responses on its native lane, where
a "choice" is an output item (``response.output_text.delta`` keyed by its
``output_index``; see `gateway.protocols.responses.views`). Each view pays one string
compare on the OpenAI lane for the others.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import orjson

from gateway.context import LOCAL_COUNT, Endpoint, RequestContext, StateKey
from gateway.protocols import ANTHROPIC, OPENAI
from gateway.protocols.anthropic import views as anthropic
from gateway.protocols.responses import views as responses
from gateway.sse import _UNSET, SSEEvent
from gateway.translate.openai_anthropic import STOP_REASONS

# A plain text chunk, as OpenAI, vLLM and Sluice's own translators write it: one choice,
# only text, no finish. A JSON string cannot hold an unescaped quote, so these byte patterns
# only ever match JSON tokens, never text inside a string.
_STRING: Final = rb'"([^"\\]*+(?:\\.[^"\\]*+)*+)"'
_CHAT_TEXT: Final = re.compile(
    rb'"choices":\[\{"index":(\d{1,9}),"delta":\{"content":'
    + _STRING
    + rb'\},(?:"logprobs":null,)?"finish_reason":null\}\]'
)
_COMPLETION_TEXT: Final = re.compile(
    rb'"choices":\[\{(?:"index":(\d{1,9}),"text":'
    + _STRING
    + rb'|"text":'
    + _STRING
    + rb',"index":(\d{1,9})),"logprobs":null,"finish_reason":null\}\]'
)
_CHAT: Final = Endpoint.CHAT
_COMPLETIONS: Final = Endpoint.COMPLETIONS


def _parsed(event: SSEEvent) -> dict[str, Any] | None:
    if event.data_bytes is None or event.is_done:
        return None
    try:
        obj = event.json()
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _choice_text(endpoint: Endpoint, choice: Mapping[str, Any]) -> str | None:
    if endpoint is Endpoint.CHAT:
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
    else:
        text = choice.get("text")
    return text if isinstance(text, str) else None


def event_texts(ctx: RequestContext, event: SSEEvent) -> dict[int, str]:
    """Generated text in `event` by choice index (empty if it carries none)."""
    obj = _parsed(event)
    if obj is None:
        return {}
    if ctx.wire != OPENAI:
        return anthropic.block_texts(obj) if ctx.wire == ANTHROPIC else responses.item_texts(obj)
    out: dict[int, str] = {}
    for choice in obj.get("choices") or ():
        if isinstance(choice, dict):
            text = _choice_text(ctx.endpoint, choice)
            if text:
                out[int(choice.get("index", 0))] = text
    return out


def text_delta(ctx: RequestContext, event: SSEEvent) -> tuple[int, str] | None:
    """(choice index, text) if `event` is a plain text chunk, else None: the hot path's view.

    A plain text chunk has exactly one choice, non-empty text (chat: a delta holding only
    ``content``), a null ``finish_reason`` and OpenAI's key order. For such a chunk,
    `event_texts` is ``{index: text}`` and `finish_reasons` is empty; None says nothing
    (use those two). Found by one regular expression over the data bytes, without parsing
    the JSON (the stream's later chunks by the bytes around the first one's text), and
    cached on the event, so every plugin after the first gets it for free.
    """
    view = event._view
    if view is _UNSET:
        view = event._view = _plain_text(ctx, event.data_bytes)
    if view is None or view[0] is not ctx.endpoint:
        return None
    return view[1]  # type: ignore[no-any-return]


_Plain = tuple[Endpoint, tuple[int, str], int, int]
"""A plain text chunk: its shape, (index, text), and where its quoted text is in the data."""

_Shape = tuple[Endpoint, int, bytes, bytes]
"""A stream's plain text chunks: shape, index, bytes up to the text, bytes after it to `]`."""

_SHAPE: StateKey[_Shape] = StateKey("deltas.shape")


def _view(ctx: RequestContext, event: SSEEvent) -> _Plain | None:
    view = event._view
    if view is _UNSET:
        view = event._view = _plain_text(ctx, event.data_bytes)
    return view  # type: ignore[no-any-return]


def _plain_text(ctx: RequestContext, data: bytes | None) -> _Plain | None:
    """The plain text chunk view of `data`, if it is one.

    A stream's text chunks differ only in their text (same id, model, key order): once one
    matched the pattern, the next ones are recognised by its bytes before and after the
    text, two comparisons instead of a regular expression.
    """
    if data is None:
        return None
    if ctx.wire != OPENAI:
        if ctx.wire == ANTHROPIC:
            return anthropic.text_view(ctx.endpoint, data)
        return responses.text_view(ctx.endpoint, data)
    shape = ctx.get(_SHAPE)
    if shape is not None and data.startswith(shape[2]):
        view = _by_shape(shape, data)
        if view is not None:
            return view
    found = _by_pattern(data)
    if found is None:
        return None
    view, close = found
    endpoint, (index, _), start, end = view
    ctx.set(_SHAPE, (endpoint, index, data[: start + 1], data[end - 1 : close]))
    return view


def _by_shape(shape: _Shape, data: bytes) -> _Plain | None:
    """The view of `data` if it is the stream's usual text chunk with a plain text."""
    endpoint, index, head, tail = shape
    start = len(head)
    end = data.find(tail, start)
    if end <= start:
        return None
    raw = data[start:end]
    # A quote in between: the text ended earlier (more keys follow it); an escape: the
    # pattern decodes it; a "choices" after the array: which one is the key?
    if 34 in raw or 92 in raw or data.find(b'"choices"', end + len(tail)) >= 0:
        return None
    try:
        return endpoint, (index, raw.decode()), start - 1, end + 1
    except UnicodeDecodeError:
        return None


def _by_pattern(data: bytes) -> tuple[_Plain, int] | None:
    """The view of `data` by the patterns, and where the choices array ends."""
    if (m := _CHAT_TEXT.search(data)) is not None:
        endpoint, group = _CHAT, 2
        index, raw = m.groups()
    elif (m := _COMPLETION_TEXT.search(data)) is not None:
        endpoint, group = _COMPLETIONS, 2
        index, raw, raw2, index2 = m.groups()
        if index is None:
            index, raw, group = index2, raw2, 3
    else:
        return None
    if not raw or data.count(b'"choices"') != 1:  # no text; or which "choices" is the key?
        return None
    try:
        text = orjson.loads(b'"' + raw + b'"') if 92 in raw else raw.decode()  # 92: backslash
    except ValueError:  # invalid UTF-8 or escape: the slow path decides
        return None
    start, end = m.span(group)
    return (endpoint, (0 if index == b"0" else int(index), text), start - 1, end + 1), m.end()


def _spliced(event: SSEEvent, view: _Plain, text: str, data: bytes) -> SSEEvent:
    """`event` with the text of its plain chunk replaced in its bytes, nothing re-encoded."""
    endpoint, (index, _), start, end = view
    quoted = orjson.dumps(text)
    out = SSEEvent(data[:start] + quoted + data[end:], event=event.event, id=event.id)
    if text:
        out._view = (endpoint, (index, text), start, start + len(quoted))
    else:
        out._view = None  # no text: not a plain text chunk
    return out


def finish_reasons(ctx: RequestContext, event: SSEEvent) -> dict[int, str]:
    """`finish_reason` per choice index for choices that finished in `event`."""
    obj = _parsed(event)
    if obj is None:
        return {}
    if ctx.wire != OPENAI:
        return anthropic.block_stops(obj) if ctx.wire == ANTHROPIC else responses.item_stops(obj)
    return {
        int(c.get("index", 0)): c["finish_reason"]
        for c in obj.get("choices") or ()
        if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)
    }


def with_texts(ctx: RequestContext, event: SSEEvent, texts: Mapping[int, str]) -> SSEEvent:
    """A copy of `event` whose text for each choice index in `texts` is replaced."""
    view = _view(ctx, event)
    if view is not None and view[0] is ctx.endpoint and len(texts) == 1:
        text = texts.get(view[1][0])
        data = event.data_bytes
        if text is not None and data is not None:
            return _spliced(event, view, text, data)
    obj = _parsed(event)
    if obj is None:
        return event
    if ctx.wire != OPENAI:
        if ctx.wire == ANTHROPIC:
            return anthropic.with_block_texts(event, obj, texts)
        return responses.with_item_texts(event, obj, texts)
    # Copy only the path that changes: the event's cached JSON must stay as it was.
    choices: list[Any] = []
    for choice in obj.get("choices") or ():
        index = int(choice.get("index", 0)) if isinstance(choice, dict) else -1
        if index not in texts:
            choices.append(choice)
            continue
        choice = dict(choice)
        if ctx.endpoint is Endpoint.CHAT:
            delta = choice.get("delta")
            choice["delta"] = {
                **(delta if isinstance(delta, dict) else {}),
                "content": texts[index],
            }
        else:
            choice["text"] = texts[index]
        choices.append(choice)
    return SSEEvent.from_json({**obj, "choices": choices}, event=event.event, id=event.id)


def text_event(
    ctx: RequestContext, template: SSEEvent, index: int, text: str, finish_reason: str | None = None
) -> SSEEvent:
    """A new event carrying `text` for one choice, shaped like `template` (same id, model).

    On the Anthropic lane: a text delta for block `index` (`finish_reason` is ignored there:
    use `stop_events`)."""
    if ctx.wire == ANTHROPIC:
        return anthropic.text_event(index, text)
    view = _view(ctx, template)
    data = template.data_bytes
    if (
        view is not None
        and view[0] is ctx.endpoint
        and view[1][0] == index
        and finish_reason is None
        and data is not None
        and b'"usage"' not in data  # (a copied running total would repeat an old count)
    ):
        return _spliced(SSEEvent(), view, text, data)
    obj = _parsed(template) or {}
    base = {k: v for k, v in obj.items() if k in ("id", "object", "created", "model")}
    if ctx.endpoint is Endpoint.CHAT:
        choice: dict[str, Any] = {"index": index, "delta": {"content": text} if text else {}}
    else:
        choice = {"index": index, "text": text}
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason
    return SSEEvent.from_json({**base, "choices": [choice]})


def stop_events(
    ctx: RequestContext, template: SSEEvent, index: int, finish_reason: str
) -> list[SSEEvent]:
    """The events that end choice `index` with `finish_reason` (after its last text).

    OpenAI: one chunk with the finish reason. Anthropic: ``content_block_stop`` for the
    block and ``message_delta`` with the matching stop reason (``content_filter`` is
    ``refusal``) and the local output count; the relay's ``message_stop`` follows when the
    plugin ends the stream.
    """
    if ctx.wire == ANTHROPIC:
        count = ctx.get(LOCAL_COUNT)
        reason = STOP_REASONS.get(finish_reason, finish_reason)
        return anthropic.stop_events(index, reason, count.completion_tokens if count else 0)
    return [text_event(ctx, template, index, "", finish_reason=finish_reason)]


def without_choices(ctx: RequestContext, event: SSEEvent, drop: set[int]) -> SSEEvent | None:
    """`event` without the choices in `drop` (None if nothing of it is left)."""
    obj = _parsed(event)
    if obj is None:
        return event
    if ctx.wire == ANTHROPIC:
        return anthropic.without_blocks(event, obj, drop)
    choices = obj.get("choices") or []
    kept = [c for c in choices if not (isinstance(c, dict) and int(c.get("index", 0)) in drop)]
    if len(kept) == len(choices):
        return event
    if not kept and obj.get("usage") is None:
        return None
    return SSEEvent.from_json({**obj, "choices": kept}, event=event.event, id=event.id)


def prompt_texts(endpoint: Endpoint, body: Mapping[str, Any], wire: str = OPENAI) -> list[str]:
    """Every piece of prompt text in a request body (messages' text parts, or the prompt;
    on the Anthropic lane the system prompt too)."""
    if wire != OPENAI:
        return anthropic.prompt_texts(body) if wire == ANTHROPIC else responses.prompt_texts(body)
    if endpoint is Endpoint.CHAT:
        out: list[str] = []
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                out.append(content)
            elif isinstance(content, list):
                out.extend(
                    part["text"]
                    for part in content
                    if isinstance(part, dict) and isinstance(part.get("text"), str)
                )
        return out
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        return [p for p in prompt if isinstance(p, str)]
    return []
