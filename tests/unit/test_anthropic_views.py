"""Views of Anthropic events for plugins (gateway.deltas on the native lane) and the native
lane's stream observer."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.context import Endpoint, RequestContext
from gateway.deltas import (
    event_texts,
    finish_reasons,
    prompt_texts,
    stop_events,
    text_delta,
    text_event,
    with_texts,
    without_choices,
)
from gateway.protocols import ANTHROPIC
from gateway.protocols.anthropic.events import NativeObserver
from gateway.protocols.anthropic.views import generated_texts
from gateway.sse import SSEDecoder, SSEEvent


def _ctx() -> RequestContext:
    ctx = RequestContext("r", Endpoint.CHAT)
    ctx.client_format = ctx.wire = ANTHROPIC
    return ctx


def _event(raw: bytes) -> SSEEvent:
    (event,) = SSEDecoder().feed(raw)
    return event


def _delta(index: int, delta: dict[str, Any], *, spaced: bool = False) -> SSEEvent:
    payload = {"type": "content_block_delta", "index": index, "delta": delta}
    data = orjson.dumps(payload) if not spaced else orjson.dumps(payload).replace(b",", b", ")
    return _event(b"event: content_block_delta\ndata: " + data + b"\n\n")


@pytest.mark.parametrize("text", ["Hi", ' "quoted" \\ \u00e9\u2600\n', "x"])
@pytest.mark.parametrize("spaced", [False, True], ids=["anthropic-bytes", "other-spacing"])
def test_text_delta_reads_text_deltas_by_block(text: str, spaced: bool) -> None:
    ctx = _ctx()
    event = _delta(3, {"type": "text_delta", "text": text}, spaced=spaced)
    assert event_texts(ctx, event) == {3: text}
    plain = text_delta(ctx, event)
    assert plain == ((3, text) if not spaced else None)  # other spacing: parsed instead


@pytest.mark.parametrize(
    "delta",
    [
        {"type": "thinking_delta", "thinking": "hmm"},
        {"type": "signature_delta", "signature": "EqQB"},
        {"type": "input_json_delta", "partial_json": '{"a": '},
        {"type": "citations_delta", "citation": {"type": "char_location", "cited_text": "x"}},
    ],
)
def test_other_deltas_carry_no_text_but_are_counted(delta: dict[str, Any]) -> None:
    ctx = _ctx()
    event = _delta(0, delta)
    assert text_delta(ctx, event) is None
    assert event_texts(ctx, event) == {}
    counted = [v for k, v in delta.items() if k in ("thinking", "partial_json")]
    assert generated_texts(event.json()) == counted


def test_an_openai_chunk_is_no_text_on_the_anthropic_lane() -> None:
    chunk = _event(
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"hi"},"logprobs":null,"finish_reason":null}]}'
        b"\n\n"
    )
    assert text_delta(_ctx(), chunk) is None


def test_with_texts_splices_the_text_and_keeps_the_event_name() -> None:
    ctx = _ctx()
    event = _delta(1, {"type": "text_delta", "text": "secret"})
    for source in (event, _delta(1, {"type": "text_delta", "text": "secret"}, spaced=True)):
        edited = with_texts(ctx, source, {1: "[x] \u00e9"})
        assert edited.event == "content_block_delta"
        assert edited.json() == {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "text_delta", "text": "[x] \u00e9"},
        }
    assert with_texts(ctx, event, {0: "other block"}) is event


def test_text_event_and_stop_events_make_a_valid_ending() -> None:
    ctx = _ctx()
    template = _event(b'event: message_start\ndata: {"type":"message_start"}\n\n')
    new = text_event(ctx, template, 2, "tail")
    assert (new.event, new.json()["index"], new.json()["delta"]["text"]) == (
        "content_block_delta",
        2,
        "tail",
    )
    stop, delta = stop_events(ctx, template, 2, "content_filter")
    assert (stop.event, stop.json()) == (
        "content_block_stop",
        {"type": "content_block_stop", "index": 2},
    )
    assert delta.event == "message_delta"
    assert delta.json()["delta"] == {"stop_reason": "refusal", "stop_sequence": None}
    assert delta.json()["usage"] == {"output_tokens": 0}


def test_blocks_finish_and_are_dropped_by_index() -> None:
    ctx = _ctx()
    stop = _event(b'event: content_block_stop\ndata: {"type":"content_block_stop","index":4}\n\n')
    assert finish_reasons(ctx, stop) == {4: "content_block_stop"}
    assert without_choices(ctx, stop, {4}) is None
    assert without_choices(ctx, stop, {1}) is stop
    ping = _event(b'event: ping\ndata: {"type": "ping"}\n\n')
    assert without_choices(ctx, ping, {4}) is ping


def test_prompt_texts_include_the_system_prompt_and_every_role() -> None:
    body = {
        "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "system", "content": "reminder"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "plan", "signature": "s"},
                    {"type": "text", "text": "answer"},
                ],
            },
        ],
    }
    assert prompt_texts(Endpoint.CHAT, body, ANTHROPIC) == [
        "sys",
        "hello",
        "reminder",
        "plan",
        "answer",
    ]


# ----- the native observer ---------------------------------------------------------------------


def _stream(*payloads: dict[str, Any]) -> list[SSEEvent]:
    raw = b"".join(
        b"event: " + p["type"].encode() + b"\ndata: " + orjson.dumps(p) + b"\n\n" for p in payloads
    )
    return SSEDecoder().feed(raw)


START = {
    "type": "message_start",
    "message": {
        "model": "claude-x",
        "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1},
    },
}
DELTA = {
    "type": "message_delta",
    "delta": {"stop_reason": "end_turn"},
    "usage": {"output_tokens": 9},
}


def test_observer_ends_at_message_stop_with_the_final_usage() -> None:
    ctx, observer = _ctx(), NativeObserver()
    events = _stream(START, DELTA, {"type": "message_stop"}, {"type": "ping"})
    batch = observer.classify(ctx, events)
    assert batch.events == events[:2]
    assert batch.terminal is events[2]
    observer.finish(ctx)
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (15, 9)
    assert ctx.usage.source == "upstream"
    assert ctx.response_model == "claude-x"


def test_observer_leaves_a_stream_cut_before_message_delta_to_the_local_count() -> None:
    ctx, observer = _ctx(), NativeObserver()
    observer.classify(ctx, _stream(START))
    observer.finish(ctx)
    assert ctx.usage.source == "none"


def test_observer_reports_an_error_event_with_its_type() -> None:
    ctx, observer = _ctx(), NativeObserver()
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    events = _stream(START, error)
    batch = observer.classify(ctx, events)
    assert batch.events == events[:1]
    assert batch.error is not None
    assert batch.error.code == "upstream_overloaded"
    final = observer.error_event(batch.error)
    assert final.event == "error"
    assert final.json()["error"] == {"type": "overloaded_error", "message": "Overloaded"}
