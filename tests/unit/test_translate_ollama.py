"""Tests for gateway.translate.ollama_openai: request mapping, NDJSON, stream translation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.context import Endpoint, RequestContext
from gateway.errors import GatewayError
from gateway.sse import SSEDecoder, SSEError, SSEEvent, encode_events
from gateway.translate.ollama_openai import (
    NDJSONDecoder,
    OllamaSSEDecoder,
    OllamaStreamToChat,
    chat_request_to_ollama,
    completion_request_to_ollama,
    ollama_response_to_chat,
    ollama_response_to_completion,
)
from gateway.upstreams.openai import OpenAIObserver

MODEL = "llama3.2"
TOKENS = ["Hel", "lo", ", ", "w\u00f6rld", " \U0001f30d", "!"]
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
    "rkJggg=="
)
FINAL_STATS = {
    "total_duration": 4883583458,
    "load_duration": 1334875,
    "prompt_eval_count": 26,
    "prompt_eval_duration": 342546000,
    "eval_count": 6,
    "eval_duration": 4535599000,
}


def _stamp(i: int) -> str:
    return f"2024-08-04T08:52:19.{385406455 + i}-07:00"


def chat_objects(tokens: Sequence[str] = TOKENS, done_reason: str = "stop") -> list[dict[str, Any]]:
    """A realistic /api/chat stream: one object per token, then the final stats object."""
    objs: list[dict[str, Any]] = [
        {
            "model": MODEL,
            "created_at": _stamp(i),
            "message": {"role": "assistant", "content": tok},
            "done": False,
        }
        for i, tok in enumerate(tokens)
    ]
    objs.append(
        {
            "model": MODEL,
            "created_at": _stamp(len(tokens)),
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": done_reason,
            **FINAL_STATS,
        }
    )
    return objs


def tool_objects() -> list[dict[str, Any]]:
    calls = [
        {"function": {"name": "get_weather", "arguments": {"city": "Z\u00fcrich", "unit": "c"}}},
        {"function": {"name": "get_time", "arguments": {"tz": "Europe/Zurich"}}},
    ]
    return [
        {
            "model": MODEL,
            "created_at": _stamp(0),
            "message": {"role": "assistant", "content": "", "tool_calls": calls},
            "done": False,
        },
        {
            "model": MODEL,
            "created_at": _stamp(1),
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop",
            **FINAL_STATS,
        },
    ]


def generate_objects(tokens: Sequence[str] = TOKENS) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = [
        {"model": MODEL, "created_at": _stamp(i), "response": tok, "done": False}
        for i, tok in enumerate(tokens)
    ]
    objs.append(
        {
            "model": MODEL,
            "created_at": _stamp(len(tokens)),
            "response": "",
            "done": True,
            "done_reason": "length",
            "context": [1, 2, 3],
            **FINAL_STATS,
        }
    )
    return objs


def ndjson(objs: Iterable[dict[str, Any]], eol: bytes = b"\n") -> bytes:
    return b"".join(orjson.dumps(obj) + eol for obj in objs)


def split_at(data: bytes, points: Iterable[int]) -> list[bytes]:
    cuts = [0, *sorted(set(points)), len(data)]
    return [data[a:b] for a, b in pairwise(cuts)]


def pending(decoder: NDJSONDecoder | OllamaSSEDecoder) -> bool:
    """`has_pending`, read through a call so mypy does not narrow it between feeds."""
    return decoder.has_pending


def decode_all(chunks: Iterable[bytes], **kw: int) -> tuple[list[dict[str, Any]], NDJSONDecoder]:
    dec = NDJSONDecoder(**kw)
    out: list[dict[str, Any]] = []
    for chunk in chunks:
        out += dec.feed(chunk)
    return out, dec


# A transcript with every line-end form the decoder must accept: LF, CRLF, blank lines
# (both kinds) and multi-byte UTF-8 (2- and 4-byte) in the text.
_OBJS = chat_objects()
TRANSCRIPT = ndjson(_OBJS[:2]) + b"\n" + ndjson(_OBJS[2:4], b"\r\n") + b"\r\n" + ndjson(_OBJS[4:])


# ----- request mapping --------------------------------------------------------------------


def test_chat_request_minimal() -> None:
    body = {"model": "client-name", "messages": [{"role": "user", "content": "hi"}]}
    assert chat_request_to_ollama(body, MODEL) == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
    }


def test_chat_request_full_mapping() -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    body: dict[str, Any] = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "hi", "name": "bob"},
        ],
        "temperature": 0.2,
        "top_p": 0.9,
        "presence_penalty": 0.5,
        "frequency_penalty": 0,
        "seed": 42,
        "max_tokens": 10,
        "max_completion_tokens": 20,
        "stop": "END",
        "top_k": 40,
        "min_p": 0.05,
        "repeat_penalty": 1.1,
        "num_gpu": 99,  # not a sampling option: never forwarded
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        "keep_alive": "10m",
        "think": "low",
        "user": "u-1",
    }
    out = chat_request_to_ollama(body, MODEL, defaults={"num_ctx": 8192, "temperature": 1.0})
    assert out == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "hi"},
        ],
        "stream": True,
        "options": {
            "num_ctx": 8192,
            "temperature": 0.2,
            "top_p": 0.9,
            "presence_penalty": 0.5,
            "frequency_penalty": 0,
            "seed": 42,
            "num_predict": 20,
            "stop": ["END"],
            "top_k": 40,
            "min_p": 0.05,
            "repeat_penalty": 1.1,
        },
        "format": schema,
        "keep_alive": "10m",
        "think": "low",
    }


def test_chat_request_options_object_and_stop_list() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "options": {"mirostat": 2, "num_ctx": 1_000_000},  # num_ctx: operator only
        "mirostat": 1,  # top level wins over `options`
        "stop": ["a", "b"],
        "max_tokens": 7,
    }
    assert chat_request_to_ollama(body, MODEL)["options"] == {
        "mirostat": 1,
        "stop": ["a", "b"],
        "num_predict": 7,
    }


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, "json"),
    ],
)
def test_response_format(response_format: dict[str, Any], expected: Any) -> None:
    body = {"model": "m", "messages": [], "response_format": response_format}
    assert chat_request_to_ollama(body, MODEL).get("format") == expected


def test_images_from_data_urls() -> None:
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                    {"type": "text", "text": "in this picture?"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
                ],
            }
        ],
    }
    (message,) = chat_request_to_ollama(body, MODEL)["messages"]
    assert message == {
        "role": "user",
        "content": "What is\nin this picture?",
        "images": [PNG_B64, "AAAA"],
    }


def test_tool_round_trip_request() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    body = {
        "model": "m",
        "tools": tools,
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
            {"role": "tool", "tool_call_id": "call_0", "content": [{"type": "text", "text": "9C"}]},
            {"role": "tool", "tool_call_id": "unknown", "content": "?"},
        ],
    }
    out = chat_request_to_ollama(body, MODEL)
    assert out["tools"] == tools
    assert out["messages"][1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "get_time", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": "12:00", "tool_name": "get_time"},
        {"role": "tool", "content": "9C", "tool_name": "get_weather"},
        {"role": "tool", "content": "?"},
    ]
    assert "tools" not in chat_request_to_ollama({**body, "tool_choice": "none"}, MODEL)


def test_tool_name_comes_from_the_nearest_earlier_call() -> None:
    def call(name: str) -> dict[str, Any]:
        return {
            "role": "assistant",
            "tool_calls": [{"id": "call_0", "function": {"name": name, "arguments": "{}"}}],
        }

    body = {
        "model": "m",
        "messages": [
            call("first"),
            {"role": "tool", "tool_call_id": "call_0", "content": "1"},
            call("second"),
            {"role": "tool", "tool_call_id": "call_0", "content": "2"},
        ],
    }
    messages = chat_request_to_ollama(body, MODEL)["messages"]
    assert [m.get("tool_name") for m in messages] == [None, "first", None, "second"]


_USER = {"role": "user", "content": "x"}


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"seed": 1.5}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [1]}, "stop"),
        ({"min_p": "low"}, "min_p"),
        ({"options": [1]}, "options"),
        ({"options": {"top_k": "x"}}, "options.top_k"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"keep_alive": True}, "keep_alive"),
        ({"think": "max"}, "think"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
        ({"tools": {}}, "tools"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0]",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:text/html,<b>x</b>"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"messages": [{"role": "assistant", "tool_calls": [{}]}]}, "messages[0].tool_calls[0]"),
    ],
)
def test_chat_request_rejects(changes: dict[str, Any], param: str) -> None:
    body = {"model": "m", "messages": [_USER], **changes}
    with pytest.raises(GatewayError) as info:
        chat_request_to_ollama(body, MODEL)
    assert info.value.status == 400
    assert info.value.param == param


def test_completion_request() -> None:
    body = {
        "model": "m",
        "prompt": ["def gcd(a, b):"],
        "suffix": "    return r",
        "stream": True,
        "temperature": 0,
        "max_tokens": 64,
        "stop": ["\n\n"],
        "raw": True,
        "response_format": {"type": "json_object"},
    }
    assert completion_request_to_ollama(body, MODEL) == {
        "model": MODEL,
        "prompt": "def gcd(a, b):",
        "suffix": "    return r",
        "stream": True,
        "raw": True,
        "options": {"temperature": 0, "num_predict": 64, "stop": ["\n\n"]},
        "format": "json",
    }
    assert completion_request_to_ollama({"model": "m", "prompt": "hi"}, MODEL) == {
        "model": MODEL,
        "prompt": "hi",
        "stream": False,
    }


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"n": 2}, "n"),
        ({"suffix": 1}, "suffix"),
        ({"raw": "yes"}, "raw"),
    ],
)
def test_completion_request_rejects(changes: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        completion_request_to_ollama({"model": "m", "prompt": "x", **changes}, MODEL)
    assert info.value.status == 400
    assert info.value.param == param


# ----- NDJSON -------------------------------------------------------------------------------


def test_ndjson_whole_transcript() -> None:
    objs, dec = decode_all([TRANSCRIPT])
    assert objs == _OBJS
    assert not pending(dec)


def test_ndjson_every_split_point() -> None:
    for i in range(len(TRANSCRIPT) + 1):
        objs, dec = decode_all([TRANSCRIPT[:i], TRANSCRIPT[i:]])
        assert objs == _OBJS, i
        assert not pending(dec)


def test_ndjson_byte_by_byte() -> None:
    objs, _ = decode_all(TRANSCRIPT[i : i + 1] for i in range(len(TRANSCRIPT)))
    assert objs == _OBJS


@pytest.mark.parametrize("char", ["\u00f6", "\U0001f30d"])
def test_ndjson_split_inside_utf8_character(char: str) -> None:
    encoded = char.encode()
    start = TRANSCRIPT.index(encoded)
    for inner in range(1, len(encoded)):
        first, second = TRANSCRIPT[: start + inner], TRANSCRIPT[start + inner :]
        dec = NDJSONDecoder()
        got = dec.feed(first)
        assert pending(dec)
        got += dec.feed(second)
        assert got == _OBJS


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(TRANSCRIPT)), max_size=40))
def test_ndjson_random_splits(points: list[int]) -> None:
    objs, dec = decode_all(split_at(TRANSCRIPT, points))
    assert objs == _OBJS
    assert not pending(dec)


def test_ndjson_pending_and_flush() -> None:
    dec = NDJSONDecoder()
    assert dec.feed(b'{"a": 1}\n{"b"') == [{"a": 1}]
    assert pending(dec)
    assert dec.feed(b": 2}") == []
    assert dec.flush() == [{"b": 2}]  # a last line without its newline still counts
    assert not pending(dec)
    assert dec.flush() == []
    dec.feed(b"  \r")
    assert not pending(dec)  # whitespace is not a truncated object


def test_ndjson_line_limit() -> None:
    line = orjson.dumps({"x": "a" * 90})
    assert len(line) == 98
    assert decode_all([line + b"\r\n"], max_line_bytes=98)[0] == [{"x": "a" * 90}]
    # held partial line at the limit, its CR not counted: fine
    dec = NDJSONDecoder(max_line_bytes=98)
    assert dec.feed(line + b"\r") == []
    assert dec.feed(b"\n") == [{"x": "a" * 90}]
    with pytest.raises(ValueError, match="max_line_bytes=97"):
        decode_all([line + b"\n"], max_line_bytes=97)
    # an unterminated line fails as soon as it is too long, without waiting for its end
    dec = NDJSONDecoder(max_line_bytes=97)
    dec.feed(line[:50])
    with pytest.raises(ValueError, match="exceeds max_line_bytes=97"):
        dec.feed(line[50:])
    with pytest.raises(ValueError, match="max_line_bytes"):
        dec.feed(b"{}\n")  # sticky


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b'{"a": 1\n', "not valid JSON"),
        (b"[1, 2]\n", "JSON list, not an object"),
        (b'"text"\n', "JSON str, not an object"),
        (b'{"a": "\xff"}\n', "not valid JSON"),
        (b"data: {}\n", "not valid JSON"),
    ],
)
def test_ndjson_bad_lines(data: bytes, match: str) -> None:
    dec = NDJSONDecoder()
    with pytest.raises(ValueError, match=match):
        dec.feed(b'{"ok": true}\n' + data)
    with pytest.raises(ValueError, match=match):
        dec.feed(b'{"ok": true}\n')


# ----- stream translation -------------------------------------------------------------------


def translate(
    objs: Iterable[dict[str, Any]], *, include_usage: bool = False, chat: bool = True
) -> tuple[list[Any], OllamaStreamToChat]:
    tr = OllamaStreamToChat(
        "client-model", include_usage, chat, response_id="chatcmpl-1", created=1700000000
    )
    events: list[SSEEvent] = []
    for obj in objs:
        events += tr.feed(obj)
    return [ev.data if ev.is_done else ev.json() for ev in events], tr


_ENVELOPE = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "client-model",
    "system_fingerprint": None,
}


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**_ENVELOPE, "choices": [choice], **extra}


def test_chat_stream_exact_chunks() -> None:
    got, tr = translate(chat_objects(["Hi", " there"]))
    assert got == [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Hi"}),
        _chunk({"content": " there"}),
        _chunk({}, "stop"),
        "[DONE]",
    ]
    assert tr.done
    assert tr.finish_reason == "stop"
    assert tr.usage == {"prompt_tokens": 26, "completion_tokens": 6, "total_tokens": 32}
    assert tr.error is None


def test_chat_stream_usage_chunk_and_length() -> None:
    got, _ = translate(chat_objects(["Hi"], done_reason="length"), include_usage=True)
    usage = {"prompt_tokens": 26, "completion_tokens": 6, "total_tokens": 32}
    assert got == [
        _chunk({"role": "assistant", "content": ""}, usage=None),
        _chunk({"content": "Hi"}, usage=None),
        _chunk({}, "length", usage=None),
        {**_ENVELOPE, "choices": [], "usage": usage},
        "[DONE]",
    ]
    for obj in got[:-1]:
        ChatCompletionChunk.model_validate(obj)  # strict SDK types, not just construct()


def test_chat_stream_tool_calls() -> None:
    got, tr = translate(tool_objects())
    assert got[1:] == [
        _chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_0",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"city":"Z\u00fcrich","unit":"c"}',
                        },
                    }
                ]
            }
        ),
        _chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz":"Europe/Zurich"}'},
                    }
                ]
            }
        ),
        _chunk({}, "tool_calls"),
        "[DONE]",
    ]
    assert tr.finish_reason == "tool_calls"


def test_chat_stream_thinking_and_content_on_final_object() -> None:
    objs: list[dict[str, Any]] = [
        {"model": MODEL, "message": {"role": "assistant", "content": "", "thinking": "hmm"}},
        {"model": MODEL, "message": {"content": "done."}, "done": True, "done_reason": "load"},
    ]
    got, tr = translate(objs)
    assert got == [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"reasoning_content": "hmm"}),
        _chunk({"content": "done."}),
        _chunk({}, "stop"),
        "[DONE]",
    ]
    # no counts on the final object (e.g. a cached prompt): zeros, not a crash
    assert tr.usage == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_generate_stream_text_completion_chunks() -> None:
    got, tr = translate(generate_objects(["a", "b"]), include_usage=True, chat=False)
    env = {**_ENVELOPE, "object": "text_completion"}

    def text(t: str, finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "text": t, "logprobs": None, "finish_reason": finish}
        return {**env, "choices": [choice], "usage": None}

    assert got == [
        text("a"),
        text("b"),
        text("", "length"),
        {**env, "choices": [], "usage": tr.usage},
        "[DONE]",
    ]
    # The SDK types a streamed completion chunk as Completion, whose finish_reason is not
    # nullable (it parses stream chunks without validation); the final chunk validates.
    Completion.model_validate(got[2])


def test_stream_error_object() -> None:
    tr = OllamaStreamToChat("m", False)
    assert len(tr.feed(chat_objects(["Hi"])[0])) == 2
    secret = "sk-" + "A1" * 12
    assert tr.feed({"error": f"CUDA out of memory (key {secret})\x00"}) == []
    assert tr.error is not None
    assert tr.error.status == 502
    assert tr.error.type == "upstream_error"
    assert tr.error.message == "CUDA out of memory (key [redacted]) "
    assert secret not in tr.error.message
    assert not tr.done
    assert tr.feed(chat_objects(["more"])[0]) == []  # nothing after an error


def test_stream_ignores_objects_after_done() -> None:
    tr = OllamaStreamToChat("m", False)
    for obj in chat_objects(["x"]):
        tr.feed(obj)
    assert tr.done
    assert tr.feed(chat_objects(["late"])[0]) == []


def test_default_id_and_created() -> None:
    chat = OllamaStreamToChat("m", False)
    assert chat.response_id.startswith("chatcmpl-")
    assert chat.created > 1_600_000_000
    assert OllamaStreamToChat("m", False, False).response_id.startswith("cmpl-")


# ----- the combined decoder, behind the proxy's OpenAI observer -------------------------------


def pump(decoder: OllamaSSEDecoder, chunks: Iterable[bytes]) -> list[SSEEvent]:
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.flush()


def _fresh(include_usage: bool = False) -> OllamaSSEDecoder:
    return OllamaSSEDecoder(
        OllamaStreamToChat("m", include_usage, response_id="chatcmpl-1", created=1)
    )


_REFERENCE = encode_events(pump(_fresh(), [TRANSCRIPT]))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, len(TRANSCRIPT)), max_size=30))
def test_sse_decoder_output_is_independent_of_chunking(points: list[int]) -> None:
    assert encode_events(pump(_fresh(), split_at(TRANSCRIPT, points))) == _REFERENCE


def test_sse_decoder_output_reparses_as_sse() -> None:
    events = SSEDecoder().feed(_REFERENCE)
    texts = [ev.json()["choices"][0]["delta"].get("content") for ev in events[:-1]]
    assert "".join(t or "" for t in texts) == "".join(TOKENS)
    assert events[-1].is_done


def test_sse_decoder_with_openai_observer() -> None:
    ctx = RequestContext("r", Endpoint.CHAT)
    observer = OpenAIObserver()
    decoder = _fresh(include_usage=True)
    for ev in pump(decoder, [TRANSCRIPT]):
        assert observer.observe(ctx, ev) is None
    assert observer.done
    observer.finish(ctx)  # usage is read once, at the end of the stream
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (26, 6)
    assert decoder.translator.usage == {
        "prompt_tokens": 26,
        "completion_tokens": 6,
        "total_tokens": 32,
    }


def test_sse_decoder_error_object_becomes_openai_error_event() -> None:
    data = ndjson(chat_objects(["Hi"])[:1]) + b'{"error":"model runner crashed"}\n'
    decoder = _fresh()
    events = pump(decoder, [data])
    assert events[-1].json() == {
        "error": {
            "message": "model runner crashed",
            "type": "upstream_error",
            "param": None,
            "code": "upstream_error",
        }
    }
    err = OpenAIObserver().observe(RequestContext("r", Endpoint.CHAT), events[-1])
    assert err is not None
    assert (err.status, err.message) == (502, "model runner crashed")
    assert decoder.feed(ndjson(chat_objects(["x"]))) == []


def test_sse_decoder_malformed_ndjson_raises_sse_error() -> None:
    decoder = _fresh()
    assert not pending(decoder)
    decoder.feed(b'{"model":')
    assert pending(decoder)
    with pytest.raises(SSEError, match="not valid JSON"):
        decoder.feed(b"nope}\n")
    # flush() never raises: a tail that does not parse means the stream was cut off, which
    # the proxy reports as truncation (it stops feeding once feed() raised anyway).
    assert decoder.flush() == []
    cut = _fresh()
    cut.feed(b'{"model": "m", "message": {"role": "assist')
    assert cut.flush() == []
    small = OllamaSSEDecoder(OllamaStreamToChat("m", False), max_line_bytes=8)
    with pytest.raises(SSEError, match="max_line_bytes=8"):
        small.feed(b'{"model": "long"}')


# ----- unary ------------------------------------------------------------------------------


def test_unary_chat() -> None:
    body = {
        "model": MODEL,
        "message": {"role": "assistant", "content": "Hello!", "thinking": "greet"},
        "done": True,
        "done_reason": "stop",
        **FINAL_STATS,
    }
    out = ollama_response_to_chat(body, "client-model", response_id="chatcmpl-9", created=5)
    assert out == {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "created": 5,
        "model": "client-model",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello!",
                    "refusal": None,
                    "reasoning_content": "greet",
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 26, "completion_tokens": 6, "total_tokens": 32},
    }
    ChatCompletion.model_validate(out)


def test_unary_chat_tool_calls() -> None:
    body = {**tool_objects()[1], "message": tool_objects()[0]["message"]}
    out = ollama_response_to_chat(body, "m")
    (choice,) = out["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert [c["id"] for c in choice["message"]["tool_calls"]] == ["call_0", "call_1"]
    parsed = ChatCompletion.model_validate(out)
    calls = parsed.choices[0].message.tool_calls
    assert calls is not None
    assert orjson.loads(calls[0].function.arguments) == {"city": "Z\u00fcrich", "unit": "c"}  # type: ignore[union-attr]


def test_unary_completion_and_errors() -> None:
    out = ollama_response_to_completion(generate_objects(["whole"])[0] | {"done": True}, "m")
    assert out["choices"][0]["text"] == "whole"
    assert out["choices"][0]["finish_reason"] == "stop"
    Completion.model_validate(out)
    for convert in (ollama_response_to_chat, ollama_response_to_completion):
        with pytest.raises(GatewayError) as info:
            convert({"error": "model 'x' not found"}, "m")
        assert (info.value.status, info.value.message) == (502, "model 'x' not found")


# ----- the official SDK over loopback ---------------------------------------------------------


@dataclass
class OllamaBehindOpenAI:
    """A loopback server that speaks OpenAI by translating a canned Ollama answer, the way the
    proxy will: NDJSON bytes in small chunks -> OllamaSSEDecoder -> OpenAIObserver -> client.
    """

    answer: bytes = b""
    base_url: str = ""
    sent: list[dict[str, Any]] = field(default_factory=list)  # the Ollama request bodies
    ctx: RequestContext | None = None
    error: GatewayError | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        chat = request.path.endswith("/chat/completions")
        to_ollama = chat_request_to_ollama if chat else completion_request_to_ollama
        ollama_body = to_ollama(body, MODEL)
        self.sent.append(ollama_body)
        if not ollama_body["stream"]:
            to_openai = ollama_response_to_chat if chat else ollama_response_to_completion
            return web.json_response(to_openai(orjson.loads(self.answer), body["model"]))
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        decoder = OllamaSSEDecoder(OllamaStreamToChat(body["model"], include_usage, chat))
        observer = OpenAIObserver()
        ctx = self.ctx = RequestContext("r", Endpoint.CHAT if chat else Endpoint.COMPLETIONS)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in split_at(self.answer, range(0, len(self.answer), 7)):
            for event in decoder.feed(piece):
                err = observer.observe(ctx, event)
                if err is not None:
                    self.error = err
                    await response.write(observer.error_event(err).encode())
                    await response.write_eof()
                    return response
                await response.write(event.encode())
        assert observer.done
        observer.finish(ctx)
        await response.write_eof()
        return response


@pytest.fixture
async def server() -> AsyncIterator[OllamaBehindOpenAI]:
    state = OllamaBehindOpenAI()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", state.handle)
    app.router.add_post("/v1/completions", state.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture
async def client(server: OllamaBehindOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=5.0)
    try:
        yield sdk
    finally:
        await sdk.close()


MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello"}
]


async def test_sdk_chat_stream_text_finish_and_usage(
    server: OllamaBehindOpenAI, client: openai.AsyncOpenAI
) -> None:
    server.answer = TRANSCRIPT
    stream = await client.chat.completions.create(
        model="local",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=50,
    )
    texts: list[str] = []
    finish: list[str] = []
    chunks: list[ChatCompletionChunk] = []
    async for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            if choice.delta.content:
                texts.append(choice.delta.content)
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert texts == TOKENS
    assert finish == ["stop"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.model for c in chunks} == {"local"}
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (26, 6)
    assert last.usage.total_tokens == 32
    assert server.ctx is not None
    assert server.ctx.usage.total_tokens == 32
    (sent,) = server.sent
    assert sent["model"] == MODEL
    assert sent["stream"] is True
    assert sent["options"] == {"num_predict": 50}


async def test_sdk_chat_stream_tool_calls(
    server: OllamaBehindOpenAI, client: openai.AsyncOpenAI
) -> None:
    server.answer = ndjson(tool_objects())
    async with client.chat.completions.stream(model="local", messages=MESSAGES) as stream:
        completion = await stream.get_final_completion()
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.id, c.type) for c in calls] == [("call_0", "function"), ("call_1", "function")]
    functions = [c.function for c in calls]
    assert [f.name for f in functions] == ["get_weather", "get_time"]
    assert orjson.loads(functions[0].arguments) == {"city": "Z\u00fcrich", "unit": "c"}
    assert orjson.loads(functions[1].arguments) == {"tz": "Europe/Zurich"}


async def test_sdk_completion_stream(
    server: OllamaBehindOpenAI, client: openai.AsyncOpenAI
) -> None:
    server.answer = ndjson(generate_objects())
    stream = await client.completions.create(model="local", prompt="Say", stream=True)
    texts: list[str] = []
    finish: list[str | None] = []
    async for chunk in stream:
        texts += [c.text for c in chunk.choices]
        finish += [c.finish_reason for c in chunk.choices if c.finish_reason]
    assert "".join(texts) == "".join(TOKENS)
    assert finish == ["length"]
    assert server.sent[0]["prompt"] == "Say"


async def test_sdk_stream_error_object(
    server: OllamaBehindOpenAI, client: openai.AsyncOpenAI
) -> None:
    server.answer = ndjson(chat_objects(["Hel", "lo"])[:2]) + b'{"error":"runner died"}\n'
    stream = await client.chat.completions.create(model="local", messages=MESSAGES, stream=True)
    texts: list[str] = []

    async def collect() -> None:
        async for chunk in stream:
            texts.extend(c.delta.content for c in chunk.choices if c.delta.content)

    with pytest.raises(openai.APIError, match="runner died"):
        await collect()
    assert texts == ["Hel", "lo"]
    assert server.error is not None
    assert server.error.status == 502


async def test_sdk_unary_chat(server: OllamaBehindOpenAI, client: openai.AsyncOpenAI) -> None:
    final = chat_objects()[-1]
    server.answer = orjson.dumps({**final, "message": {"role": "assistant", "content": "Hi!"}})
    completion = await client.chat.completions.create(model="local", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hi!"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 32
    assert server.sent[0]["stream"] is False
