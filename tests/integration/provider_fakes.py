"""Byte-exact wire transcripts of the providers Sluice translates, and a fake that keeps queries.

Each builder writes what the real service puts on the wire, so the gateway's decoders and
translators are tested against the genuine framing:

- Anthropic Messages streams: named SSE events (``event: <type>`` then ``data: {...}``),
  compact JSON, ``ping`` with its space (``{"type": "ping"}``), ``event: error`` mid-stream.
- Ollama: NDJSON (one object per ``\\n``-terminated line, ``application/x-ndjson``),
  ``/api/chat`` objects with ``message``, ``/api/generate`` objects with ``response``,
  the final object with ``done: true`` and the eval counters.
- Azure OpenAI: chunks with alphabetically sorted keys, a leading ``"choices": []`` chunk
  carrying ``prompt_filter_results``, ``content_filter_results`` in choices, and a trailing
  asynchronous-filter annotation chunk.
- OpenAI-compatible servers' usage styles: vLLM continuous usage (running totals on every
  chunk) and llama.cpp (usage and timings on the finish chunk).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import openai
import orjson
from aiohttp import web
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk

from gateway.testing.fake_upstream import FakeUpstream, Script, openai_chunk, sse
from gateway.testing.harness import RunningGateway

CREATED: Final = 1700000000

# ----- a fake that also records query strings --------------------------------------------------


class RecordingUpstream(FakeUpstream):
    """A FakeUpstream that also keeps each request's query string (Azure's api-version)."""

    def __init__(self, default: Script | None = None) -> None:
        super().__init__(default)
        self.queries: list[str] = []

    @property
    def root(self) -> str:
        """`http://127.0.0.1:PORT`, for upstreams configured without `/v1`."""
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(request.query_string)
        return await super()._handle(request)


def root_url(fake: FakeUpstream) -> str:
    """`http://127.0.0.1:PORT` of any fake (Anthropic and Ollama base URLs have no /v1)."""
    return f"http://127.0.0.1:{fake.port}"


def cut_at(data: bytes, *positions: int) -> list[bytes]:
    """Split `data` at the given byte offsets (ascending), e.g. inside a UTF-8 sequence."""
    out: list[bytes] = []
    start = 0
    for pos in positions:
        out.append(data[start:pos])
        start = pos
    out.append(data[start:])
    return [piece for piece in out if piece]


def inside(data: bytes, needle: str, offset: int = 1) -> int:
    """The byte offset `offset` bytes into the first occurrence of `needle` (UTF-8)."""
    at = data.index(needle.encode())
    return at + offset


# ----- Anthropic Messages ------------------------------------------------------------------------

ANTHROPIC_PING: Final = b'event: ping\ndata: {"type": "ping"}\n\n'


def anthropic_event(payload: dict[str, Any]) -> bytes:
    """One named event as Anthropic writes it: `event: <type>`, then the JSON data line."""
    return (
        b"event: " + str(payload["type"]).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
    )


def anthropic_message_start(
    *,
    msg_id: str = "msg_01TestMessage",
    model: str = "claude-test",
    input_tokens: int = 25,
    cache_read: int = 0,
    cache_write: int = 0,
) -> bytes:
    """`message_start` with the prompt's usage (output_tokens is 1 there, as Anthropic sends)."""
    return anthropic_event(
        {
            "type": "message_start",
            "message": {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": input_tokens,
                    "cache_creation_input_tokens": cache_write,
                    "cache_read_input_tokens": cache_read,
                    "output_tokens": 1,
                },
            },
        }
    )


def anthropic_text_block(index: int, texts: Sequence[str], *, ping: bool = False) -> list[bytes]:
    """A text block: start, (a ping right after the start, as Anthropic does), deltas, stop."""
    events = [
        anthropic_event(
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "text", "text": ""},
            }
        )
    ]
    if ping:
        events.append(ANTHROPIC_PING)
    events += [
        anthropic_event(
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "text_delta", "text": text},
            }
        )
        for text in texts
    ]
    events.append(anthropic_event({"type": "content_block_stop", "index": index}))
    return events


def anthropic_tool_block(index: int, tool_id: str, name: str, pieces: Sequence[str]) -> list[bytes]:
    """A tool_use block whose input arrives as `input_json_delta` pieces (the first empty)."""
    events = [
        anthropic_event(
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}},
            }
        )
    ]
    events += [
        anthropic_event(
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": piece},
            }
        )
        for piece in ["", *pieces]
    ]
    events.append(anthropic_event({"type": "content_block_stop", "index": index}))
    return events


def anthropic_message_end(stop_reason: str, output_tokens: int) -> list[bytes]:
    """`message_delta` (stop reason and cumulative output tokens), then `message_stop`."""
    return [
        anthropic_event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            }
        ),
        anthropic_event({"type": "message_stop"}),
    ]


def anthropic_error_body(kind: str, message: str) -> dict[str, Any]:
    """Anthropic's error object, as an HTTP error body or in an `event: error`."""
    return {"type": "error", "error": {"type": kind, "message": message}}


def anthropic_error_event(kind: str, message: str) -> bytes:
    """A failure after the 200: `event: error`."""
    return anthropic_event(anthropic_error_body(kind, message))


def anthropic_message(
    content: list[dict[str, Any]],
    *,
    stop_reason: str = "end_turn",
    input_tokens: int = 12,
    output_tokens: int = 7,
) -> dict[str, Any]:
    """A non-streaming Message."""
    return {
        "id": "msg_01Unary",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


# ----- Ollama (NDJSON) --------------------------------------------------------------------------

OLLAMA_MODEL: Final = "llama3.2"
NDJSON: Final = "application/x-ndjson"


def ollama_line(obj: dict[str, Any]) -> bytes:
    """One NDJSON line."""
    return orjson.dumps(obj) + b"\n"


def ollama_chat_part(
    content: str, *, tool_calls: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An `/api/chat` stream object before the last."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return {
        "model": OLLAMA_MODEL,
        "created_at": "2024-11-05T14:02:11.123456Z",
        "message": message,
        "done": False,
    }


def ollama_done(
    *, chat: bool = True, done_reason: str = "stop", prompt: int = 26, completion: int = 4
) -> dict[str, Any]:
    """The last stream object (or a whole non-streaming answer's tail): counters and timings."""
    obj: dict[str, Any] = {"model": OLLAMA_MODEL, "created_at": "2024-11-05T14:02:12.5Z"}
    if chat:
        obj["message"] = {"role": "assistant", "content": ""}
    else:
        obj["response"] = ""
    obj.update(
        {
            "done_reason": done_reason,
            "done": True,
            "total_duration": 4883583458,
            "load_duration": 1334875,
            "prompt_eval_count": prompt,
            "prompt_eval_duration": 342546000,
            "eval_count": completion,
            "eval_duration": 4535599000,
        }
    )
    if not chat:
        obj["context"] = [1, 2, 3]
    return obj


def ollama_generate_part(text: str) -> dict[str, Any]:
    """An `/api/generate` stream object before the last."""
    return {
        "model": OLLAMA_MODEL,
        "created_at": "2024-11-05T14:02:11.5Z",
        "response": text,
        "done": False,
    }


def ndjson_script(chunks: Sequence[bytes]) -> Script:
    """An Ollama streaming response (chunks as given: split them awkwardly beforehand)."""
    return Script(list(chunks), content_type=NDJSON)


# ----- Azure OpenAI -----------------------------------------------------------------------------

AZURE_MODEL: Final = "gpt-4o-2024-08-06"
_SAFE: Final = {"filtered": False, "severity": "safe"}
_FILTERS: Final = {"hate": _SAFE, "self_harm": _SAFE, "sexual": _SAFE, "violence": _SAFE}


def azure_sse(obj: dict[str, Any]) -> bytes:
    """One event with Azure's alphabetically ordered keys."""
    return b"data: " + orjson.dumps(obj, option=orjson.OPT_SORT_KEYS) + b"\n\n"


def azure_stream(
    tokens: Sequence[str], *, usage: dict[str, int] | None = None
) -> tuple[list[bytes], dict[str, int]]:
    """A streamed Azure chat answer, one event per item, and the indexes of the special ones.

    Order: prompt-filter chunk (`choices: []`, empty id/model/object, created 0), role chunk,
    token chunks, finish chunk, asynchronous-filter annotation chunk, usage chunk (if given),
    `[DONE]`. The returned map names `prompt_filter`, `annotation` and `usage` positions.
    """
    prompt_filter = {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _FILTERS}],
    }
    envelope = {
        "created": CREATED,
        "id": "chatcmpl-AzureTest",
        "model": AZURE_MODEL,
        "object": "chat.completion.chunk",
        "system_fingerprint": "fp_azure",
    }

    def chunk(delta: dict[str, Any], finish: str | None, filters: dict[str, Any]) -> bytes:
        choice = {
            "content_filter_results": filters,
            "delta": delta,
            "finish_reason": finish,
            "index": 0,
            "logprobs": None,
        }
        return azure_sse({**envelope, "choices": [choice]})

    events = [azure_sse(prompt_filter)]
    events.append(chunk({"content": "", "refusal": None, "role": "assistant"}, None, {}))
    events += [chunk({"content": token}, None, _FILTERS) for token in tokens]
    events.append(chunk({}, "stop", {}))
    annotation = {
        "choices": [
            {
                "content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": 42},
                "content_filter_results": _FILTERS,
                "delta": {},
                "finish_reason": None,
                "index": 0,
            }
        ],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
    }
    events.append(azure_sse(annotation))
    where = {"prompt_filter": 0, "annotation": len(events) - 1}
    if usage is not None:
        where["usage"] = len(events)
        events.append(azure_sse({**envelope, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events, where


# ----- OpenAI-compatible servers: usage styles ----------------------------------------------------


def _with_usage(chunk: dict[str, Any], prompt: int, completion: int) -> bytes:
    # vLLM's key order: prompt, total, completion.
    usage = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    return sse({**chunk, "usage": usage})


def vllm_continuous_stream(
    tokens: Sequence[str], *, prompt: int, final_usage_chunk: bool = True
) -> list[bytes]:
    """vLLM with `continuous_usage_stats`: running totals on every chunk, one event per item.

    Role chunk (0 completion tokens), one chunk per token (1, 2, ... tokens), finish chunk
    (same total as the last token), then the usage-only chunk (if `final_usage_chunk`) and
    `[DONE]`.
    """
    events = [_with_usage(openai_chunk("", role=True, cid="chatcmpl-vllm"), prompt, 0)]
    for n, token in enumerate(tokens, start=1):
        events.append(_with_usage(openai_chunk(token, cid="chatcmpl-vllm"), prompt, n))
    done = openai_chunk(None, finish_reason="stop", cid="chatcmpl-vllm")
    events.append(_with_usage(done, prompt, len(tokens)))
    if final_usage_chunk:
        tail = {
            "id": "chatcmpl-vllm",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": "gpt-test",
            "choices": [],
        }
        events.append(_with_usage(tail, prompt, len(tokens)))
    events.append(b"data: [DONE]\n\n")
    return events


def llamacpp_stream(tokens: Sequence[str], *, prompt: int) -> list[bytes]:
    """llama.cpp server: usage (and timings) ride on the finish chunk; no usage-only chunk."""

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
            "created": CREATED,
            "id": "chatcmpl-llamacpp",
            "model": "gpt-test",
            "system_fingerprint": "b4567-abcdef",
            "object": "chat.completion.chunk",
        }

    events = [sse(chunk({"role": "assistant", "content": None}, None))]
    events += [sse(chunk({"content": token}, None)) for token in tokens]
    final = {
        **chunk({}, "stop"),
        "usage": {
            "completion_tokens": len(tokens),
            "prompt_tokens": prompt,
            "total_tokens": prompt + len(tokens),
        },
        "timings": {"prompt_n": prompt, "prompt_ms": 12.5, "predicted_n": len(tokens)},
    }
    events.append(sse(final))
    events.append(b"data: [DONE]\n\n")
    return events


def openai_obfuscated_stream(
    tokens: Sequence[str], *, usage: dict[str, int]
) -> tuple[list[bytes], int]:
    """api.openai.com today, with include_usage: every chunk says `"usage":null` and ends with
    an `obfuscation` padding string, the usage-only chunk too. Returns the events (one per
    item) and the index of the usage-only chunk.
    """
    base = {
        "id": "chatcmpl-Obf",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": "fp_0123456789",
    }
    pads = iter(["k3", "Zq9", "p", "W7xYa", "0rT", "mQ", "b8Lz", "Q"] * 8)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice], "usage": None, "obfuscation": next(pads)})

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": token}) for token in tokens]
    events.append(chunk({}, "stop"))
    full_usage = {
        **usage,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }
    at = len(events)
    events.append(sse({**base, "choices": [], "usage": full_usage, "obfuscation": "x7Rk2Pq9"}))
    events.append(b"data: [DONE]\n\n")
    return events, at


# ----- OpenAI tool-call stream (for /v1/messages) -------------------------------------------------


def openai_tool_stream(
    *,
    text: Sequence[str] = (),
    call_id: str = "call_abc123",
    name: str = "get_weather",
    pieces: Sequence[str] = (),
    usage: dict[str, int] | None = None,
) -> list[bytes]:
    """An OpenAI chat stream that says some text, then calls one tool, arguments in pieces."""
    base = {
        "id": "chatcmpl-tools",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "gpt-test",
        "system_fingerprint": None,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice]})

    events = [chunk({"role": "assistant", "content": None if not text else "", "refusal": None})]
    events += [chunk({"content": piece}) for piece in text]
    opening = {
        "index": 0,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    events.append(chunk({"tool_calls": [opening]}))
    events += [
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}) for piece in pieces
    ]
    events.append(chunk({}, "tool_calls"))
    if usage is not None:
        events.append(sse({**base, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events


# ----- reading named SSE events -------------------------------------------------------------------


def named_events(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name, parsed data) of every event of an LF-framed SSE body; no partial tail."""
    out: list[tuple[str | None, Any]] = []
    blocks = raw.split(b"\n\n")
    assert blocks[-1] == b"", f"stream ended inside an event: {blocks[-1]!r}"
    for block in blocks[:-1]:
        name: str | None = None
        data: list[bytes] = []
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data.append(line[6:])
        payload = b"\n".join(data)
        out.append((name, orjson.loads(payload) if data and payload != b"[DONE]" else payload))
    return out


# ----- reading what the OpenAI SDK got ------------------------------------------------------------


@dataclass
class ToolCallSeen:
    """One tool call as the client assembled it from its deltas."""

    id: str | None = None
    name: str = ""
    arguments: str = ""


@dataclass
class SDKStream:
    """Everything an OpenAI SDK stream yielded, kept even if iteration raised."""

    chunks: list[ChatCompletionChunk] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    tools: dict[int, ToolCallSeen] = field(default_factory=dict)
    finish: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The answer's text."""
        return "".join(self.texts)

    @property
    def usages(self) -> list[CompletionUsage]:
        """The usage objects of the chunks that had one."""
        return [chunk.usage for chunk in self.chunks if chunk.usage is not None]


async def read_sdk_stream(
    stream: openai.AsyncStream[ChatCompletionChunk], into: SDKStream | None = None
) -> SDKStream:
    """Iterate an SDK chat stream to its end, assembling text, tool calls and finish reasons."""
    seen = SDKStream() if into is None else into
    async for chunk in stream:
        seen.chunks.append(chunk)
        for choice in chunk.choices:
            if choice.delta.content:
                seen.texts.append(choice.delta.content)
            for call in choice.delta.tool_calls or []:
                tool = seen.tools.setdefault(call.index, ToolCallSeen())
                if call.id:
                    tool.id = call.id
                if call.function is not None:
                    tool.name += call.function.name or ""
                    tool.arguments += call.function.arguments or ""
            if choice.finish_reason:
                seen.finish.append(choice.finish_reason)
    return seen


@asynccontextmanager
async def openai_sdk(gw: RunningGateway) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official OpenAI SDK pointed at the gateway (no retries, bounded waits)."""
    client = openai.AsyncOpenAI(
        base_url=gw.v1, api_key="client-key-not-for-upstream", max_retries=0, timeout=10.0
    )
    try:
        yield client
    finally:
        await client.close()
