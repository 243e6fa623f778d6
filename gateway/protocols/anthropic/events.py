"""Anthropic's stream events: typed shapes, usage, and the native lane's stream observer.

The observer reads only what the gateway must know (the terminal ``message_stop``, an
``event: error``, usage from ``message_start`` and ``message_delta``), by the SSE event
name, so the ``content_block_*`` events that make up almost all of a stream are never
parsed and leave as their original bytes.
"""

from __future__ import annotations

from typing import Any, Final, Literal, TypedDict

from gateway.context import RequestContext
from gateway.errors import GatewayError, upstream_error
from gateway.protocols.anthropic.errors import error_event
from gateway.protocols.named_events import NamedEventObserver
from gateway.sse import SSEEvent
from gateway.translate.anthropic_openai import error_from_anthropic

__all__ = [
    "AnthropicUsage",
    "ContentBlockDelta",
    "MessageDelta",
    "NativeObserver",
    "openai_usage",
]


class AnthropicUsage(TypedDict, total=False):
    """Anthropic's usage object (``message_start.message.usage``, ``message_delta.usage``)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class TextDelta(TypedDict):
    type: Literal["text_delta"]
    text: str


class ContentBlockDelta(TypedDict):
    """``content_block_delta``: a piece of the block at ``index``."""

    type: Literal["content_block_delta"]
    index: int
    delta: dict[str, Any]  # text_delta, thinking_delta, signature_delta, input_json_delta, ...


class StopDelta(TypedDict, total=False):
    stop_reason: str | None
    stop_sequence: str | None


class MessageDelta(TypedDict, total=False):
    """``message_delta``: the stop reason and the cumulative usage."""

    type: Literal["message_delta"]
    delta: StopDelta
    usage: AnthropicUsage


_USAGE_KEYS: Final = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)
# Event names the observer looks into; every other one passes unread.
_WATCHED: Final = frozenset({"message_start", "message_delta", "message_stop", "error"})


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def openai_usage(usage: AnthropicUsage) -> dict[str, int]:
    """Anthropic usage in the gateway's terms: prompt tokens include cache reads and writes."""
    prompt = (
        _int(usage.get("input_tokens"))
        + _int(usage.get("cache_creation_input_tokens"))
        + _int(usage.get("cache_read_input_tokens"))
    )
    completion = _int(usage.get("output_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def merge_usage(current: AnthropicUsage, update: Any) -> None:
    """Counts are cumulative: a later value replaces an earlier one, absent ones stay."""
    if not isinstance(update, dict):
        return
    for key in _USAGE_KEYS:
        value = update.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            current[key] = value


class NativeObserver(NamedEventObserver):
    """An Anthropic stream relayed to an Anthropic client: ``message_stop`` ends it.

    Usage: ``message_start``'s input and cache counts, ``message_delta``'s output count;
    final (recorded as the upstream's) only once ``message_delta`` arrived, so a stream cut
    earlier is counted locally (``token_count``), as on the other lanes.
    """

    WATCHED = _WATCHED

    def __init__(self) -> None:
        self.usage: AnthropicUsage = {}
        self.final = False
        self.model: str | None = None

    def _watched(self, kind: str | None, event: SSEEvent) -> GatewayError | None:
        if kind == "message_stop":
            self.done = True
            return None
        try:
            payload = event.json()
        except ValueError:
            return upstream_error("The upstream sent an event that is not JSON.")
        if not isinstance(payload, dict):
            return None
        if kind == "error":
            return error_from_anthropic(payload)
        if kind == "message_start":
            message = payload.get("message")
            if isinstance(message, dict):
                merge_usage(self.usage, message.get("usage"))
                model = message.get("model")
                if isinstance(model, str):
                    self.model = model[:200]
        else:  # message_delta
            usage = payload.get("usage")
            merge_usage(self.usage, usage)
            self.final = self.final or isinstance(usage, dict)
        return None

    def finish(self, ctx: RequestContext) -> None:
        if self.model is not None:
            ctx.response_model = self.model
        if self.final or (self.done and self.usage):
            ctx.usage.set_from_upstream(openai_usage(self.usage))

    def error_event(self, err: GatewayError) -> SSEEvent:
        return error_event(err)

    def terminal_event(self) -> SSEEvent | None:
        return SSEEvent('{"type":"message_stop"}', event="message_stop")
