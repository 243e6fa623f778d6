"""OpenAI chat chunks as Responses stream events: the translated lane's way out (sans-IO).

One :class:`ChatStreamToResponses` per request, fed the chain's chunks in order. Events go
out as OpenAI sends them (``event: <type>`` and a ``data:`` object with ``type`` and a
``sequence_number`` counting from 0):

``response.created``, ``response.in_progress``; per output item
``response.output_item.added`` ... ``response.output_item.done``: a ``reasoning`` item
(``response.reasoning_summary_part.added``, ``response.reasoning_summary_text.delta`` /
``.done``, ``response.reasoning_summary_part.done``) while the upstream streams
``reasoning_content`` or ``reasoning`` deltas; a ``message`` item
(``response.content_part.added``, ``response.output_text.delta`` / ``.done``,
``response.content_part.done``); a ``function_call`` item per tool call
(``response.function_call_arguments.delta`` / ``.done``); then ``response.completed`` with
usage, or ``response.incomplete`` for a ``length`` or ``content_filter`` finish.

The text of open items is held until their ``.done`` events (the protocol repeats it
there), so memory per stream grows with the answer, as the stored conversation does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.errors import GatewayError, upstream_error
from gateway.protocols.responses.errors import error_event_body, response_error
from gateway.protocols.responses.objects import (
    Turn,
    incomplete_details,
    new_id,
    response_usage,
)
from gateway.protocols.responses.types import Item, Response, Status
from gateway.sse import SSEEvent
from gateway.upstreams.errors import error_from_event

__all__ = ["ChatStreamToResponses"]

Kind = Literal["reasoning", "message", "function_call"]


@dataclass(slots=True)
class _Open:
    """An output item being streamed."""

    kind: Kind
    index: int
    id: str
    text: list[str] = field(default_factory=list)  # text, summary or arguments so far
    call_id: str = ""
    name: str = ""

    def item(self, status: str) -> Item:
        text = "".join(self.text)
        if self.kind == "reasoning":
            summary = [{"type": "summary_text", "text": text}] if status == "completed" else []
            return {"type": "reasoning", "id": self.id, "summary": summary}  # type: ignore[typeddict-item]
        if self.kind == "message":
            content = (
                [{"type": "output_text", "text": text, "annotations": []}]
                if status == "completed"
                else []
            )
            return {
                "type": "message",
                "id": self.id,
                "status": status,
                "role": "assistant",
                "content": content,  # type: ignore[typeddict-item]
            }
        return {
            "type": "function_call",
            "id": self.id,
            "call_id": self.call_id,
            "name": self.name,
            "arguments": text if status == "completed" else "",
            "status": status,
        }


class ChatStreamToResponses:
    """One chat chunk stream as Responses events (see the module docstring).

    ``error`` is set by an in-band error chunk (nothing more is translated; the relay ends
    the stream with :meth:`fail`). ``on_done`` receives the final Response (completed or
    incomplete) before its event is returned, to store it.
    """

    def __init__(self, turn: Turn, on_done: Callable[[Response], None] | None = None) -> None:
        self.turn = turn
        self.on_done = on_done
        self.error: GatewayError | None = None
        self.done = False
        self._sequence = 0
        self._started = False
        self._output: dict[int, Item] = {}  # finished items by output index
        self._open: _Open | None = None  # the reasoning or message item being streamed
        self._calls: dict[int, _Open] = {}  # chat tool call index -> its function_call item
        self._next_index = 0
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    # -- encoding ----------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> SSEEvent:
        obj = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return SSEEvent.from_json(obj, event=kind)

    def _start(self) -> list[SSEEvent]:
        if self._started:
            return []
        self._started = True
        created = self.turn.response("in_progress", [])
        return [
            self._event("response.created", response=created),
            self._event("response.in_progress", response=created),
        ]

    # -- feeding -----------------------------------------------------------------------------

    def feed(self, event: SSEEvent) -> list[SSEEvent]:
        """Zero or more Responses events for one chat chunk (or ``[DONE]``)."""
        if self.done or self.error is not None or event.data_bytes is None:
            return []
        if event.is_done:
            return self._end()
        try:
            payload = event.json()
        except ValueError:
            self.error = upstream_error("The upstream sent an event that is not JSON.")
            return []
        if not isinstance(payload, dict):
            return []
        if "error" in payload or payload.get("object") == "error":
            self.error = error_from_event(payload) or upstream_error(
                "The upstream reported an error."
            )
            return []
        out = self._start()
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        choices = payload.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                out += self._choice(choice)
        if not choices and isinstance(usage, dict) and self._finish is not None:
            out += self._end()  # the usage-only chunk after the finish chunk
        return out

    def _choice(self, choice: dict[str, Any]) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key in ("reasoning_content", "reasoning"):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    out += self._reasoning(text)
            for key in ("content", "refusal"):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    out += self._text(text)
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                if isinstance(call, dict):
                    out += self._tool_call(call)
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish and self._finish is None:
            self._finish = finish
        return out

    def _open_item(
        self, kind: Kind, call_id: str = "", name: str = ""
    ) -> tuple[_Open, list[SSEEvent]]:
        out = self._close_open()
        prefix = {"reasoning": "rs", "message": "msg", "function_call": "fc"}[kind]
        item = _Open(kind, self._next_index, new_id(prefix), call_id=call_id, name=name)
        self._next_index += 1
        out.append(
            self._event(
                "response.output_item.added", output_index=item.index, item=item.item("in_progress")
            )
        )
        return item, out

    def _reasoning(self, text: str) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        item = self._open
        if item is None or item.kind != "reasoning":
            item, out = self._open_item("reasoning")
            self._open = item
            out.append(
                self._event(
                    "response.reasoning_summary_part.added",
                    item_id=item.id,
                    output_index=item.index,
                    summary_index=0,
                    part={"type": "summary_text", "text": ""},
                )
            )
        item.text.append(text)
        out.append(
            self._event(
                "response.reasoning_summary_text.delta",
                item_id=item.id,
                output_index=item.index,
                summary_index=0,
                delta=text,
            )
        )
        return out

    def _text(self, text: str) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        item = self._open
        if item is None or item.kind != "message":
            item, out = self._open_item("message")
            self._open = item
            out.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.id,
                    output_index=item.index,
                    content_index=0,
                    part={"type": "output_text", "text": "", "annotations": []},
                )
            )
        item.text.append(text)
        out.append(
            self._event(
                "response.output_text.delta",
                item_id=item.id,
                output_index=item.index,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return out

    def _tool_call(self, call: dict[str, Any]) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        position = call.get("index", 0)
        position = position if isinstance(position, int) else 0
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        item = self._calls.get(position)
        if item is None:
            call_id = call.get("id")
            name = fn.get("name")
            item, out = self._open_item(
                "function_call",
                call_id=call_id if isinstance(call_id, str) and call_id else new_id("call"),
                name=name if isinstance(name, str) else "",
            )
            self._calls[position] = item
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            item.text.append(arguments)
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.id,
                    output_index=item.index,
                    delta=arguments,
                )
            )
        return out

    # -- closing -----------------------------------------------------------------------------

    def _close_open(self) -> list[SSEEvent]:
        item, self._open = self._open, None
        if item is None:
            return []
        text = "".join(item.text)
        out: list[SSEEvent] = []
        at: dict[str, Any] = {"item_id": item.id, "output_index": item.index}
        if item.kind == "reasoning":
            part: dict[str, Any] = {"type": "summary_text", "text": text}
            out.append(
                self._event(
                    "response.reasoning_summary_text.done", **at, summary_index=0, text=text
                )
            )
            out.append(
                self._event(
                    "response.reasoning_summary_part.done", **at, summary_index=0, part=part
                )
            )
        else:
            part = {"type": "output_text", "text": text, "annotations": []}
            out.append(
                self._event(
                    "response.output_text.done", **at, content_index=0, text=text, logprobs=[]
                )
            )
            out.append(self._event("response.content_part.done", **at, content_index=0, part=part))
        return out + self._item_done(item)

    def _item_done(self, item: _Open) -> list[SSEEvent]:
        done = item.item("completed")
        self._output[item.index] = done
        return [self._event("response.output_item.done", output_index=item.index, item=done)]

    def _close_calls(self) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        for item in sorted(self._calls.values(), key=lambda call: call.index):
            arguments = "".join(item.text)
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=item.index,
                    name=item.name,
                    arguments=arguments,
                )
            )
            out += self._item_done(item)
        self._calls.clear()
        return out

    def _end(self) -> list[SSEEvent]:
        out = self._start()
        out += self._close_open()
        out += self._close_calls()
        usage = response_usage(self._usage or {})
        incomplete = incomplete_details(self._finish)
        status: Status = "incomplete" if incomplete is not None else "completed"
        final = self.turn.response(status, self._finished(), usage=usage, incomplete=incomplete)
        self.done = True
        if self.on_done is not None:
            self.on_done(final)
        out.append(self._event(f"response.{status}", response=final))
        return out

    def _finished(self) -> list[Item]:
        return [self._output[index] for index in sorted(self._output)]

    def fail(self, err: GatewayError) -> SSEEvent:
        """The final event for ``err`` after headers: ``response.failed`` once the response
        was created, else an ``error`` event."""
        self.done = True
        if not self._started:
            body = error_event_body(err, self._sequence)
            return SSEEvent.from_json(body, event="error")
        failed = self.turn.response("failed", self._finished(), error=response_error(err))
        return self._event("response.failed", response=failed)
