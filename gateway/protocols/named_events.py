"""Observing streams of named SSE events (Anthropic Messages, OpenAI Responses).

Each event carries its type as its SSE name (`event: message_stop`), so the observer finds
the few it must act on (usage, the terminal event, errors) by name and parses only those;
every other event passes as it came, its bytes untouched.
"""

from __future__ import annotations

import abc
from typing import ClassVar

from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.sse import SSEEvent
from gateway.upstreams.base import Batch, StreamObserver

__all__ = ["NamedEventObserver", "event_kind"]


def event_kind(event: SSEEvent) -> str | None:
    """The event's type: its SSE name, else (an upstream that omits names) the JSON's."""
    if event.event is not None:
        return event.event
    try:
        payload = event.json()
    except ValueError:
        return None
    kind = payload.get("type") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) else None


class NamedEventObserver(StreamObserver):
    """A stream observer for a named-event protocol: `WATCHED` events go to `_watched`,
    which records what they say, sets `done` on the terminal one, or returns an error."""

    WATCHED: ClassVar[frozenset[str]]
    _last: SSEEvent | None = None  # the last data event seen

    @abc.abstractmethod
    def _watched(self, kind: str | None, event: SSEEvent) -> GatewayError | None:
        """Act on one watched event (its `kind`); an error if it is (or reports) one."""

    def observe(self, ctx: RequestContext, event: SSEEvent) -> GatewayError | None:
        kind = event_kind(event)
        self._last = event
        if kind not in self.WATCHED:
            return None
        return self._watched(kind, event)

    def classify(self, ctx: RequestContext, events: list[SSEEvent]) -> Batch:
        """The hot path: an event-name lookup per event; only watched events are parsed."""
        batch = Batch([])
        out = batch.events
        watched = self.WATCHED
        for event in events:
            if event.data_bytes is None:
                out.append(event)
                continue
            batch.has_data = True
            self._last = event
            kind = event.event
            if kind is None:
                kind = event_kind(event)
            if kind in watched:
                error = self._watched(kind, event)
                if error is not None:
                    batch.error = error
                    break
                if self.done:
                    batch.terminal = event
                    break
            out.append(event)
        return batch
