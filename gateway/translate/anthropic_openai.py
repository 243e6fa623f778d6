"""An Anthropic Messages upstream (``POST /v1/messages``) behind OpenAI chat clients.

Sans-IO pieces, no sockets and no clock beyond a default ``created`` timestamp:

- :func:`chat_request_to_messages`: an OpenAI ``/v1/chat/completions`` body as a Messages body.
- :class:`MessagesStreamToChat`: Anthropic's named SSE events (``message_start`` …
  ``message_stop``), one at a time, as OpenAI ``chat.completion.chunk`` events ending with
  ``data: [DONE]``.
- :func:`messages_response_to_chat`: a non-streaming Message as a ``chat.completion``.
- :func:`error_from_anthropic`: an Anthropic error object (``{"type": "error", "error":
  {"type", "message"}}``) as the client's :class:`GatewayError`.

Anthropic's stream, for reference (each event also repeats its type as ``event:``)::

    message_start        {"message": {"id": "msg_…", "usage": {"input_tokens": 25, …}, …}}
    content_block_start  {"index": 0, "content_block": {"type": "text", "text": ""}}
    ping
    content_block_delta  {"index": 0, "delta": {"type": "text_delta", "text": "Hi"}}
    content_block_stop   {"index": 0}
    content_block_start  {"index": 1, "content_block": {"type": "tool_use", "id", "name",
                          "input": {}}}
    content_block_delta  {"index": 1, "delta": {"type": "input_json_delta",
                          "partial_json": "{\\"city\\": "}}
    content_block_stop   {"index": 1}
    message_delta        {"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}
    message_stop

A failure after the 200 is ``event: error`` with ``{"type": "error", "error": {...}}``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from gateway.errors import GatewayError, sanitise_message, upstream_error
from gateway.sse import SSEEvent
from gateway.translate.anthropic_openai_request import (
    chat_request_to_messages,
)

__all__ = [
    "FINISH_REASONS",
    "MessagesStreamToChat",
    "chat_request_to_messages",
    "error_from_anthropic",
    "messages_response_to_chat",
]
# Anthropic stop_reason -> OpenAI finish_reason. Anything else (a future value) is "stop".
FINISH_REASONS: Final[dict[str, str]] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_DONE: Final = SSEEvent(data="[DONE]")


# ----- errors ---------------------------------------------------------------------------------

# Anthropic error types the client caused: the status is kept (as the proxy does for 4xx).
_CLIENT_ERRORS: Final[dict[str, int]] = {
    "invalid_request_error": 400,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
}
# The gateway's own key or account was refused: not something the client can fix.
_CREDENTIAL_ERRORS: Final = frozenset({"authentication_error", "permission_error", "billing_error"})


def error_from_anthropic(payload: Any) -> GatewayError:
    """An Anthropic error object (in-band ``event: error`` or an error body) as a GatewayError.

    Statuses follow the gateway's contract for upstream failures (docs/streaming.md):

    - ``invalid_request_error`` 400, ``not_found_error`` 404, ``request_too_large`` 413,
      ``rate_limit_error`` 429: the status is kept, ``type`` and ``code`` are Anthropic's type;
    - ``authentication_error`` / ``permission_error`` / ``billing_error``: 502
      ``upstream_auth_error`` (the gateway's credentials, not the client's);
    - ``timeout_error``: 504 ``timeout_error`` / ``upstream_timeout``;
    - ``overloaded_error`` (HTTP 529 at Anthropic): 502 ``upstream_error`` with code
      ``upstream_overloaded``. 529 is not an HTTP status OpenAI clients know, and every other
      upstream 5xx is a 502 here; the code keeps it distinguishable, and the OpenAI SDKs
      retry a 502 like a 529;
    - ``api_error`` and anything unknown: 502 ``upstream_error``.

    Messages are sanitised (length, control characters, credential-like strings).
    """
    err = payload.get("error") if isinstance(payload, dict) else None
    typ = err.get("type") if isinstance(err, dict) else None
    raw = err.get("message") if isinstance(err, dict) else None
    message = sanitise_message(raw) if isinstance(raw, str) and raw else None
    if typ in _CREDENTIAL_ERRORS:
        return upstream_error(
            f"The upstream refused the gateway's credentials ({typ}).", code="upstream_auth_error"
        )
    if isinstance(typ, str) and typ in _CLIENT_ERRORS:
        return GatewayError(
            _CLIENT_ERRORS[typ], message or f"The upstream reported {typ}.", type=typ, code=typ
        )
    if typ == "timeout_error":
        return GatewayError(
            504,
            message or "The upstream timed out.",
            type="timeout_error",
            code="upstream_timeout",
        )
    code = "upstream_overloaded" if typ == "overloaded_error" else "upstream_error"
    return upstream_error(message or "The upstream reported an error.", code=code)


# ----- usage ----------------------------------------------------------------------------------


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _openai_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Anthropic usage as OpenAI's: prompt tokens include the cached and cache-written ones."""
    cached = _int(usage.get("cache_read_input_tokens"))
    prompt = _int(usage.get("input_tokens")) + _int(usage.get("cache_creation_input_tokens"))
    prompt += cached
    completion = _int(usage.get("output_tokens"))
    details = {"cached_tokens": cached}
    if _int(usage.get("cache_creation_input_tokens")):  # kept apart for Anthropic clients
        details["cache_creation_input_tokens"] = _int(usage.get("cache_creation_input_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
    }


# ----- streaming ------------------------------------------------------------------------------


@dataclass(slots=True)
class _ToolCall:
    """A tool_use block being streamed as OpenAI tool call number ``index``."""

    index: int
    start_input: Any
    sent_arguments: bool = False


_Handler = Callable[["MessagesStreamToChat", dict[str, Any]], list[SSEEvent]]


class MessagesStreamToChat:
    """One Anthropic stream as OpenAI ``chat.completion.chunk`` events; one per request.

    Feed every decoded upstream event to :meth:`feed` in order. Afterwards:

    - ``done``: ``message_stop`` arrived and ``data: [DONE]`` was returned;
    - ``error``: the upstream sent ``event: error`` (see :func:`error_from_anthropic`), or
      an event that is not JSON; nothing more is translated, and the caller ends the client
      stream with its error event;
    - ``usage``: the upstream's OpenAI-shaped usage, for ``ctx.usage.set_from_upstream``:
      ``None`` until ``message_delta`` (or ``message_stop``) made it final, so a stream cut
      earlier is counted locally rather than as ``message_start``'s preliminary
      ``output_tokens: 1``;
    - ``finish_reason``: the OpenAI finish reason once ``message_delta`` arrived.

    With ``include_usage`` (the client's ``stream_options.include_usage``), every chunk has
    ``"usage": null`` and a last chunk with ``"choices": []`` and the usage precedes
    ``[DONE]``, as OpenAI does. With ``usage_at_start`` (an Anthropic client behind the
    chain), the first chunk carries ``message_start``'s usage instead of ``null``, so the
    client's own ``message_start`` can report the upstream's input and cache tokens.
    Thinking, redacted-thinking, server-tool and citation content has no OpenAI chat
    equivalent and is left out.
    """

    def __init__(
        self,
        model: str,
        *,
        include_usage: bool = False,
        usage_at_start: bool = False,
        created: int | None = None,
    ):
        self.model = model
        self.include_usage = include_usage
        self.usage_at_start = usage_at_start
        self.created = int(time.time()) if created is None else created
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.done = False
        self.error: GatewayError | None = None
        self.finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._final = False  # message_delta or message_stop arrived: _usage is the total
        self._started = False
        self._tools: dict[int, _ToolCall] = {}  # Anthropic block index -> tool call

    @property
    def usage(self) -> dict[str, Any] | None:
        """Final usage in OpenAI's shape (prompt/completion/total tokens), or None before."""
        return None if self._usage is None or not self._final else _openai_usage(self._usage)

    def feed(self, event: SSEEvent) -> list[SSEEvent]:
        """Translate one upstream event into zero or more client events."""
        if self.done or self.error is not None or event.data_bytes is None:
            return []
        try:
            payload = event.json()
        except ValueError:
            self.error = upstream_error("The upstream sent an event that is not JSON.")
            return []
        if not isinstance(payload, dict):
            return []
        kind = payload.get("type", event.event)
        handler = self._HANDLERS.get(kind) if isinstance(kind, str) else None
        return [] if handler is None else handler(self, payload)

    # -- chunk builders --

    def _chunk(
        self, delta: dict[str, Any], finish_reason: str | None = None, usage: Any = None
    ) -> SSEEvent:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self.include_usage or usage is not None:
            obj["usage"] = usage
        return SSEEvent.from_json(obj)

    def _emit(self, delta: dict[str, Any], finish_reason: str | None = None) -> list[SSEEvent]:
        """A chunk, preceded by the role chunk if none went out yet."""
        out = self._start()
        out.append(self._chunk(delta, finish_reason))
        return out

    def _start(self) -> list[SSEEvent]:
        if self._started:
            return []
        self._started = True
        usage = _openai_usage(self._usage) if self.usage_at_start and self._usage else None
        return [self._chunk({"role": "assistant", "content": ""}, usage=usage)]

    def _tool_arguments(self, tool: _ToolCall, arguments: str) -> list[SSEEvent]:
        tool.sent_arguments = True
        return self._emit(
            {"tool_calls": [{"index": tool.index, "function": {"arguments": arguments}}]}
        )

    # -- event handlers --

    def _on_message_start(self, payload: dict[str, Any]) -> list[SSEEvent]:
        message = payload.get("message")
        if isinstance(message, dict):
            if isinstance(message.get("id"), str) and message["id"]:
                self.id = f"chatcmpl-{message['id']}"
            self._record_usage(message.get("usage"))
        if self._usage is None:
            self._usage = {}
        return self._start()

    def _on_block_start(self, payload: dict[str, Any]) -> list[SSEEvent]:
        block = payload.get("content_block")
        index = payload.get("index")
        if not isinstance(block, dict):
            return []
        if block.get("type") == "text":
            text = block.get("text")
            return self._emit({"content": text}) if isinstance(text, str) and text else []
        if block.get("type") != "tool_use" or not isinstance(index, int):
            return []
        tool = self._tools[index] = _ToolCall(len(self._tools), block.get("input"))
        call = {
            "index": tool.index,
            "id": block.get("id"),
            "type": "function",
            "function": {"name": block.get("name"), "arguments": ""},
        }
        return self._emit({"tool_calls": [call]})

    def _on_block_delta(self, payload: dict[str, Any]) -> list[SSEEvent]:
        delta = payload.get("delta")
        if not isinstance(delta, dict):
            return []
        if delta.get("type") == "text_delta":
            text = delta.get("text")
            return self._emit({"content": text}) if isinstance(text, str) and text else []
        if delta.get("type") == "input_json_delta":
            tool = self._tool_at(payload)
            partial = delta.get("partial_json")
            if tool is not None and isinstance(partial, str) and partial:
                return self._tool_arguments(tool, partial)
        return []

    def _on_block_stop(self, payload: dict[str, Any]) -> list[SSEEvent]:
        tool = self._tool_at(payload)
        if tool is None or tool.sent_arguments:
            return []
        # No input was streamed (a tool without parameters): OpenAI clients json.loads()
        # the arguments, so send "{}" (or the input given whole at the start) rather than "".
        start = tool.start_input if isinstance(tool.start_input, dict) else {}
        return self._tool_arguments(tool, orjson.dumps(start).decode())

    def _on_message_delta(self, payload: dict[str, Any]) -> list[SSEEvent]:
        self._record_usage(payload.get("usage"))
        self._final = self._final or isinstance(payload.get("usage"), dict)
        delta = payload.get("delta")
        stop_reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        if stop_reason is None or self.finish_reason is not None:
            return []
        self.finish_reason = FINISH_REASONS.get(stop_reason, "stop")
        return self._emit({}, self.finish_reason)

    def _on_message_stop(self, payload: dict[str, Any]) -> list[SSEEvent]:
        self._final = True
        out: list[SSEEvent] = []
        if self.finish_reason is None:  # no message_delta: still end the choice properly
            self.finish_reason = "stop"
            out += self._emit({}, "stop")
        if self.include_usage:
            out.append(
                SSEEvent.from_json(
                    {
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": self.usage or _openai_usage({}),
                    }
                )
            )
        out.append(_DONE)
        self.done = True
        return out

    def _on_error(self, payload: dict[str, Any]) -> list[SSEEvent]:
        self.error = error_from_anthropic(payload)
        return []

    def _tool_at(self, payload: dict[str, Any]) -> _ToolCall | None:
        index = payload.get("index")
        return self._tools.get(index) if isinstance(index, int) else None

    def _record_usage(self, usage: Any) -> None:
        """Counts are cumulative: a later value replaces an earlier one, absent ones stay."""
        if not isinstance(usage, dict):
            return
        current = self._usage if self._usage is not None else {}
        for key in (
            "input_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "output_tokens",
        ):
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                current[key] = value
        self._usage = current

    _HANDLERS: Final[dict[str, _Handler]] = {
        "message_start": _on_message_start,
        "content_block_start": _on_block_start,
        "content_block_delta": _on_block_delta,
        "content_block_stop": _on_block_stop,
        "message_delta": _on_message_delta,
        "message_stop": _on_message_stop,
        "error": _on_error,
    }  # "ping" and event types added in the future translate to nothing


# ----- non-streaming --------------------------------------------------------------------------


def messages_response_to_chat(
    body: dict[str, Any], model: str, *, created: int | None = None
) -> dict[str, Any]:
    """A non-streaming Anthropic Message as an OpenAI ``chat.completion`` for ``model``.

    Text blocks are concatenated into ``content`` (``None`` when the answer is only tool
    calls), ``tool_use`` blocks become ``tool_calls`` (input serialised as the arguments
    string); other blocks (thinking, server tools) are left out. An error body raises the
    GatewayError of :func:`error_from_anthropic`.
    """
    if body.get("type") == "error" or "error" in body:
        raise error_from_anthropic(body)
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    content = body.get("content")
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_use":
            arguments = block.get("input") if isinstance(block.get("input"), dict) else {}
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(arguments).decode(),
                    },
                }
            )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    stop_reason = body.get("stop_reason")
    msg_id = body.get("id")
    usage = body.get("usage")
    return {
        "id": f"chatcmpl-{msg_id}" if isinstance(msg_id, str) else f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(stop_reason, "stop")
                if isinstance(stop_reason, str)
                else "stop",
            }
        ],
        "usage": _openai_usage(usage if isinstance(usage, dict) else {}),
    }
