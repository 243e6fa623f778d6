"""Anthropic <-> OpenAI translation: requests, bodies, streams, and the official SDKs reading them.

Streams are built byte for byte as each provider sends them, decoded with the gateway's own
SSEDecoder, translated, and then served over loopback to the unmodified `openai` and
`anthropic` SDKs, which must parse them into the original text, tool input, stop reason and
usage.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise
from typing import Any

import anthropic
import openai
import orjson
import pytest
from anthropic.types import (
    InputJSONDelta,
    Message,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStreamEvent,
    TextBlock,
    TextDelta,
    ToolUseBlock,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from gateway.errors import GatewayError, bad_request, timeout_error, upstream_error
from gateway.sse import SSEDecoder, SSEEvent, encode_events
from gateway.testing.fake_upstream import FakeUpstream, Script, json_script, rechunk
from gateway.translate.anthropic_openai import (
    MessagesStreamToChat,
    chat_request_to_messages,
    error_from_anthropic,
    messages_response_to_chat,
)
from gateway.translate.openai_anthropic import (
    ChatStreamToMessages,
    anthropic_error_body,
    chat_response_to_messages,
    error_event,
    messages_request_to_chat,
)

CREATED = 1_700_000_000
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
    "AAAABJRU5ErkJggg=="
)
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "array", "items": {"type": "integer"}},
    },
    "required": ["city", "units", "days"],
    "additionalProperties": False,
}
OPENAI_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": WEATHER_SCHEMA,
    },
}
ANTHROPIC_TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": "Weather for a city.",
    "input_schema": WEATHER_SCHEMA,
}

# ----- helpers ------------------------------------------------------------------------------------


def decode(chunks: Iterable[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    assert not decoder.has_pending
    return events


def to_chat(stream: bytes | Iterable[bytes], **kwargs: Any) -> tuple[list[SSEEvent], Any]:
    """Decode an Anthropic byte stream and translate it; returns (events, translator)."""
    chunks = [stream] if isinstance(stream, bytes) else stream
    translator = MessagesStreamToChat("gpt-facing", created=CREATED, **kwargs)
    out: list[SSEEvent] = []
    for event in decode(chunks):
        out += translator.feed(event)
    return out, translator


def to_messages(stream: bytes | Iterable[bytes], **kwargs: Any) -> tuple[list[SSEEvent], Any]:
    """Decode an OpenAI byte stream and translate it; returns (events, translator)."""
    chunks = [stream] if isinstance(stream, bytes) else stream
    translator = ChatStreamToMessages("claude-facing", **kwargs)
    out: list[SSEEvent] = []
    for event in decode(chunks):
        out += translator.feed(event)
    return out, translator


def split_at(data: bytes, points: Iterable[int]) -> list[bytes]:
    cuts = [0, *sorted(set(points)), len(data)]
    return [data[a:b] for a, b in pairwise(cuts)]


# ----- an Anthropic stream, as Anthropic sends it -------------------------------------------------


def anthropic_event(obj: dict[str, Any]) -> bytes:
    return b"event: " + str(obj["type"]).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


ANTHROPIC_PING = b'event: ping\ndata: {"type": "ping"}\n\n'
TEXT_PIECES = ["Let me", " check the w\u00e9ather", " \U0001f30d for you."]
TOOL_INPUT: dict[str, Any] = {"city": "Paris", "units": "celsius", "days": [1, 2]}
TOOL_JSON = orjson.dumps(TOOL_INPUT).decode()
TOOL_PIECES = [TOOL_JSON[:9], TOOL_JSON[9:25], TOOL_JSON[25:]]
MSG_ID = "msg_01XFDUDYJgAACzvnptvVoYEL"
TOOLU_ID = "toolu_01T1x1fJ34qAmk2tNTrN7Up6"


def anthropic_stream(
    *,
    text: Iterable[str] = TEXT_PIECES,
    tool: bool = True,
    stop_reason: str = "tool_use",
    output_tokens: int = 89,
) -> bytes:
    start_message: dict[str, Any] = {
        "id": MSG_ID,
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 472,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 100,
            "output_tokens": 2,
        },
    }
    parts = [
        anthropic_event({"type": "message_start", "message": start_message}),
        anthropic_event(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        ),
        ANTHROPIC_PING,
    ]
    for piece in text:
        delta = {"type": "text_delta", "text": piece}
        parts.append(anthropic_event({"type": "content_block_delta", "index": 0, "delta": delta}))
    parts.append(anthropic_event({"type": "content_block_stop", "index": 0}))
    if tool:
        block = {"type": "tool_use", "id": TOOLU_ID, "name": "get_weather", "input": {}}
        parts.append(
            anthropic_event({"type": "content_block_start", "index": 1, "content_block": block})
        )
        for piece in ["", *TOOL_PIECES]:  # Anthropic opens with an empty partial_json
            delta = {"type": "input_json_delta", "partial_json": piece}
            parts.append(
                anthropic_event({"type": "content_block_delta", "index": 1, "delta": delta})
            )
        parts.append(anthropic_event({"type": "content_block_stop", "index": 1}))
    parts.append(
        anthropic_event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            }
        )
    )
    parts.append(anthropic_event({"type": "message_stop"}))
    return b"".join(parts)


ANTHROPIC_TRANSCRIPT = anthropic_stream()


# ----- an OpenAI stream, as OpenAI sends it -------------------------------------------------------

CHATCMPL_ID = "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"
CALL_ID = "call_DdmO9pD3xa9XTPNJ32zg2hcA"
CALL2_ID = "call_Xq0ZlL8mN2vPr4KsT7uW1yAb"
TIME_INPUT: dict[str, Any] = {"tz": "Europe/Paris"}
TIME_JSON = orjson.dumps(TIME_INPUT).decode()
OPENAI_USAGE: dict[str, Any] = {
    "prompt_tokens": 82,
    "completion_tokens": 37,
    "total_tokens": 119,
    "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}


def openai_event(
    delta: dict[str, Any] | None, finish_reason: str | None = None, *, usage: Any = None
) -> bytes:
    obj: dict[str, Any] = {
        "id": CHATCMPL_ID,
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "service_tier": "default",
        "system_fingerprint": "fp_eb9dce56a8",
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage,
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def tool_delta(index: int, arguments: str, *, call_id: str = "", name: str = "") -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        call["id"] = call_id
        call["type"] = "function"
        call["function"]["name"] = name
    return {"tool_calls": [call]}


def openai_transcript(*, usage_chunk: bool = True) -> bytes:
    parts = [openai_event({"role": "assistant", "content": "", "refusal": None})]
    parts += [openai_event({"content": piece}) for piece in TEXT_PIECES]
    parts.append(openai_event(tool_delta(0, "", call_id=CALL_ID, name="get_weather")))
    parts += [openai_event(tool_delta(0, piece)) for piece in TOOL_PIECES]
    parts.append(openai_event(tool_delta(1, TIME_JSON[:7], call_id=CALL2_ID, name="get_time")))
    parts.append(openai_event(tool_delta(1, TIME_JSON[7:])))
    parts.append(openai_event({}, "tool_calls"))
    if usage_chunk:
        parts.append(openai_event(None, usage=OPENAI_USAGE))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


OPENAI_TRANSCRIPT = openai_transcript()


# ===== OpenAI request -> Anthropic request ========================================================


def test_chat_request_full_conversation() -> None:
    body: dict[str, Any] = {
        "model": "gpt-facing",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather where these are?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/png;base64,{PNG_B64}", "detail": "low"},
                    },
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": TOOL_JSON},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "9am"}],
            },
            {"role": "user", "content": "Thanks. And tomorrow?"},
        ],
        "tools": [OPENAI_TOOL],
        "tool_choice": "required",
        "stop": "END",
        "max_completion_tokens": 300,
        "max_tokens": 999,
        "temperature": 0.2,
        "top_p": 0.9,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "user-42",
        "frequency_penalty": 0.5,
        "presence_penalty": 0.1,
        "seed": 7,
        "logprobs": True,
        "response_format": {"type": "json_object"},
    }
    assert chat_request_to_messages(body, "claude-sonnet-4-5") == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 300,
        "system": "You are terse.\n\nUse tools.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather where these are?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/a.jpg"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "call_1",
                        "name": "get_weather",
                        "input": TOOL_INPUT,
                    },
                    {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "9am"},
                    {"type": "text", "text": "Thanks. And tomorrow?"},
                ],
            },
        ],
        "tools": [ANTHROPIC_TOOL],
        "tool_choice": {"type": "any"},
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
        "stream": True,
        "metadata": {"user_id": "user-42"},
    }


def test_chat_request_minimal_gets_default_max_tokens_and_plain_strings() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    assert chat_request_to_messages(body, "claude-x") == {
        "model": "claude-x",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    assert chat_request_to_messages(body, "claude-x", default_max_tokens=64)["max_tokens"] == 64
    with_max = {**body, "max_tokens": 10, "stop": ["a", "b"], "top_k": 5}
    out = chat_request_to_messages(with_max, "claude-x")
    assert (out["max_tokens"], out["stop_sequences"], out["top_k"]) == (10, ["a", "b"], 5)


def test_chat_request_merges_consecutive_turns_and_skips_empty_text() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": "three"},
            {"role": "user", "content": ""},
        ],
    }
    assert chat_request_to_messages(body, "c")["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        },
        {"role": "assistant", "content": "three"},
    ]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        (None, None, None),
    ],
)
def test_chat_request_tool_choice(choice: Any, parallel: bool | None, expected: Any) -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    body["tools"] = [{"type": "function", "function": {"name": "noop"}}]
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    out = chat_request_to_messages(body, "c")
    assert out["tools"] == [{"name": "noop", "input_schema": {"type": "object", "properties": {}}}]
    assert out.get("tool_choice") == expected


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 2}, "n"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
                ]
            },
            "messages[0].content[0]",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:x"}}],
                    }
                ]
            },
            "messages[0].content[0]",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "[1]"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
        ({"tools": [OPENAI_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_chat_request_rejects_what_anthropic_cannot_express(
    change: dict[str, Any], param: str
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **change}
    with pytest.raises(GatewayError) as info:
        chat_request_to_messages(body, "c")
    assert (info.value.status, info.value.param) == (400, param)


# ===== Anthropic request -> OpenAI request ========================================================


def test_messages_request_full_conversation() -> None:
    body: dict[str, Any] = {
        "model": "claude-facing",
        "max_tokens": 1024,
        "system": [
            {"type": "text", "text": "You are terse."},
            {"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather here?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/a.jpg"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": TOOL_INPUT,
                    },
                    {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "is_error": True,
                        "content": [
                            {"type": "text", "text": "clock"},
                            {
                                "type": "image",
                                "source": {"type": "url", "url": "https://example.com/c.png"},
                            },
                            {"type": "text", "text": "broken"},
                        ],
                    },
                    {"type": "text", "text": "Thanks."},
                ],
            },
        ],
        "tools": [ANTHROPIC_TOOL],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END", "STOP"],
        "temperature": 0.3,
        "top_p": 0.8,
        "top_k": 40,
        "metadata": {"user_id": "user-42"},
        "stream": True,
        "thinking": {"type": "enabled", "budget_tokens": 2000},
    }
    assert messages_request_to_chat(body, "gpt-4o") == {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are terse.\n\nUse tools."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather here?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": TOOL_JSON},
                    },
                    {
                        "id": "toolu_2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{}"},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "clock\nbroken"},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "https://example.com/c.png"}},
                    {"type": "text", "text": "Thanks."},
                ],
            },
        ],
        "max_tokens": 1024,
        "tools": [OPENAI_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": ["END", "STOP"],
        "temperature": 0.3,
        "top_p": 0.8,
        "top_k": 40,
        "user": "user-42",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_messages_request_minimal_and_max_tokens_field() -> None:
    body = {
        "model": "c",
        "max_tokens": 5,
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "Hi"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
        ],
    }
    out = messages_request_to_chat(body, "o3", max_tokens_field="max_completion_tokens")
    assert out == {
        "model": "o3",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "t", "content": ""},
        ],
        "max_completion_tokens": 5,
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        (
            {"type": "tool", "name": "get_weather"},
            {"type": "function", "function": {"name": "get_weather"}},
        ),
    ],
)
def test_messages_request_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    body = {
        "model": "c",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [ANTHROPIC_TOOL],
        "tool_choice": choice,
    }
    out = messages_request_to_chat(body, "g")
    assert out["tool_choice"] == expected
    assert "parallel_tool_calls" not in out


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0]"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "document",
                                "source": {"type": "text", "data": "x", "media_type": "text/plain"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].content[0]",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"tools": [ANTHROPIC_TOOL], "tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({"system": [{"type": "image"}]}, "system[0]"),
    ],
)
def test_messages_request_rejects_what_openai_cannot_express(
    change: dict[str, Any], param: str
) -> None:
    body = {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], **change}
    with pytest.raises(GatewayError) as info:
        messages_request_to_chat(body, "g")
    assert (info.value.status, info.value.param) == (400, param)


def test_request_round_trip_keeps_a_tool_conversation() -> None:
    """OpenAI -> Anthropic -> OpenAI gives the same conversation back (ids, args, results)."""
    original: dict[str, Any] = {
        "model": "m",
        "max_tokens": 50,
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": TOOL_JSON},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "18C"},
            {"role": "assistant", "content": "It is 18C."},
        ],
        "tools": [OPENAI_TOOL],
        "stop": ["X"],
    }
    back = messages_request_to_chat(chat_request_to_messages(original, "c"), "m")
    assert back == original


# ===== Anthropic stream -> OpenAI chunks ==========================================================


def deltas(events: list[SSEEvent]) -> list[Any]:
    """(delta, finish_reason) per chunk, "usage" for the usage chunk, "[DONE]" for the end."""
    out: list[Any] = []
    for event in events:
        if event.is_done:
            out.append("[DONE]")
            continue
        chunk = event.json()
        if not chunk["choices"]:
            out.append(("usage", chunk["usage"]))
            continue
        (choice,) = chunk["choices"]
        out.append((choice["delta"], choice["finish_reason"]))
    return out


def test_anthropic_stream_to_chunks() -> None:
    events, translator = to_chat(ANTHROPIC_TRANSCRIPT, include_usage=True)
    usage = {
        "prompt_tokens": 572,
        "completion_tokens": 89,
        "total_tokens": 661,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    assert deltas(events) == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Let me"}, None),
        ({"content": " check the w\u00e9ather"}, None),
        ({"content": " \U0001f30d for you."}, None),
        (
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": TOOLU_ID,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            },
            None,
        ),
        *[
            ({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None)
            for piece in TOOL_PIECES
        ],
        ({}, "tool_calls"),
        ("usage", usage),
        "[DONE]",
    ]
    assert translator.done
    assert translator.error is None
    assert translator.usage == usage
    assert translator.finish_reason == "tool_calls"
    for event in events[:-1]:
        chunk = ChatCompletionChunk.model_validate(event.json())
        assert (chunk.id, chunk.model, chunk.created) == (
            f"chatcmpl-{MSG_ID}",
            "gpt-facing",
            CREATED,
        )
        assert chunk.object == "chat.completion.chunk"
    assert events[-1].encode() == b"data: [DONE]\n\n"
    assert all(event.event is None for event in events)


def test_anthropic_stream_without_include_usage_has_no_usage_chunk_or_fields() -> None:
    events, translator = to_chat(ANTHROPIC_TRANSCRIPT)
    assert all("usage" not in event.json() for event in events[:-1])
    assert deltas(events)[-2:] == [({}, "tool_calls"), "[DONE]"]
    assert translator.usage["completion_tokens"] == 89  # still there for the gateway's books


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("model_context_window_exceeded", "length"),
        ("something_new", "stop"),
    ],
)
def test_anthropic_stop_reasons(stop_reason: str, finish_reason: str) -> None:
    events, translator = to_chat(anthropic_stream(tool=False, stop_reason=stop_reason))
    assert deltas(events)[-2:] == [({}, finish_reason), "[DONE]"]
    assert translator.finish_reason == finish_reason


def test_anthropic_tool_without_input_gets_empty_object_arguments() -> None:
    block = {"type": "tool_use", "id": "toolu_x", "name": "now", "input": {}}
    stream = b"".join(
        [
            anthropic_event({"type": "message_start", "message": {"id": "msg_x", "usage": {}}}),
            anthropic_event({"type": "content_block_start", "index": 0, "content_block": block}),
            anthropic_event(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": ""},
                }
            ),
            anthropic_event({"type": "content_block_stop", "index": 0}),
            anthropic_event({"type": "message_stop"}),
        ]
    )
    events, _ = to_chat(stream)
    assert deltas(events)[2:] == [
        ({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, None),
        ({}, "stop"),  # no message_delta: the choice is still finished
        "[DONE]",
    ]


def test_anthropic_message_delta_usage_is_cumulative() -> None:
    stream = ANTHROPIC_TRANSCRIPT.replace(
        b'"usage":{"output_tokens":89}',
        b'"usage":{"input_tokens":500,"cache_read_input_tokens":0,"output_tokens":89}',
    )
    _, translator = to_chat(stream)
    assert translator.usage["prompt_tokens"] == 500
    assert translator.usage["total_tokens"] == 589


def test_anthropic_usage_is_none_until_message_delta_makes_it_final() -> None:
    """message_start's usage is preliminary (output_tokens 2 here): a cut stream has none."""
    cut = ANTHROPIC_TRANSCRIPT[: ANTHROPIC_TRANSCRIPT.index(b"event: message_delta")]
    _, translator = to_chat(cut, include_usage=True)
    assert translator.usage is None
    _, translator = to_chat(ANTHROPIC_TRANSCRIPT, include_usage=True)
    assert translator.usage is not None
    assert translator.usage["completion_tokens"] == 89


@pytest.mark.parametrize("include_usage", [True, False])
def test_anthropic_usage_at_start_puts_message_starts_usage_on_the_role_chunk(
    include_usage: bool,
) -> None:
    events, _ = to_chat(ANTHROPIC_TRANSCRIPT, include_usage=include_usage, usage_at_start=True)
    role = events[0].json()
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert role["usage"] == {
        "prompt_tokens": 572,
        "completion_tokens": 2,
        "total_tokens": 574,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    rest = [event.json() for event in events[1:-1] if event.json()["choices"]]
    assert rest
    if include_usage:
        assert all(chunk["usage"] is None for chunk in rest)
    else:
        assert all("usage" not in chunk for chunk in rest)


def test_anthropic_thinking_blocks_are_left_out() -> None:
    thinking = {"type": "thinking", "thinking": "", "signature": ""}
    text = {"type": "text", "text": ""}
    stream = b"".join(
        [
            anthropic_event({"type": "message_start", "message": {"id": "msg_t", "usage": {}}}),
            anthropic_event({"type": "content_block_start", "index": 0, "content_block": thinking}),
            anthropic_event(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "thinking_delta", "thinking": "Let me think."},
                }
            ),
            anthropic_event(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"},
                }
            ),
            anthropic_event({"type": "content_block_stop", "index": 0}),
            anthropic_event({"type": "content_block_start", "index": 1, "content_block": text}),
            anthropic_event(
                {
                    "type": "content_block_delta",
                    "index": 1,
                    "delta": {"type": "text_delta", "text": "42"},
                }
            ),
            anthropic_event({"type": "content_block_stop", "index": 1}),
            anthropic_event({"type": "message_stop"}),
        ]
    )
    events, _ = to_chat(stream)
    assert deltas(events) == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "42"}, None),
        ({}, "stop"),
        "[DONE]",
    ]


def test_anthropic_ping_and_unknown_events_translate_to_nothing() -> None:
    translator = MessagesStreamToChat("m")
    assert translator.feed(SSEEvent(data='{"type": "ping"}', event="ping")) == []
    assert translator.feed(SSEEvent.from_json({"type": "future_event"}, event="future_event")) == []
    assert translator.feed(SSEEvent(comments=("keep-alive",))) == []
    assert translator.error is None
    assert not translator.done


@pytest.mark.parametrize(
    ("error_type", "status", "err_type", "code"),
    [
        ("overloaded_error", 502, "upstream_error", "upstream_overloaded"),
        ("api_error", 502, "upstream_error", "upstream_error"),
        ("rate_limit_error", 429, "rate_limit_error", "rate_limit_error"),
        ("invalid_request_error", 400, "invalid_request_error", "invalid_request_error"),
        ("request_too_large", 413, "request_too_large", "request_too_large"),
        ("not_found_error", 404, "not_found_error", "not_found_error"),
        ("authentication_error", 502, "upstream_error", "upstream_auth_error"),
        ("permission_error", 502, "upstream_error", "upstream_auth_error"),
        ("timeout_error", 504, "timeout_error", "upstream_timeout"),
        ("brand_new_error", 502, "upstream_error", "upstream_error"),
    ],
)
def test_anthropic_error_event(error_type: str, status: int, err_type: str, code: str) -> None:
    head = ANTHROPIC_TRANSCRIPT.split(b"event: content_block_stop")[0]
    error = (
        b'event: error\ndata: {"type": "error", "error": {"type": "'
        + error_type.encode()
        + b'", "message": "Trouble with sk-ant-api03-abcdefghijklmnop"}}\n\n'
    )
    events, translator = to_chat(head + error + ANTHROPIC_TRANSCRIPT)
    assert len(events) == 4  # role + three text pieces; nothing after the error
    assert translator.error is not None
    assert not translator.done
    err = translator.error
    assert (err.status, err.type, err.code) == (status, err_type, code)
    assert "sk-ant" not in err.message
    assert err.message == (
        "Trouble with [redacted]"
        if code != "upstream_auth_error"
        else f"The upstream refused the gateway's credentials ({error_type})."
    )


def test_anthropic_non_json_event_is_an_upstream_error() -> None:
    translator = MessagesStreamToChat("m")
    assert translator.feed(SSEEvent(data="{nope", event="message_start")) == []
    assert translator.error is not None
    assert translator.error.status == 502


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(ANTHROPIC_TRANSCRIPT) - 1), max_size=40))
def test_anthropic_rechunked_transcript_translates_identically(points: list[int]) -> None:
    whole, _ = to_chat(ANTHROPIC_TRANSCRIPT, include_usage=True)
    pieces, _ = to_chat(split_at(ANTHROPIC_TRANSCRIPT, points), include_usage=True)
    assert encode_events(pieces) == encode_events(whole)


# ===== Anthropic upstream -> the official openai SDK ==============================================


async def test_openai_sdk_reads_translated_anthropic_stream(fake: FakeUpstream) -> None:
    events, _ = to_chat(ANTHROPIC_TRANSCRIPT, include_usage=True)
    fake.queue(Script(rechunk(encode_events(events), [7, 1, 13, 250])))
    text: list[str] = []
    arguments: list[str] = []
    names: list[str] = []
    finish: list[str] = []
    usage = None
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="gpt-facing",
            messages=[{"role": "user", "content": "weather?"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            assert chunk.id == f"chatcmpl-{MSG_ID}"
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    text.append(choice.delta.content)
                for call in choice.delta.tool_calls or []:
                    assert call.index == 0
                    if call.function and call.function.name:
                        names.append(call.function.name)
                    if call.function and call.function.arguments:
                        arguments.append(call.function.arguments)
                if choice.finish_reason:
                    finish.append(choice.finish_reason)
    assert "".join(text) == "".join(TEXT_PIECES)
    assert names == ["get_weather"]
    assert orjson.loads("".join(arguments)) == TOOL_INPUT
    assert finish == ["tool_calls"]
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (572, 89, 661)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 100


async def test_openai_sdk_stream_helper_builds_the_final_completion(fake: FakeUpstream) -> None:
    events, _ = to_chat(ANTHROPIC_TRANSCRIPT, include_usage=True)
    fake.queue(Script(rechunk(encode_events(events), [5, 31])))
    strict_tool: Any = {"type": "function", "function": {**OPENAI_TOOL["function"], "strict": True}}
    async with (
        openai.AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0) as client,
        client.chat.completions.stream(
            model="gpt-facing",
            messages=[{"role": "user", "content": "weather?"}],
            tools=[strict_tool],
        ) as stream,
    ):
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    (choice,) = final.choices
    assert choice.message.content == "".join(TEXT_PIECES)
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert (call.id, call.function.name) == (TOOLU_ID, "get_weather")
    assert orjson.loads(call.function.arguments) == TOOL_INPUT
    assert call.function.parsed_arguments == TOOL_INPUT
    assert final.usage is not None
    assert final.usage.completion_tokens == 89


async def test_openai_sdk_reads_translated_anthropic_body(fake: FakeUpstream) -> None:
    message = {
        "id": MSG_ID,
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": TOOLU_ID, "name": "get_weather", "input": TOOL_INPUT},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 20, "cache_read_input_tokens": 5, "output_tokens": 12},
    }
    Message.model_validate(message)
    body = messages_response_to_chat(message, "gpt-facing", created=CREATED)
    assert body == {
        "id": f"chatcmpl-{MSG_ID}",
        "object": "chat.completion",
        "created": CREATED,
        "model": "gpt-facing",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Checking.",
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": TOOLU_ID,
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": TOOL_JSON},
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 25,
            "completion_tokens": 12,
            "total_tokens": 37,
            "prompt_tokens_details": {"cached_tokens": 5},
        },
    }
    fake.queue(json_script(body))
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0) as client:
        completion = await client.chat.completions.create(
            model="gpt-facing", messages=[{"role": "user", "content": "weather?"}]
        )
    assert isinstance(completion, ChatCompletion)
    assert completion.choices[0].message.tool_calls is not None


def test_anthropic_body_only_tools_has_null_content_and_errors_raise() -> None:
    message = {
        "id": "msg_2",
        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
        "stop_reason": "max_tokens",
        "usage": {"input_tokens": 1, "output_tokens": 2},
    }
    out = messages_response_to_chat(message, "m")
    assert out["choices"][0]["message"]["content"] is None
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert out["choices"][0]["finish_reason"] == "length"
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(GatewayError) as info:
        messages_response_to_chat(error, "m")
    assert (info.value.status, info.value.code) == (502, "upstream_overloaded")
    assert error_from_anthropic("garbage").status == 502


# ===== OpenAI stream -> Anthropic events ==========================================================


def summary(events: list[SSEEvent]) -> list[tuple[str | None, Any]]:
    """(event name, the interesting part of the data) per event."""
    out: list[tuple[str | None, Any]] = []
    for event in events:
        data = event.json()
        assert data["type"] == event.event
        detail = {k: v for k, v in data.items() if k != "type"}
        out.append((event.event, detail or None))
    return out


def test_openai_stream_to_anthropic_events() -> None:
    events, translator = to_messages(OPENAI_TRANSCRIPT)
    message_id = "msg_" + CHATCMPL_ID.removeprefix("chatcmpl-")
    weather = {"type": "tool_use", "id": CALL_ID, "name": "get_weather", "input": {}}
    clock = {"type": "tool_use", "id": CALL2_ID, "name": "get_time", "input": {}}
    assert summary(events) == [
        (
            "message_start",
            {
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-facing",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                }
            },
        ),
        ("ping", None),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        *[
            ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
            for piece in TEXT_PIECES
        ],
        ("content_block_stop", {"index": 0}),
        ("content_block_start", {"index": 1, "content_block": weather}),
        *[
            (
                "content_block_delta",
                {"index": 1, "delta": {"type": "input_json_delta", "partial_json": piece}},
            )
            for piece in TOOL_PIECES
        ],
        ("content_block_stop", {"index": 1}),
        ("content_block_start", {"index": 2, "content_block": clock}),
        (
            "content_block_delta",
            {"index": 2, "delta": {"type": "input_json_delta", "partial_json": TIME_JSON[:7]}},
        ),
        (
            "content_block_delta",
            {"index": 2, "delta": {"type": "input_json_delta", "partial_json": TIME_JSON[7:]}},
        ),
        ("content_block_stop", {"index": 2}),
        (
            "message_delta",
            {
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"input_tokens": 18, "cache_read_input_tokens": 64, "output_tokens": 37},
            },
        ),
        ("message_stop", None),
    ]
    assert translator.done
    assert translator.usage == OPENAI_USAGE
    adapter: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)
    for event in events:
        if event.event != "ping":
            adapter.validate_python(event.json())
    assert events[1].encode() == b'event: ping\ndata: {"type":"ping"}\n\n'


def test_openai_stream_ends_at_done_without_a_usage_chunk() -> None:
    events, translator = to_messages(openai_transcript(usage_chunk=False))
    assert summary(events)[-2:] == [
        (
            "message_delta",
            {
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 0},
            },
        ),
        ("message_stop", None),
    ]
    assert translator.done
    assert translator.usage is None


def test_openai_stream_done_at_usage_chunk_ignores_the_rest() -> None:
    translator = ChatStreamToMessages("c")
    events = decode([OPENAI_TRANSCRIPT])
    out: list[SSEEvent] = []
    for event in events[:-1]:  # up to the usage chunk
        out += translator.feed(event)
    assert translator.done
    assert out[-1].event == "message_stop"
    assert translator.feed(events[-1]) == []  # [DONE] after the end


def test_openai_empty_stream_is_still_a_whole_message() -> None:
    events, translator = to_messages(b"data: [DONE]\n\n", input_tokens=12, message_id="msg_fixed")
    assert [event.event for event in events] == [
        "message_start",
        "ping",
        "message_delta",
        "message_stop",
    ]
    assert events[0].json()["message"]["id"] == "msg_fixed"
    assert events[0].json()["message"]["usage"] == {"input_tokens": 12, "output_tokens": 0}
    assert events[2].json()["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert translator.done


@pytest.mark.parametrize(
    ("finish_reason", "extra", "stop_reason", "stop_sequence"),
    [
        ("stop", {}, "end_turn", None),
        ("stop", {"stop_reason": "END"}, "stop_sequence", "END"),  # vLLM names the stop string
        ("stop", {"stop_reason": 128009}, "end_turn", None),  # ... or the stop token id
        ("length", {}, "max_tokens", None),
        ("tool_calls", {}, "tool_use", None),
        ("function_call", {}, "tool_use", None),
        ("content_filter", {}, "refusal", None),
        ("brand_new", {}, "end_turn", None),
    ],
)
def test_openai_finish_reasons(
    finish_reason: str, extra: dict[str, Any], stop_reason: str, stop_sequence: str | None
) -> None:
    finish = orjson.loads(openai_event({}, finish_reason)[6:])
    finish["choices"][0].update(extra)
    stream = openai_event({"content": "hi"}) + b"data: " + orjson.dumps(finish) + b"\n\n"
    events, translator = to_messages(stream + b"data: [DONE]\n\n")
    assert events[-2].json()["delta"] == {
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
    }
    assert (translator.stop_reason, translator.stop_sequence) == (stop_reason, stop_sequence)


def test_openai_interleaved_tool_calls_keep_their_block_index() -> None:
    """Best effort for upstreams that interleave parallel calls: late arguments keep index."""
    stream = b"".join(
        [
            openai_event(tool_delta(0, '{"a":', call_id="call_a", name="fa")),
            openai_event(tool_delta(1, '{"b":2}', call_id="call_b", name="fb")),
            openai_event(tool_delta(0, "1}")),
            openai_event({}, "tool_calls"),
            b"data: [DONE]\n\n",
        ]
    )
    events, _ = to_messages(stream)
    arguments: dict[int, str] = {}
    for event in events:
        if event.event == "content_block_delta":
            data = event.json()
            arguments[data["index"]] = (
                arguments.get(data["index"], "") + data["delta"]["partial_json"]
            )
    assert {i: orjson.loads(a) for i, a in arguments.items()} == {0: {"a": 1}, 1: {"b": 2}}
    starts = [e.json()["content_block"]["id"] for e in events if e.event == "content_block_start"]
    assert starts == ["call_a", "call_b"]


def test_openai_refusal_is_text_with_stop_reason_refusal() -> None:
    stream = openai_event({"refusal": "I can't help with that."}) + openai_event({}, "stop")
    events, _ = to_messages(stream + b"data: [DONE]\n\n")
    texts = [e.json()["delta"]["text"] for e in events if e.event == "content_block_delta"]
    assert texts == ["I can't help with that."]
    assert events[-2].json()["delta"]["stop_reason"] == "refusal"


def test_openai_first_chunk_usage_sets_message_start_input_tokens() -> None:
    usage = {"prompt_tokens": 30, "completion_tokens": 1, "total_tokens": 31}
    events, _ = to_messages(openai_event({"content": "a"}, usage=usage) + b"data: [DONE]\n\n")
    assert events[0].json()["message"]["usage"] == {"input_tokens": 30, "output_tokens": 0}


def test_anthropic_first_chunk_usage_round_trips_into_message_start_with_cache_fields() -> None:
    """Anthropic -> OpenAI -> Anthropic: the id keeps one `msg_` prefix; the cache counts
    come back apart from input_tokens."""
    chat, _ = to_chat(
        anthropic_stream().replace(
            b'"cache_creation_input_tokens":0', b'"cache_creation_input_tokens":7'
        ),
        include_usage=True,
        usage_at_start=True,
    )
    events, _ = to_messages(encode_events(chat))
    start = events[0].json()["message"]
    assert start["id"] == MSG_ID
    assert start["usage"] == {
        "input_tokens": 472,
        "output_tokens": 0,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 7,
    }
    delta = next(e.json() for e in events if e.event == "message_delta")
    assert delta["usage"] == {
        "input_tokens": 472,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 7,
        "output_tokens": 89,
    }


def test_openai_in_band_error_stops_translation() -> None:
    error = b'data: {"error":{"message":"Model overloaded","type":"server_error","code":503}}\n\n'
    events, translator = to_messages(openai_event({"content": "a"}) + error + OPENAI_TRANSCRIPT)
    assert [e.event for e in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
    ]
    assert translator.error is not None
    assert (translator.error.status, translator.error.message) == (502, "Model overloaded")
    assert not translator.done


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(OPENAI_TRANSCRIPT) - 1), max_size=40))
def test_openai_rechunked_transcript_translates_identically(points: list[int]) -> None:
    whole, _ = to_messages(OPENAI_TRANSCRIPT)
    pieces, _ = to_messages(split_at(OPENAI_TRANSCRIPT, points))
    assert encode_events(pieces) == encode_events(whole)


# ===== OpenAI upstream -> the official anthropic SDK ==============================================


def anthropic_client(fake: FakeUpstream) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=f"http://127.0.0.1:{fake.port}", api_key="x", max_retries=0, timeout=10.0
    )


async def test_anthropic_sdk_iterates_translated_openai_stream(fake: FakeUpstream) -> None:
    events, _ = to_messages(OPENAI_TRANSCRIPT)
    fake.queue(Script(rechunk(encode_events(events), [11, 2, 97])))
    text: list[str] = []
    partial: dict[int, list[str]] = {}
    names: dict[int, str] = {}
    stop_reason = None
    async with anthropic_client(fake) as client:
        stream = await client.messages.create(
            model="claude-facing",
            max_tokens=100,
            messages=[{"role": "user", "content": "weather?"}],
            stream=True,
        )
        async for event in stream:
            if isinstance(event, RawMessageStartEvent):
                assert event.message.model == "claude-facing"
            elif isinstance(event, RawContentBlockStartEvent):
                if isinstance(event.content_block, ToolUseBlock):
                    names[event.index] = event.content_block.name
            elif isinstance(event, RawContentBlockDeltaEvent):
                if isinstance(event.delta, TextDelta):
                    text.append(event.delta.text)
                elif isinstance(event.delta, InputJSONDelta):
                    partial.setdefault(event.index, []).append(event.delta.partial_json)
            elif isinstance(event, RawMessageDeltaEvent):
                stop_reason = event.delta.stop_reason
    (exchange,) = fake.exchanges
    assert exchange.path == "/v1/messages"
    assert "".join(text) == "".join(TEXT_PIECES)
    assert names == {1: "get_weather", 2: "get_time"}
    assert orjson.loads("".join(partial[1])) == TOOL_INPUT
    assert orjson.loads("".join(partial[2])) == TIME_INPUT
    assert stop_reason == "tool_use"


async def test_anthropic_sdk_stream_helper_builds_the_final_message(fake: FakeUpstream) -> None:
    events, _ = to_messages(OPENAI_TRANSCRIPT)
    fake.queue(Script(rechunk(encode_events(events), [3, 64])))
    async with (
        anthropic_client(fake) as client,
        client.messages.stream(
            model="claude-facing",
            max_tokens=100,
            messages=[{"role": "user", "content": "weather?"}],
        ) as stream,
    ):
        streamed = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert streamed == "".join(TEXT_PIECES)
    text, weather, clock = final.content
    assert isinstance(text, TextBlock)
    assert text.text == "".join(TEXT_PIECES)
    assert isinstance(weather, ToolUseBlock)
    assert (weather.id, weather.name, weather.input) == (CALL_ID, "get_weather", TOOL_INPUT)
    assert isinstance(clock, ToolUseBlock)
    assert (clock.id, clock.name, clock.input) == (CALL2_ID, "get_time", TIME_INPUT)
    assert final.stop_reason == "tool_use"
    assert final.usage.input_tokens == 18
    assert final.usage.cache_read_input_tokens == 64
    assert final.usage.output_tokens == 37


async def drain(stream: anthropic.AsyncStream[RawMessageStreamEvent], seen: list[str]) -> None:
    async for event in stream:
        seen.append(event.type)


async def test_anthropic_sdk_raises_on_translated_error_event(fake: FakeUpstream) -> None:
    events, translator = to_messages(openai_event({"content": "partial"}))
    assert translator.error is None
    failure = upstream_error("The upstream closed the stream.", code="upstream_truncated")
    fake.queue(Script([encode_events([*events, error_event(failure)])]))
    seen: list[str] = []
    async with anthropic_client(fake) as client:
        stream = await client.messages.create(
            model="claude-facing",
            max_tokens=100,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
        with pytest.raises(anthropic.APIStatusError) as info:
            await drain(stream, seen)
    assert seen == ["message_start", "content_block_start", "content_block_delta"]
    assert info.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "The upstream closed the stream."},
    }


async def test_anthropic_sdk_reads_translated_openai_body(fake: FakeUpstream) -> None:
    completion = {
        "id": CHATCMPL_ID,
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Checking.",
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": CALL_ID,
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": TOOL_JSON},
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": OPENAI_USAGE,
    }
    ChatCompletion.model_validate(completion)
    body = chat_response_to_messages(completion, "claude-facing")
    assert body == {
        "id": "msg_" + CHATCMPL_ID.removeprefix("chatcmpl-"),
        "type": "message",
        "role": "assistant",
        "model": "claude-facing",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": CALL_ID, "name": "get_weather", "input": TOOL_INPUT},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 18, "cache_read_input_tokens": 64, "output_tokens": 37},
    }
    fake.queue(json_script(body))
    async with anthropic_client(fake) as client:
        message = await client.messages.create(
            model="claude-facing", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        )
    assert isinstance(message.content[1], ToolUseBlock)
    assert message.content[1].input == TOOL_INPUT
    assert message.usage.output_tokens == 37


def test_openai_body_errors_and_bad_tool_arguments() -> None:
    bad_args = {
        "id": "chatcmpl-1",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{oops"},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
    }
    with pytest.raises(GatewayError) as info:
        chat_response_to_messages(bad_args, "c")
    assert (info.value.status, info.value.code) == (502, "upstream_invalid_tool_arguments")
    with pytest.raises(GatewayError) as info:
        chat_response_to_messages(
            {"error": {"message": "bad model", "type": "x", "code": 404}}, "c"
        )
    assert (info.value.status, info.value.message) == (404, "bad model")
    empty = chat_response_to_messages({"choices": []}, "c")
    assert (empty["content"], empty["stop_reason"], empty["usage"]) == (
        [],
        "end_turn",
        {"output_tokens": 0},
    )


# ===== Anthropic-shaped errors ====================================================================


@pytest.mark.parametrize(
    ("err", "error_type"),
    [
        (bad_request("bad"), "invalid_request_error"),
        (GatewayError(401, "who?"), "authentication_error"),
        (GatewayError(403, "no"), "permission_error"),
        (GatewayError(404, "gone"), "not_found_error"),
        (GatewayError(409, "conflict"), "invalid_request_error"),
        (GatewayError(413, "big"), "request_too_large"),
        (GatewayError(429, "slow down"), "rate_limit_error"),
        (GatewayError(500, "bug"), "api_error"),
        (upstream_error("down"), "api_error"),
        (upstream_error("busy", code="upstream_overloaded"), "overloaded_error"),
        (GatewayError(503, "busy"), "overloaded_error"),
        (timeout_error("idle"), "timeout_error"),
    ],
)
def test_anthropic_error_body(err: GatewayError, error_type: str) -> None:
    assert anthropic_error_body(err) == {
        "type": "error",
        "error": {"type": error_type, "message": err.message},
    }


def test_error_event_wire_bytes() -> None:
    event = error_event(
        upstream_error("Overloaded", code="upstream_overloaded"), request_id="req_1"
    )
    assert event.encode() == (
        b"event: error\n"
        b'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},'
        b'"request_id":"req_1"}\n\n'
    )


def test_anthropic_error_round_trips_through_the_gateway_error() -> None:
    for error_type in (
        "overloaded_error",
        "rate_limit_error",
        "invalid_request_error",
        "timeout_error",
    ):
        payload = {"type": "error", "error": {"type": error_type, "message": "m"}}
        assert anthropic_error_body(error_from_anthropic(payload)) == payload
