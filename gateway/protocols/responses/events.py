"""A native Responses stream as the gateway observes it: terminal, errors, usage, the id.

The observer reads only the lifecycle events, by SSE event name (``response.created``,
``response.completed``, ``response.incomplete``, ``response.failed``, ``error``); the
output item and delta events that make up almost all of a stream are never parsed and
leave as their original bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from gateway.context import RequestContext
from gateway.errors import GatewayError, sanitise_message, upstream_error
from gateway.protocols.named_events import NamedEventObserver
from gateway.protocols.responses.errors import error_event_body, response_error
from gateway.sse import SSEEvent

__all__ = ["NativeResponsesObserver", "chat_usage", "error_of_event"]

_TERMINAL: Final = frozenset({"response.completed", "response.incomplete"})
_WATCHED: Final = frozenset({"response.created", "response.failed", "error", *_TERMINAL})


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def chat_usage(usage: Any) -> dict[str, Any] | None:
    """A Response's ``usage`` in the gateway's (chat) terms, or None if it has none."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": _int(usage.get("total_tokens")) or prompt + completion,
    }
    details = usage.get("input_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        out["prompt_tokens_details"] = {"cached_tokens": _int(details["cached_tokens"])}
    return out


def _error_object(payload: Any) -> dict[str, Any]:
    """The error inside an ``error`` event (itself) or a ``response.failed`` event."""
    if not isinstance(payload, dict):
        return {}
    err: Any = payload
    if payload.get("type") != "error":
        response = payload.get("response")
        err = response.get("error") if isinstance(response, dict) else payload.get("error")
    return err if isinstance(err, dict) else {}


def error_of_event(payload: Any) -> GatewayError:
    """An ``error`` event or a failed Response's ``error`` as a GatewayError: 429 for
    ``rate_limit_exceeded``, 400 for the client's request at fault, else 502."""
    err = _error_object(payload)
    message, code = err.get("message"), err.get("code")
    text = sanitise_message(message) if isinstance(message, str) else ""
    text = text or "The upstream failed."
    code = code if isinstance(code, str) and code else None
    if code == "rate_limit_exceeded":
        return GatewayError(429, text, type="rate_limit_error", code=code)
    if code in ("invalid_prompt", "invalid_request_error", "context_length_exceeded"):
        return GatewayError(400, text, type="invalid_request_error", code=code)
    return upstream_error(text, code=code or "upstream_error")


class NativeResponsesObserver(NamedEventObserver):
    """A Responses stream relayed to a Responses client: ``response.completed`` (or
    ``response.incomplete``) ends it, ``response.failed`` and ``error`` are errors.

    `on_created` gets the Response id once ``response.created`` arrives (where it is
    recorded, see `gateway.protocols.responses.native`). Usage is the terminal Response's.
    The upstream's own error event is kept (`failed`) so that it, not a copy, ends the
    stream.
    """

    WATCHED = _WATCHED

    def __init__(
        self,
        on_created: Callable[[str], None] | None = None,
        scrub: Callable[[GatewayError], GatewayError] | None = None,
    ) -> None:
        self._on_created = on_created
        self._scrub = scrub
        self.created: dict[str, Any] | None = None  # the Response as response.created had it
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.failed: tuple[GatewayError, SSEEvent] | None = None
        self._last: SSEEvent | None = None  # the last data event (its sequence_number)

    def _watched(self, kind: str | None, event: SSEEvent) -> GatewayError | None:
        try:
            payload = event.json()
        except ValueError:
            return upstream_error("The upstream sent an event that is not JSON.")
        if not isinstance(payload, dict):
            return None
        if kind == "error" or kind == "response.failed":
            error = error_of_event(payload)
            if self._scrub is not None:
                error = self._scrub(error)
            if error.message == _error_object(payload).get(
                "message"
            ):  # nothing to hide: the upstream's own event ends it
                self.failed = (error, event)
            return error
        response = payload.get("response")
        if not isinstance(response, dict):
            return None
        model = response.get("model")
        if isinstance(model, str):
            self.model = model[:200]
        if kind == "response.created":
            self.created = response
            response_id = response.get("id")
            if isinstance(response_id, str) and response_id and self._on_created is not None:
                self._on_created(response_id)
            return None
        self.done = True  # completed or incomplete
        self.usage = chat_usage(response.get("usage"))
        return None

    def finish(self, ctx: RequestContext) -> None:
        if self.model is not None:
            ctx.response_model = self.model
        if self.usage is not None:
            ctx.usage.set_from_upstream(self.usage)

    def _sequence(self) -> int:
        """One past the last event's ``sequence_number`` (0 if none was seen)."""
        if self._last is None or b'"sequence_number"' not in (self._last.data_bytes or b""):
            return 0
        try:
            payload = self._last.json()
        except ValueError:
            return 0
        number = payload.get("sequence_number") if isinstance(payload, dict) else None
        return number + 1 if isinstance(number, int) else 0

    def error_event(self, err: GatewayError) -> SSEEvent:
        """The upstream's own error event when `err` is the one it reported; else, once
        the response was created, ``response.failed`` with it; else an ``error`` event."""
        if self.failed is not None and self.failed[0] is err:
            return self.failed[1]
        sequence = self._sequence()
        if self.created is None:
            return SSEEvent.from_json(error_event_body(err, sequence), event="error")
        failed = {**self.created, "status": "failed", "error": response_error(err)}
        body = {"type": "response.failed", "response": failed, "sequence_number": sequence}
        return SSEEvent.from_json(body, event="response.failed")

    def terminal_event(self) -> SSEEvent | None:
        """A stream the gateway cut short (a plugin ended it): ``response.incomplete``."""
        response = {**(self.created or {}), "status": "incomplete"}
        response.setdefault("object", "response")
        response["incomplete_details"] = {"reason": "content_filter"}
        body = {
            "type": "response.incomplete",
            "response": response,
            "sequence_number": self._sequence(),
        }
        return SSEEvent.from_json(body, event="response.incomplete")
