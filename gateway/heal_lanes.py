"""What stream healing knows per lane: the answer the client got so far, whether it may be
continued, and how a continuation's events are stitched into the client's stream.

A `Transcript` watches the events that left the chain (what the client got) and keeps
choice 0's text; it turns unhealable for good on a tool call, a second choice, logprobs or
a non-text block, and finished on a stop reason (a length or content-filter stop included:
nothing is left to continue). A `Seam` rewrites one continuation's events before the
chain sees them: the continuation's opening (OpenAI's role chunk, Anthropic's
``message_start`` and the ``content_block_start`` of the block being continued) is
swallowed, ids are the first attempt's, and usage objects add what earlier attempts spent.
Only continuation events are parsed; a stream that never breaks pays one JSON parse per
delivered event on healable routes (the transcript), nothing elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.sse import SSEEvent
from gateway.upstreams.base import Batch, StreamObserver

__all__ = [
    "AnthropicTranscript",
    "OpenAITranscript",
    "Seam",
    "SeamObserver",
    "Spent",
    "Transcript",
]


@dataclass(slots=True)
class Spent:
    """Tokens earlier attempts of a healed stream cost (their report, or the local count)."""

    prompt: int = 0
    completion: int = 0


@dataclass(slots=True)
class Transcript:
    """The client's answer so far (choice 0's text) and whether it can still be continued."""

    parts: list[str] = field(default_factory=list)
    blocked: str | None = None  # why it can never heal (tool call, n > 1, ...)
    finished: bool = False  # a stop reason was delivered: nothing to continue
    ids: dict[str, Any] = field(default_factory=dict)  # the first attempt's id, created, model

    @property
    def text(self) -> str:
        """What the client got of the answer, joined."""
        return "".join(self.parts)

    @property
    def healable(self) -> bool:
        """True while a continuation would extend the answer the client is reading."""
        return self.blocked is None and not self.finished

    def delivered(self, events: list[SSEEvent]) -> None:
        """Record events the client was sent."""
        raise NotImplementedError

    def seam(self, spent: Spent, withheld: str) -> Seam:
        """A rewriter for the next continuation's events."""
        raise NotImplementedError


def _payload(event: SSEEvent, *, fresh: bool = False) -> dict[str, Any] | None:
    """The event's JSON object; `fresh`: a new parse, safe to change (not the cached one)."""
    data = event.data_bytes
    if data is None or event.is_done:
        return None
    try:
        payload = orjson.loads(data) if fresh else event.json()
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


class OpenAITranscript(Transcript):
    """Chat completion chunks (the OpenAI chat lane)."""

    def delivered(self, events: list[SSEEvent]) -> None:
        for event in events:
            payload = _payload(event)
            if payload is None or self.blocked is not None:
                continue
            if not self.ids and "id" in payload:
                self.ids = {k: payload[k] for k in ("id", "created", "model") if k in payload}
            for choice in payload.get("choices") or ():
                self._choice(choice)

    def _choice(self, choice: Any) -> None:
        if not isinstance(choice, dict):
            return
        if choice.get("index", 0) != 0:
            self.blocked = "n"
            return
        if choice.get("logprobs"):
            self.blocked = "logprobs"
            return
        delta = choice.get("delta")
        if isinstance(delta, dict):
            if delta.get("tool_calls") or delta.get("function_call"):
                self.blocked = "tool_call"
                return
            if delta.get("refusal"):
                self.blocked = "refusal"
                return
            content = delta.get("content")
            if isinstance(content, str) and content:
                self.parts.append(content)
        if choice.get("finish_reason") is not None:
            self.finished = True

    def seam(self, spent: Spent, withheld: str) -> Seam:
        return _OpenAISeam(self.ids, spent, withheld)


_ANTHROPIC_OPENERS = frozenset({"message_start"})


class AnthropicTranscript(Transcript):
    """Anthropic Messages events (the native Anthropic lane): one text block, index 0."""

    started = False  # content_block_start 0 reached the client

    def delivered(self, events: list[SSEEvent]) -> None:
        for event in events:
            if event.data_bytes is None or self.blocked is not None:
                continue
            kind = event.event
            if kind in ("ping", "message_start"):
                continue
            payload = _payload(event)
            if payload is None:
                continue
            kind = kind or payload.get("type")
            if kind == "content_block_start":
                block = payload.get("content_block")
                if payload.get("index") != 0 or not isinstance(block, dict):
                    self.blocked = "block"
                elif block.get("type") != "text" or block.get("text"):
                    self.blocked = "block"  # tool_use, thinking, ...: never continued
                else:
                    self.started = True
            elif kind == "content_block_delta":
                delta = payload.get("delta")
                if payload.get("index") != 0 or not isinstance(delta, dict):
                    self.blocked = "block"
                elif delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                    self.parts.append(delta["text"])
                else:
                    self.blocked = "block"
            elif kind in ("content_block_stop", "message_delta", "message_stop"):
                self.finished = True  # the block is closed: the answer's text is whole

    def seam(self, spent: Spent, withheld: str) -> Seam:
        return _AnthropicSeam(self.started, spent, withheld)


class Seam:
    """Rewrites one continuation's events so the client sees one answer."""

    def __init__(self, spent: Spent, withheld: str) -> None:
        self.spent = spent
        self._withheld = withheld  # trailing whitespace the upstream was not sent

    def rewrite(self, events: list[SSEEvent]) -> list[SSEEvent]:
        """The continuation's events as the client's stream needs them."""
        out: list[SSEEvent] = []
        for event in events:
            if event.data_bytes is None or event.is_done:
                out.append(event)
                continue
            payload = _payload(event, fresh=True)
            if payload is None:
                out.append(event)
                continue
            changed = self._change(event, payload)
            if changed is not None:
                out.append(changed)
        return out

    def _change(self, event: SSEEvent, payload: dict[str, Any]) -> SSEEvent | None:
        raise NotImplementedError

    def stamp(self, event: SSEEvent) -> SSEEvent:
        """A usage event the gateway made up from the continuation's last event, as part of
        the first attempt's answer (its usage is the local count: nothing is added)."""
        return event

    def _skip_withheld(self, text: str) -> str:
        """The continuation's text minus the whitespace the client already has."""
        while self._withheld and text and text[0] == self._withheld[0]:
            text, self._withheld = text[1:], self._withheld[1:]
        if text:
            self._withheld = ""
        return text


class _OpenAISeam(Seam):
    def __init__(self, ids: dict[str, Any], spent: Spent, withheld: str) -> None:
        super().__init__(spent, withheld)
        self._ids = ids

    def _change(self, event: SSEEvent, payload: dict[str, Any]) -> SSEEvent | None:
        payload.update(self._ids)
        choices = payload.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            delta.pop("role", None)
            content = delta.get("content")
            if isinstance(content, str):
                delta["content"] = self._skip_withheld(content)
            if not delta.get("content") and choice.get("finish_reason") is None:
                delta.pop("content", None)
                if not delta:  # the role chunk (or nothing left of a chunk): swallowed
                    return None
        usage = payload.get("usage")
        if isinstance(usage, dict):
            _add(usage, "prompt_tokens", self.spent.prompt)
            _add(usage, "completion_tokens", self.spent.completion)
            _add(usage, "total_tokens", self.spent.prompt + self.spent.completion)
        return SSEEvent.from_json(payload)

    def stamp(self, event: SSEEvent) -> SSEEvent:
        payload = _payload(event, fresh=True)
        if payload is None or not self._ids:
            return event
        return SSEEvent.from_json({**payload, **self._ids}, event=event.event)


class _AnthropicSeam(Seam):
    def __init__(self, started: bool, spent: Spent, withheld: str) -> None:
        super().__init__(spent, withheld)
        self._started = started

    def _change(self, event: SSEEvent, payload: dict[str, Any]) -> SSEEvent | None:
        kind = event.event or payload.get("type")
        if kind in _ANTHROPIC_OPENERS:
            return None
        if kind == "content_block_start" and payload.get("index") == 0 and self._started:
            return None
        if kind == "content_block_delta":
            delta = payload.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("text"), str):
                delta["text"] = self._skip_withheld(delta["text"])
                if not delta["text"]:
                    return None
                return SSEEvent.from_json(payload, event=event.event)
        if kind == "message_delta" and isinstance(usage := payload.get("usage"), dict):
            _add(usage, "output_tokens", self.spent.completion)
            if "input_tokens" in usage:
                _add(usage, "input_tokens", self.spent.prompt)
            return SSEEvent.from_json(payload, event=event.event)
        return event


class SeamObserver(StreamObserver):
    """A continuation's observer, its made-up usage event stamped by the seam."""

    def __init__(self, inner: StreamObserver, seam: Seam) -> None:
        self._inner, self._seam = inner, seam

    def observe(self, ctx: RequestContext, event: SSEEvent) -> GatewayError | None:
        error = self._inner.observe(ctx, event)
        self.done = self._inner.done
        return error

    def classify(self, ctx: RequestContext, events: list[SSEEvent]) -> Batch:
        batch = self._inner.classify(ctx, events)
        self.done = self._inner.done
        return batch

    def finish(self, ctx: RequestContext) -> None:
        self._inner.finish(ctx)

    def usage_event(self, ctx: RequestContext) -> SSEEvent | None:
        event = self._inner.usage_event(ctx)
        return None if event is None else self._seam.stamp(event)

    def error_event(self, err: GatewayError) -> SSEEvent:
        return self._inner.error_event(err)

    def terminal_event(self) -> SSEEvent | None:
        return self._inner.terminal_event()


def _add(usage: dict[str, Any], key: str, amount: int) -> None:
    value = usage.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        usage[key] = value + amount
