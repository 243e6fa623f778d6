"""Ollama's native API (``/api/chat``, ``/api/generate``) behind OpenAI-format clients.

Sans-IO pieces, no sockets and no clock beyond a default ``created`` timestamp:

- :func:`chat_request_to_ollama` / :func:`completion_request_to_ollama` (in
  ``ollama_openai_request``): an OpenAI request body (``/v1/chat/completions`` /
  ``/v1/completions``) as an ``/api/chat`` / ``/api/generate`` body. What Ollama cannot do
  (``n`` > 1, remote image URLs, several prompts, ``echo``) is a 400 naming the parameter,
  never a silent change of meaning.
- :class:`NDJSONDecoder`: Ollama streams one JSON object per line
  (``application/x-ndjson``); byte chunks in, objects out.
- :class:`OllamaStreamToChat`: those objects as OpenAI ``chat.completion.chunk`` (or
  ``text_completion``) events, ending with ``[DONE]``.
- :class:`OllamaSSEDecoder`: both of the above behind the interface of
  :class:`gateway.sse.SSEDecoder`, so the proxy's pull loop and the OpenAI stream observer
  run unchanged on an Ollama upstream.
- :func:`ollama_response_to_chat` / :func:`ollama_response_to_completion`: ``stream: false``.

Ollama's stream, for reference::

    {"model":"llama3.2","created_at":"…","message":{"role":"assistant","content":"The"},"done":false}
    …
    {"model":"llama3.2","created_at":"…","message":{"role":"assistant","content":""},
     "done":true,"done_reason":"stop","prompt_eval_count":26,"eval_count":282,…}

``/api/generate`` objects carry ``"response": "text"`` instead of ``message``. A tool call
arrives whole, arguments as a JSON object, in ``message.tool_calls``. A failure after the
200 is one ``{"error": "text"}`` line.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final, NoReturn

import orjson

from gateway.errors import GatewayError, sanitise_message
from gateway.sse import SSEError, SSEEvent
from gateway.translate.ollama_openai_request import (
    SAMPLING_OPTIONS,
    chat_request_to_ollama,
    completion_request_to_ollama,
)

__all__ = [
    "MAX_LINE_BYTES",
    "SAMPLING_OPTIONS",
    "NDJSONDecoder",
    "NDJSONError",
    "OllamaSSEDecoder",
    "OllamaStreamToChat",
    "chat_request_to_ollama",
    "completion_request_to_ollama",
    "ollama_response_to_chat",
    "ollama_response_to_completion",
]
MAX_LINE_BYTES: Final = 1 << 20
_DONE: Final = b"[DONE]"


# ----- NDJSON -----------------------------------------------------------------------------


class NDJSONError(ValueError):
    """The byte stream is not valid NDJSON (bad JSON, not an object, or a line too long)."""


class NDJSONDecoder:
    """Incremental newline-delimited JSON parser: feed() byte chunks, get completed objects.

    Lines end in ``\\n`` or ``\\r\\n`` and may be split anywhere across chunks, including
    inside a multi-byte UTF-8 character (bytes are only decoded per complete line). Blank
    lines are skipped. Every line must be a JSON object. After an NDJSONError (a ValueError)
    the decoder is unusable and raises again on every call.
    """

    __slots__ = ("_buf", "_error", "_max_line")

    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._max_line = max_line_bytes
        self._buf = bytearray()  # the unterminated line so far
        self._error: str | None = None

    @property
    def has_pending(self) -> bool:
        """True if a non-blank unterminated line is held (at EOF: a truncated stream)."""
        return bool(self._buf) and not self._buf.isspace()

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        """Parse the next chunk; return the objects of the lines it completed."""
        if self._error is not None:
            raise NDJSONError(self._error)
        buf = self._buf
        end = chunk.rfind(b"\n")
        if end < 0:
            buf += chunk
            self._check_held()
            return []
        if buf:
            buf += chunk[:end]
            lines = bytes(buf).split(b"\n")
            buf.clear()
        else:
            lines = chunk[:end].split(b"\n")
        out = [obj for obj in map(self._parse, lines) if obj is not None]
        buf += chunk[end + 1 :]
        self._check_held()
        return out

    def flush(self) -> list[dict[str, Any]]:
        """End of stream: the last line may lack its newline; parse it if it is there."""
        if self._error is not None:
            raise NDJSONError(self._error)
        line = bytes(self._buf)
        self._buf.clear()
        obj = self._parse(line)
        return [] if obj is None else [obj]

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        if line[-1:] == b"\r":
            line = line[:-1]
        if len(line) > self._max_line:
            self._fail(f"NDJSON line of {len(line)} bytes exceeds max_line_bytes={self._max_line}")
        if not line or line.isspace():
            return None
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            self._fail(f"NDJSON line is not valid JSON ({err})")
        if not isinstance(obj, dict):
            self._fail(f"NDJSON line is a JSON {type(obj).__name__}, not an object")
        return obj

    def _check_held(self) -> None:
        buf = self._buf
        if len(buf) - (buf[-1:] == b"\r") > self._max_line:
            self._fail(f"NDJSON line exceeds max_line_bytes={self._max_line}")

    def _fail(self, message: str) -> NoReturn:
        self._error = message
        self._buf = bytearray()
        raise NDJSONError(message)


# ----- stream translation -----------------------------------------------------------------


def _usage(obj: Mapping[str, Any]) -> dict[str, int]:
    prompt = obj.get("prompt_eval_count")
    completion = obj.get("eval_count")
    prompt = prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else 0
    completion = (
        completion if isinstance(completion, int) and not isinstance(completion, bool) else 0
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _finish_reason(obj: Mapping[str, Any], tool_calls: bool) -> str:
    """``done_reason`` in OpenAI terms: length stays length, tool calls win over stop."""
    if obj.get("done_reason") == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def _arguments(arguments: Any) -> str:
    """Tool call arguments as OpenAI's JSON string (Ollama sends an object)."""
    if isinstance(arguments, str):
        return arguments
    if arguments is None:
        return "{}"
    return orjson.dumps(arguments).decode()


def _response_tool_call(call: Any, n: int) -> dict[str, Any] | None:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return None
    return {
        "id": f"call_{n}",
        "type": "function",
        "function": {"name": function["name"], "arguments": _arguments(function.get("arguments"))},
    }


def _error_message(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("message")
    if not isinstance(value, str) or not value:
        return "The upstream reported an error."
    return sanitise_message(value)


def _ollama_error(value: Any) -> GatewayError:
    return GatewayError(502, _error_message(value), type="upstream_error", code="upstream_error")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


class OllamaStreamToChat:
    """Ollama stream objects in, OpenAI stream events out, one request per instance.

    Chat (``endpoint_chat=True``, from ``/api/chat``): a first chunk with the assistant role,
    then content deltas (``thinking`` as ``reasoning_content`` deltas, as vLLM and DeepSeek
    send it), one chunk per tool call (id ``call_<n>``, n counting from 0 in this response,
    arguments a JSON string), a final chunk with ``finish_reason``, the usage-only chunk if
    ``include_usage``, and ``[DONE]``. Completions (``endpoint_chat=False``, from
    ``/api/generate``): ``text_completion`` chunks, no role chunk.

    After the final object ``done`` is True and ``usage`` holds the OpenAI usage object. An
    ``{"error": …}`` object sets ``error`` (502, message sanitised) and yields no event: the
    caller reports it. Objects after either are ignored.
    """

    def __init__(
        self,
        model: str,
        include_usage: bool,
        endpoint_chat: bool = True,
        *,
        response_id: str | None = None,
        created: int | None = None,
    ) -> None:
        self.model = model
        self.include_usage = include_usage
        self.endpoint_chat = endpoint_chat
        prefix = "chatcmpl-" if endpoint_chat else "cmpl-"
        self.response_id = response_id or prefix + uuid.uuid4().hex
        self.created = int(time.time()) if created is None else created
        self.done = False
        self.usage: dict[str, int] | None = None
        self.error: GatewayError | None = None
        self.finish_reason: str | None = None
        self._started = False
        self._tool_calls = 0

    def feed(self, obj: Mapping[str, Any]) -> list[SSEEvent]:
        """The OpenAI events for one Ollama stream object (possibly none)."""
        if self.done or self.error is not None:
            return []
        if "error" in obj:
            self.error = _ollama_error(obj["error"])
            return []
        events: list[SSEEvent] = []
        if self.endpoint_chat:
            if not self._started:
                self._started = True
                events.append(self._chat_chunk({"role": "assistant", "content": ""}))
            message = obj.get("message")
            if isinstance(message, dict):
                self._chat_deltas(message, events)
        else:
            text = _text(obj.get("response"))
            if text:
                events.append(self._text_chunk(text, None))
        if obj.get("done") is True:
            self._finish(obj, events)
        return events

    def _chat_deltas(self, message: Mapping[str, Any], events: list[SSEEvent]) -> None:
        thinking = _text(message.get("thinking"))
        if thinking:
            events.append(self._chat_chunk({"reasoning_content": thinking}))
        content = _text(message.get("content"))
        if content:
            events.append(self._chat_chunk({"content": content}))
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            out = _response_tool_call(call, self._tool_calls)
            if out is not None:
                delta = {"tool_calls": [{"index": self._tool_calls, **out}]}
                self._tool_calls += 1
                events.append(self._chat_chunk(delta))

    def _finish(self, obj: Mapping[str, Any], events: list[SSEEvent]) -> None:
        self.done = True
        self.usage = _usage(obj)
        reason = self.finish_reason = _finish_reason(obj, self._tool_calls > 0)
        if self.endpoint_chat:
            events.append(self._chat_chunk({}, reason))
        else:
            events.append(self._text_chunk("", reason))
        if self.include_usage:
            usage_chunk = {**self._envelope(), "choices": [], "usage": self.usage}
            events.append(SSEEvent.from_json(usage_chunk))
        events.append(SSEEvent(data=_DONE))

    def _envelope(self) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": "chat.completion.chunk" if self.endpoint_chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def _chat_chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> SSEEvent:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._event(choice)

    def _text_chunk(self, text: str, finish_reason: str | None) -> SSEEvent:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._event(choice)

    def _event(self, choice: dict[str, Any]) -> SSEEvent:
        chunk = {**self._envelope(), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk but the last says usage: null
        return SSEEvent.from_json(chunk)


class OllamaSSEDecoder:
    """Ollama NDJSON bytes in, OpenAI SSE events out: a drop-in for SSEDecoder in the proxy.

    Malformed NDJSON raises :class:`gateway.sse.SSEError` (as the SSE decoder does). An
    Ollama error object becomes one OpenAI-shaped ``{"error": {…}}`` event, which
    ``OpenAIObserver`` turns into the 502 the translator recorded; usage is in
    ``translator.usage`` (the client only gets a usage chunk if it asked for one).
    """

    __slots__ = ("_ndjson", "_reported", "translator")

    def __init__(
        self, translator: OllamaStreamToChat, *, max_line_bytes: int = MAX_LINE_BYTES
    ) -> None:
        self.translator = translator
        self._ndjson = NDJSONDecoder(max_line_bytes=max_line_bytes)
        self._reported = False

    @property
    def has_pending(self) -> bool:
        """True if a partial NDJSON line is held."""
        return self._ndjson.has_pending

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The OpenAI events completed by this chunk of Ollama's stream."""
        try:
            objects = self._ndjson.feed(chunk)
        except NDJSONError as err:
            raise SSEError(str(err)) from None
        return self._translate(objects)

    def flush(self) -> list[SSEEvent]:
        """End of stream: translate a final line that lacked its newline.

        A last line that does not parse was cut off: the stream is truncated (the proxy
        reports that when no terminal event came), not malformed.
        """
        try:
            objects = self._ndjson.flush()
        except NDJSONError:
            return []
        return self._translate(objects)

    def _translate(self, objects: Iterable[Mapping[str, Any]]) -> list[SSEEvent]:
        tr = self.translator
        events: list[SSEEvent] = []
        for obj in objects:
            events += tr.feed(obj)
            if tr.error is not None and not self._reported:
                self._reported = True
                events.append(SSEEvent.from_json(tr.error.body()))
        return events


# ----- unary responses --------------------------------------------------------------------


def _check_unary(body: Mapping[str, Any]) -> None:
    if "error" in body:
        raise _ollama_error(body["error"])


def ollama_response_to_chat(
    body: Mapping[str, Any],
    model: str,
    *,
    response_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A ``stream: false`` ``/api/chat`` answer as an OpenAI ``chat.completion`` object.

    Raises GatewayError 502 if the body is an Ollama error object.
    """
    _check_unary(body)
    message = body.get("message")
    message = message if isinstance(message, Mapping) else {}
    raw_calls = message.get("tool_calls")
    calls = [
        out
        for out in (
            _response_tool_call(call, n)
            for n, call in enumerate(raw_calls if isinstance(raw_calls, list) else ())
        )
        if out is not None
    ]
    content = _text(message.get("content"))
    out_message: dict[str, Any] = {
        "role": "assistant",
        "content": content or (None if calls else ""),
        "refusal": None,
    }
    if calls:
        out_message["tool_calls"] = calls
    thinking = _text(message.get("thinking"))
    if thinking:
        out_message["reasoning_content"] = thinking
    return {
        "id": response_id or "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": out_message,
                "logprobs": None,
                "finish_reason": _finish_reason(body, bool(calls)),
            }
        ],
        "usage": _usage(body),
    }


def ollama_response_to_completion(
    body: Mapping[str, Any],
    model: str,
    *,
    response_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A ``stream: false`` ``/api/generate`` answer as an OpenAI ``text_completion`` object."""
    _check_unary(body)
    return {
        "id": response_id or "cmpl-" + uuid.uuid4().hex,
        "object": "text_completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "text": _text(body.get("response")),
                "logprobs": None,
                "finish_reason": _finish_reason(body, False),
            }
        ],
        "usage": _usage(body),
    }
