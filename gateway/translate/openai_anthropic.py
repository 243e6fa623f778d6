"""An OpenAI-compatible upstream behind Anthropic Messages clients (``POST /v1/messages``).

Sans-IO pieces, no sockets and no clock:

- :func:`messages_request_to_chat`: a Messages body as an OpenAI ``/chat/completions`` body.
- :class:`ChatStreamToMessages`: OpenAI ``chat.completion.chunk`` events (and ``[DONE]``),
  one at a time, as Anthropic's named events: ``message_start``, ``ping``,
  ``content_block_start`` / ``content_block_delta`` / ``content_block_stop`` per block,
  ``message_delta``, ``message_stop``.
- :func:`chat_response_to_messages`: a non-streaming ``chat.completion`` as a Message.
- :func:`anthropic_error_body` / :func:`error_event`: a GatewayError in Anthropic's shape,
  ``{"type": "error", "error": {"type", "message"}}``, as a body or as ``event: error``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Final

import orjson

from gateway.errors import GatewayError, upstream_error
from gateway.sse import SSEEvent
from gateway.translate.openai_anthropic_request import (
    messages_request_to_chat,
)
from gateway.upstreams.errors import error_from_event

__all__ = [
    "STOP_REASONS",
    "ChatStreamToMessages",
    "anthropic_error_body",
    "anthropic_error_type",
    "chat_response_to_messages",
    "error_event",
    "messages_request_to_chat",
]
# OpenAI finish_reason -> Anthropic stop_reason. Anything else (a future value) is end_turn.
STOP_REASONS: Final[dict[str, str]] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


# ----- errors ---------------------------------------------------------------------------------

_TYPES_BY_STATUS: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_type(err: GatewayError) -> str:
    """Anthropic's error type for ``err``, from its status (and ``upstream_overloaded``).

    400 invalid_request_error, 401 authentication_error, 402 billing_error, 403
    permission_error, 404 not_found_error, 413 request_too_large, 429 rate_limit_error, 503
    and 529 (and code ``upstream_overloaded``) overloaded_error, 504 timeout_error, other
    4xx invalid_request_error, other 5xx api_error.
    """
    if err.code == "upstream_overloaded":
        return "overloaded_error"
    known = _TYPES_BY_STATUS.get(err.status)
    if known is not None:
        return known
    return "invalid_request_error" if 400 <= err.status < 500 else "api_error"


def anthropic_error_body(err: GatewayError, *, request_id: str | None = None) -> dict[str, Any]:
    """``err`` as an Anthropic error body (``request_id`` added when given, as Anthropic does)."""
    body: dict[str, Any] = {
        "type": "error",
        "error": {"type": anthropic_error_type(err), "message": err.message},
    }
    if request_id is not None:
        body["request_id"] = request_id
    return body


def error_event(err: GatewayError, *, request_id: str | None = None) -> SSEEvent:
    """``err`` as the final event of an Anthropic stream: ``event: error``."""
    return SSEEvent.from_json(anthropic_error_body(err, request_id=request_id), event="error")


# ----- usage ----------------------------------------------------------------------------------


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _anthropic_usage(usage: dict[str, Any]) -> dict[str, int]:
    """OpenAI usage as Anthropic's: input_tokens exclude the cached ones, reported apart."""
    out: dict[str, int] = {}
    prompt = _int(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    cached = _int(details.get("cached_tokens"))
    written = _int(details.get("cache_creation_input_tokens"))  # from an Anthropic upstream
    if prompt is not None:
        out["input_tokens"] = prompt - (cached or 0) - (written or 0)
    if cached is not None:
        out["cache_read_input_tokens"] = cached
    if written is not None:
        out["cache_creation_input_tokens"] = written
    out["output_tokens"] = _int(usage.get("completion_tokens")) or 0
    return out


def _stop(choice: dict[str, Any], refused: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for an OpenAI choice that finished.

    vLLM reports the stop string that matched as the choice's ``stop_reason``; that is an
    Anthropic ``stop_sequence`` stop. A refusal (OpenAI's ``refusal`` text) is ``refusal``.
    """
    finish = choice.get("finish_reason")
    if refused:
        return "refusal", None
    matched = choice.get("stop_reason")
    if finish == "stop" and isinstance(matched, str) and matched:
        return "stop_sequence", matched
    return (STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"), None


def _message_id(openai_id: Any) -> str:
    """`msg_` + the chunk id without `chatcmpl-`; an Anthropic id (`msg_...`) as it is."""
    if isinstance(openai_id, str) and openai_id:
        bare = openai_id.removeprefix("chatcmpl-")
        return bare if bare.startswith("msg_") else "msg_" + bare
    return f"msg_{uuid.uuid4().hex}"


# ----- streaming ------------------------------------------------------------------------------


def _event(obj: dict[str, Any]) -> SSEEvent:
    return SSEEvent.from_json(obj, event=obj["type"])


@dataclass(slots=True)
class _Block:
    """The content block open right now: its Anthropic index and kind ("text" or "tool")."""

    index: int
    kind: str


class ChatStreamToMessages:
    """One OpenAI chunk stream as Anthropic stream events; one instance per request.

    Feed every decoded upstream event (chunks and ``[DONE]``) to :meth:`feed` in order. The
    first chunk yields ``message_start`` and a ``ping``; text deltas and tool-call deltas open,
    fill and close content blocks (one open at a time, text closed before a tool block, as
    Anthropic does). The end comes after the finish chunk, with the usage-only chunk (the
    request asked for ``stream_options.include_usage``, see :func:`messages_request_to_chat`)
    or ``[DONE]``, whichever is first: ``message_delta`` (``stop_reason``, and ``usage`` with
    ``output_tokens``, plus ``input_tokens`` / ``cache_read_input_tokens`` /
    ``cache_creation_input_tokens`` when the upstream reported them, which the Anthropic SDKs
    take over from ``message_start``), then ``message_stop``, and ``done`` is set.

    ``message_start`` carries ``input_tokens`` = the constructor's hint (e.g. a local count;
    0 by default) unless the first chunk already had usage (then its input and cache counts).
    ``usage`` is the upstream's latest OpenAI-shaped usage, for ``ctx.usage.set_from_upstream``.
    An in-band error object sets ``error`` and nothing more is translated; end the stream with
    :func:`error_event`. Only choice 0 is translated. Arguments for a tool call whose block
    was already closed (upstreams that interleave parallel calls) are still sent, with that
    block's index.
    """

    def __init__(self, model: str, *, input_tokens: int = 0, message_id: str | None = None) -> None:
        self.model = model
        self.message_id = message_id
        self.input_tokens = input_tokens
        self.done = False
        self.error: GatewayError | None = None
        self.usage: dict[str, Any] | None = None
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None
        self._started = False
        self._open: _Block | None = None
        self._next_index = 0
        self._tool_blocks: dict[int, int] = {}  # OpenAI tool call index -> block index
        self._refused = False

    def feed(self, event: SSEEvent) -> list[SSEEvent]:
        """Translate one upstream event into zero or more client events."""
        if self.done or self.error is not None or event.data_bytes is None:
            return []
        if event.is_done:
            return self._finish()
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
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        out = self._start(payload.get("id"))
        choices = payload.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                out += self._choice(choice)
        if not choices and isinstance(usage, dict) and self.stop_reason is not None:
            out += self._finish()  # the usage-only chunk after the finish chunk
        return out

    def _start(self, openai_id: Any) -> list[SSEEvent]:
        if self._started:
            return []
        self._started = True
        if self.message_id is None:
            self.message_id = _message_id(openai_id)
        usage: dict[str, int] = {"input_tokens": self.input_tokens, "output_tokens": 0}
        if self.usage is not None:  # the prompt's usage, cache fields included, when reported
            prompt = _anthropic_usage(self.usage)
            del prompt["output_tokens"]
            usage.update(prompt)
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        return [_event({"type": "message_start", "message": message}), _event({"type": "ping"})]

    def _choice(self, choice: dict[str, Any]) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key in ("content", "refusal"):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    self._refused = self._refused or key == "refusal"
                    out += self._text(text)
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                if isinstance(call, dict):
                    out += self._tool_call(call)
        if choice.get("finish_reason") and self.stop_reason is None:
            self.stop_reason, self.stop_sequence = _stop(choice, self._refused)
            out += self._close()
        return out

    def _open_block(self, kind: str, content_block: dict[str, Any]) -> list[SSEEvent]:
        out = self._close()
        index = self._next_index
        self._next_index += 1
        self._open = _Block(index, kind)
        start = {"type": "content_block_start", "index": index, "content_block": content_block}
        out.append(_event(start))
        return out

    def _close(self) -> list[SSEEvent]:
        if self._open is None:
            return []
        index = self._open.index
        self._open = None
        return [_event({"type": "content_block_stop", "index": index})]

    def _text(self, text: str) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        if self._open is None or self._open.kind != "text":
            out += self._open_block("text", {"type": "text", "text": ""})
        assert self._open is not None
        delta = {"type": "text_delta", "text": text}
        out.append(
            _event({"type": "content_block_delta", "index": self._open.index, "delta": delta})
        )
        return out

    def _tool_call(self, call: dict[str, Any]) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        position = call.get("index", 0)
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        if not isinstance(position, int):
            position = 0
        if position not in self._tool_blocks:
            tool_id = call.get("id")
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": tool_id
                if isinstance(tool_id, str) and tool_id
                else f"toolu_{uuid.uuid4().hex}",
                "name": fn.get("name") if isinstance(fn.get("name"), str) else "",
                "input": {},
            }
            out += self._open_block("tool", block)
            self._tool_blocks[position] = self._next_index - 1
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            index = self._tool_blocks[position]
            out.append(_event({"type": "content_block_delta", "index": index, "delta": delta}))
        return out

    def _finish(self) -> list[SSEEvent]:
        out = self._start(None)
        out += self._close()
        usage = _anthropic_usage(self.usage) if self.usage is not None else {"output_tokens": 0}
        delta = {"stop_reason": self.stop_reason or "end_turn", "stop_sequence": self.stop_sequence}
        out.append(_event({"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(_event({"type": "message_stop"}))
        self.done = True
        return out


# ----- non-streaming --------------------------------------------------------------------------


def chat_response_to_messages(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A non-streaming OpenAI ``chat.completion`` as an Anthropic Message for ``model``.

    Choice 0 only: its text (and refusal text, with stop_reason ``refusal``) as a text block,
    its tool calls as ``tool_use`` blocks. An error body raises its GatewayError; tool-call
    arguments that are not a JSON object raise a 502 (code ``upstream_invalid_tool_arguments``)
    rather than handing the client a ``tool_use`` with made-up input.
    """
    if "error" in body or body.get("object") == "error":
        raise error_from_event(body) or upstream_error("The upstream reported an error.")
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    message = choice.get("message") if isinstance(choice, dict) else None
    message = message if isinstance(message, dict) else {}
    content: list[dict[str, Any]] = []
    refusal = message.get("refusal")
    text = message.get("content")
    for piece in (text, refusal):
        if isinstance(piece, str) and piece:
            content.append({"type": "text", "text": piece})
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        content.append(_tool_use(call))
    stop_reason, stop_sequence = _stop(
        choice if isinstance(choice, dict) else {}, isinstance(refusal, str) and bool(refusal)
    )
    usage = body.get("usage")
    return {
        "id": _message_id(body.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _anthropic_usage(usage if isinstance(usage, dict) else {}),
    }


def _tool_use(call: Any) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    fn = fn if isinstance(fn, dict) else {}
    arguments = fn.get("arguments")
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise upstream_error(
            "The upstream returned tool call arguments that are not a JSON object.",
            code="upstream_invalid_tool_arguments",
        )
    tool_id = call.get("id") if isinstance(call, dict) else None
    return {
        "type": "tool_use",
        "id": tool_id if isinstance(tool_id, str) and tool_id else f"toolu_{uuid.uuid4().hex}",
        "name": fn.get("name"),
        "input": parsed,
    }
