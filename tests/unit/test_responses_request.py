"""Responses -> chat: one test per row of docs/responses.md's loss table."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import GatewayError
from gateway.protocols.responses.objects import Turn
from gateway.protocols.responses.request import (
    input_items,
    responses_request_to_chat,
    validate_request,
)
from gateway.protocols.responses.stream import ChatStreamToResponses
from gateway.sse import SSEEvent


def _chat(body: dict[str, Any]) -> dict[str, Any]:
    body = {"model": "m", **body}
    validate_request(body)
    return responses_request_to_chat(body, "up", input_items(body))


def test_string_input_and_instructions() -> None:
    out = _chat({"input": "hi", "instructions": "terse"})
    assert out == {
        "model": "up",
        "messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}],
    }


def test_message_parts_images_and_developer_role() -> None:
    out = _chat(
        {
            "input": [
                {"role": "developer", "content": "rules"},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "see"},
                        {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
            ]
        }
    )
    assert out["messages"] == [
        {"role": "system", "content": "rules"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "see"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
            ],
        },
        {"role": "assistant", "content": "ok"},
    ]


def test_sampling_limits_reasoning_user_and_format() -> None:
    out = _chat(
        {
            "input": "hi",
            "max_output_tokens": 9,
            "temperature": 0.2,
            "top_p": 0.9,
            "parallel_tool_calls": False,
            "reasoning": {"effort": "high", "summary": "auto"},
            "safety_identifier": "u1",
            "text": {
                "format": {
                    "type": "json_schema",
                    "name": "W",
                    "schema": {"type": "object"},
                    "strict": True,
                }
            },
            "stream": True,
        }
    )
    assert out["max_tokens"] == 9
    assert (out["temperature"], out["top_p"], out["parallel_tool_calls"]) == (0.2, 0.9, False)
    assert out["reasoning_effort"] == "high"
    assert out["user"] == "u1"
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "W", "schema": {"type": "object"}, "strict": True},
    }
    assert out["stream_options"] == {"include_usage": True}


def test_function_tools_and_tool_choice() -> None:
    out = _chat(
        {
            "input": "hi",
            "tools": [
                {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}
            ],
            "tool_choice": {"type": "function", "name": "f"},
        }
    )
    assert out["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object"}, "strict": True},
        }
    ]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "f"}}


def test_dropped_fields_do_not_reach_the_upstream() -> None:
    out = _chat(
        {
            "tools": [
                {"type": "web_search"},
                {"type": "namespace", "name": "ns", "tools": []},
                {"type": "custom", "name": "c"},
            ],
            "input": [
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"role": "user", "content": "hi"},
            ],
            "metadata": {"a": "b"},
            "truncation": "auto",
            "include": ["reasoning.encrypted_content"],
            "store": True,
            "prompt_cache_key": "k",
            "service_tier": "flex",
            "text": {"format": {"type": "text"}, "verbosity": "low"},
        }
    )
    assert out == {"model": "up", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0]",
        ),
        ({"input": "hi", "background": True}, "background"),
        ({"input": "hi", "tool_choice": {"type": "web_search"}}, "tool_choice"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({}, "input"),
    ],
)
def test_what_chat_cannot_carry_is_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        _chat(body)
    assert info.value.status == 400
    assert info.value.param == param


def _feed(translator: ChatStreamToResponses, chunks: list[dict[str, Any] | str]) -> list[Any]:
    out = []
    for chunk in chunks:
        event = SSEEvent(data=chunk) if isinstance(chunk, str) else SSEEvent.from_json(chunk)
        out += [event.json() for event in translator.feed(event)]
    return out


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_parallel_tool_calls_keep_their_own_items_and_order() -> None:
    stored: list[Any] = []
    translator = ChatStreamToResponses(Turn(model="m", request={}), on_done=stored.append)
    call = {"type": "function", "function": {"name": "f", "arguments": ""}}
    events = _feed(
        translator,
        [
            _delta({"content": "Let me check."}),
            _delta({"tool_calls": [{"index": 0, "id": "a", **call}]}),
            _delta({"tool_calls": [{"index": 1, "id": "b", **call}]}),
            _delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":1}'}}]}),
            _delta({"tool_calls": [{"index": 1, "function": {"arguments": '{"y":2}'}}]}),
            _delta({}, "tool_calls"),
            "[DONE]",
        ],
    )
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == [
        "message",
        "function_call",
        "function_call",
    ]
    assert [item.get("arguments") for item in final["output"][1:]] == ['{"x":1}', '{"y":2}']
    assert stored == [final]
    done_args = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["output_index"], e["arguments"]) for e in done_args] == [
        (1, '{"x":1}'),
        (2, '{"y":2}'),
    ]


def test_an_in_band_error_stops_translation_and_fails_the_response() -> None:
    translator = ChatStreamToResponses(Turn(model="m", request={}))
    _feed(translator, [_delta({"content": "a"})])
    assert _feed(translator, [{"error": {"message": "boom", "type": "server_error"}}]) == []
    assert translator.error is not None
    failed = translator.fail(translator.error).json()
    assert failed["type"] == "response.failed"
    assert failed["response"]["error"]["code"] == "server_error"


def test_a_failure_before_any_event_is_an_error_event() -> None:
    translator = ChatStreamToResponses(Turn(model="m", request={}))
    event = translator.fail(GatewayError(504, "late", code="timeout"))
    assert event.event == "error"
    assert event.json() == {
        "type": "error",
        "code": "timeout",
        "message": "late",
        "param": None,
        "sequence_number": 0,
    }
