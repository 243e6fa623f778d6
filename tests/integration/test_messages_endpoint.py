"""POST /v1/messages: the official Anthropic SDK, unmodified, talking to the gateway.

Requests run as OpenAI chat internally (the chain sees OpenAI chunks) and are translated to
Anthropic's events on the way out. Upstreams: an OpenAI-compatible fake (byte-exact
transcripts, awkward splits) and the embedded demo model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from anthropic.types import MessageParam, RawMessageStreamEvent, ToolParam

from gateway.context import Outcome, RequestContext
from gateway.plugin import Plugin
from gateway.sse import SSEEvent
from gateway.testing.fake_upstream import (
    FakeUpstream,
    Script,
    json_script,
    openai_completion,
    openai_stream,
    rechunk,
    sse,
)
from gateway.testing.harness import RunningGateway, run_gateway
from plugins.token_count import TOKENS as COUNT
from plugins.token_count import TokenCounter
from tests.integration._support import BOUND, config_for, make_probe
from tests.integration.provider_fakes import named_events, openai_tool_stream

TOKENS = ["Hel", "lo ", "w\u00f6rld \U0001f30d"]
USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
USER: list[MessageParam] = [{"role": "user", "content": "Say hello"}]
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
TOOLS: list[ToolParam] = [
    {"name": "get_weather", "description": "Current weather.", "input_schema": WEATHER_SCHEMA}
]
FULL_SEQUENCE = [
    "message_start",
    "content_block_start",
    *["content_block_delta"] * len(TOKENS),
    "content_block_stop",
    "message_delta",
    "message_stop",
]
DEMO_CONFIG: dict[str, Any] = {
    "upstreams": {"demo": {"kind": "demo", "ttft_ms": 0.0, "itl_ms": 0.0}},
    "routes": [{"model": "claude-demo", "upstream": "demo"}],
}


@asynccontextmanager
async def _sdk(gw: RunningGateway) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0, timeout=10.0)
    try:
        yield client
    finally:
        await client.close()


def _text_of(events: list[RawMessageStreamEvent]) -> str:
    return "".join(
        event.delta.text
        for event in events
        if event.type == "content_block_delta" and event.delta.type == "text_delta"
    )


async def _drain(
    stream: anthropic.AsyncStream[RawMessageStreamEvent], into: list[RawMessageStreamEvent]
) -> None:
    """Every event into `into` (kept if iteration raises)."""
    async for event in stream:
        into.append(event)


class Shout(Plugin):
    """Upper-cases OpenAI chunk contents: proves the chain runs on OpenAI chunks."""

    name = "shout"

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        payload = event.json()
        choices = payload["choices"]  # a KeyError here would mean Anthropic events
        changed = [
            {**c, "delta": {**c["delta"], "content": c["delta"]["content"].upper()}}
            for c in choices
            if c.get("delta", {}).get("content")
        ]
        if not changed:
            return None
        return [SSEEvent.from_json({**payload, "choices": changed})]


# ----- streaming from an OpenAI-compatible upstream -----------------------------------------------


async def test_stream_yields_the_full_event_sequence(fake: FakeUpstream) -> None:
    fake.queue(Script(rechunk(b"".join(openai_stream(TOKENS, usage=USAGE)), [7, 2, 19])))
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        stream = await client.messages.create(
            model="m",
            max_tokens=256,
            system="Be terse.",
            messages=USER,
            stop_sequences=["END"],
            metadata={"user_id": "user-42"},
            extra_body={"temperature": 0.5},  # a wire field this SDK version has no argument for
            stream=True,
        )
        events = [event async for event in stream]

    assert [event.type for event in events] == FULL_SEQUENCE
    start = events[0]
    assert start.type == "message_start"
    assert start.message.model == "m"
    assert start.message.role == "assistant"
    assert start.message.id.startswith("msg_")
    block = events[1]
    assert block.type == "content_block_start"
    assert block.index == 0
    assert block.content_block.type == "text"
    assert _text_of(events) == "".join(TOKENS)
    delta = events[-2]
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == 3
    assert delta.usage.input_tokens == 11

    (exchange,) = fake.exchanges
    assert exchange.path == "/v1/chat/completions"
    assert "x-api-key" not in {name.lower() for name in exchange.headers}
    assert exchange.body == {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Say hello"},
        ],
        "max_tokens": 256,
        "stop": ["END"],
        "temperature": 0.5,
        "user": "user-42",
        "stream": True,
        # Asked by the dialect itself (this upstream has include_usage off): usage is
        # part of Anthropic's stream.
        "stream_options": {"include_usage": True},
    }


async def test_stream_helper_final_message_has_text_stop_reason_and_usage(
    fake: FakeUpstream,
) -> None:
    upstream = openai_stream(TOKENS, usage=USAGE)
    upstream[-3] = upstream[-3].replace(b'"finish_reason":"stop"', b'"finish_reason":"length"')
    fake.queue(Script(rechunk(b"".join(upstream), [3, 11])))
    async with (
        run_gateway(config_for(fake)) as gw,
        _sdk(gw) as client,
        client.messages.stream(model="m", max_tokens=3, messages=USER) as stream,
    ):
        message = await stream.get_final_message()
    assert len(message.content) == 1
    assert message.content[0].type == "text"
    assert message.content[0].text == "".join(TOKENS)
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 3)
    assert message.model == "m"


async def test_chain_sees_openai_chunks_and_usage_on_the_messages_endpoint(
    fake: FakeUpstream,
) -> None:
    fake.queue(Script(openai_stream(TOKENS, usage=USAGE)))
    probe, log = make_probe()
    config = config_for(fake, plugins=[{"name": "shout"}, {"name": "probe"}])
    async with (
        run_gateway(config, registry={"shout": Shout, "probe": probe}) as gw,
        _sdk(gw) as client,
    ):
        async with client.messages.stream(model="m", max_tokens=64, messages=USER) as stream:
            message = await stream.get_final_message()
        (ctx,) = await log.wait_ends(1)
    assert message.content[0].type == "text"
    assert message.content[0].text == "".join(TOKENS).upper()
    assert ctx.client_format == "anthropic"
    assert ctx.outcome is Outcome.COMPLETED
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens, ctx.usage.total_tokens) == (
        11,
        3,
        14,
    )
    assert ctx.usage.source == "upstream"


async def test_usage_comes_from_the_local_count_when_the_upstream_reports_none(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """An upstream that ignores include_usage (llama-cpp-python): message_start's
    input_tokens and message_delta's output_tokens are the token_count plugin's."""
    fake.queue(Script(rechunk(b"".join(openai_stream(TOKENS)), [5, 17])))
    fake.queue(Script(openai_stream(TOKENS)))
    probe, log = make_probe()
    options = {"cache_dir": str(tmp_path), "default_encoding": None}
    config = config_for(
        fake, plugins=[{"name": "token_count", "options": options}, {"name": "probe"}]
    )
    registry: dict[str, type[Any]] = {"token_count": TokenCounter, "probe": probe}
    async with run_gateway(config, registry=registry) as gw, _sdk(gw) as client:
        stream = await client.messages.create(model="m", max_tokens=64, messages=USER, stream=True)
        events = [event async for event in stream]
        async with client.messages.stream(model="m", max_tokens=64, messages=USER) as helper:
            message = await helper.get_final_message()
        first, second = await log.wait_ends(2)

    tokens = first.require(COUNT)
    assert tokens.prompt_tokens > 0
    assert tokens.completion_tokens > 0
    assert [event.type for event in events] == FULL_SEQUENCE
    start, delta = events[0], events[-2]
    assert start.type == "message_start"
    assert (start.message.usage.input_tokens, start.message.usage.output_tokens) == (
        tokens.prompt_tokens,
        0,
    )
    assert delta.type == "message_delta"
    assert delta.usage.output_tokens == tokens.completion_tokens
    assert delta.usage.input_tokens == tokens.prompt_tokens
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (
        tokens.prompt_tokens,
        tokens.completion_tokens,
    )
    assert first.usage.source == "local"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        tokens.prompt_tokens,
        tokens.completion_tokens,
    )
    assert second.usage.source == "local"


async def test_tool_use_round_trip(fake: FakeUpstream) -> None:
    pieces = ['{"ci', 'ty": "Par', 'is"}']
    usage = {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}
    fake.queue(
        Script(
            rechunk(
                b"".join(
                    openai_tool_stream(text=["Let me ", "check."], pieces=pieces, usage=usage)
                ),
                [5, 1, 9],
            )
        ),
        json_script(openai_completion("It is 18\u00b0C and sunny.")),
    )
    question: MessageParam = {"role": "user", "content": "Weather in Paris?"}
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        async with client.messages.stream(
            model="m", max_tokens=200, messages=[question], tools=TOOLS
        ) as stream:
            first = await stream.get_final_message()
        assert first.stop_reason == "tool_use"
        assert [block.type for block in first.content] == ["text", "tool_use"]
        text, tool = first.content
        assert text.type == "text"
        assert text.text == "Let me check."
        assert tool.type == "tool_use"
        assert tool.id == "call_abc123"
        assert tool.name == "get_weather"
        assert tool.input == {"city": "Paris"}
        assert (first.usage.input_tokens, first.usage.output_tokens) == (40, 12)

        answer = await client.messages.create(
            model="m",
            max_tokens=200,
            tools=TOOLS,
            messages=[
                question,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": text.text},
                        {"type": "tool_use", "id": tool.id, "name": tool.name, "input": tool.input},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": tool.id,
                            "content": "18\u00b0C, sunny",
                        }
                    ],
                },
            ],
        )
    assert answer.content[0].type == "text"
    assert answer.content[0].text == "It is 18\u00b0C and sunny."
    assert answer.stop_reason == "end_turn"

    first_body = fake.exchanges[0].body
    assert first_body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather.",
                "parameters": WEATHER_SCHEMA,
            },
        }
    ]
    second_body = fake.exchanges[1].body
    assert second_body["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "call_abc123",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc123", "content": "18\u00b0C, sunny"},
    ]
    assert "stream" not in second_body


async def test_raw_tool_use_events_carry_the_input_json(fake: FakeUpstream) -> None:
    fake.queue(Script(openai_tool_stream(pieces=['{"city":', ' "Oslo"}'])))
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        stream = await client.messages.create(
            model="m", max_tokens=50, messages=USER, tools=TOOLS, stream=True
        )
        events = [event async for event in stream]
    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[1]
    assert start.type == "content_block_start"
    assert start.content_block.type == "tool_use"
    assert start.content_block.id == "call_abc123"
    assert start.content_block.name == "get_weather"
    partial = "".join(
        event.delta.partial_json
        for event in events
        if event.type == "content_block_delta" and event.delta.type == "input_json_delta"
    )
    assert orjson.loads(partial) == {"city": "Oslo"}
    end = events[-2]
    assert end.type == "message_delta"
    assert end.delta.stop_reason == "tool_use"


# ----- non-streaming ------------------------------------------------------------------------------


async def test_non_streaming_message(fake: FakeUpstream) -> None:
    fake.queue(json_script(openai_completion("Bonjour, caf\u00e9 !")))
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        message = await client.messages.create(model="m", max_tokens=100, messages=USER)
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == "m"
    assert message.id == "msg_test"
    assert len(message.content) == 1
    assert message.content[0].type == "text"
    assert message.content[0].text == "Bonjour, caf\u00e9 !"
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 2)
    (exchange,) = fake.exchanges
    assert exchange.body == {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 100,
    }


# ----- errors in Anthropic's shape ----------------------------------------------------------------


async def test_unknown_model_is_a_not_found_error(fake: FakeUpstream) -> None:
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        with pytest.raises(anthropic.NotFoundError) as caught:
            await client.messages.create(model="nope", max_tokens=10, messages=USER)
    assert caught.value.status_code == 404
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    assert "nope" in body["error"]["message"]
    assert body["request_id"] == caught.value.response.headers["X-Request-Id"]
    assert fake.exchanges == []


async def test_missing_max_tokens_is_an_invalid_request_error(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with (
        run_gateway(config_for(fake)) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.url + "/v1/messages", json=body) as resp,
    ):
        payload = orjson.loads(await resp.read())
    assert resp.status == 400
    assert resp.content_type == "application/json"
    assert payload["type"] == "error"
    assert payload["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in payload["error"]["message"]
    assert set(payload) == {"type", "error", "request_id"}
    assert fake.exchanges == []


async def test_upstream_rate_limit_is_an_anthropic_rate_limit_error(fake: FakeUpstream) -> None:
    error = {"error": {"message": "Slow down.", "type": "rate_limit_error", "code": None}}
    fake.queue(json_script(error, status=429))
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        with pytest.raises(anthropic.RateLimitError) as caught:
            await client.messages.create(model="m", max_tokens=10, messages=USER, stream=True)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["message"] == "Slow down."


async def test_truncation_mid_stream_is_a_final_error_event(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script(openai_stream(["Par", "tial"], done=False)[:-1]))  # no finish, no [DONE]
    body = {"model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        run_gateway(config_for(fake)) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.url + "/v1/messages", json={**body, "stream": True}) as resp,
    ):
        raw = await resp.read()
    assert resp.status == 200
    events = named_events(raw)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    assert "message_stop" not in names
    assert "message_delta" not in names
    name, payload = events[-1]
    assert name == "error"
    assert payload["type"] == "error"
    assert payload["error"]["type"] == "api_error"
    assert payload["error"]["message"] == "The upstream closed the stream before its final event."
    texts = [p["delta"]["text"] for n, p in events if n == "content_block_delta"]
    assert texts == ["Par", "tial"]


async def test_truncation_mid_stream_raises_in_the_sdk(fake: FakeUpstream) -> None:
    fake.queue(Script(openai_stream(["Par", "tial"], done=False)[:-1]))
    got: list[RawMessageStreamEvent] = []
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        stream = await client.messages.create(model="m", max_tokens=20, messages=USER, stream=True)
        with pytest.raises(anthropic.APIStatusError, match="closed the stream"):
            await _drain(stream, got)
    assert _text_of(got) == "Partial"
    assert "message_stop" not in [event.type for event in got]


async def test_in_band_upstream_error_mid_stream_is_an_anthropic_error_event(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    good = openai_stream(["ok"], done=False)[:-1]
    bad = sse({"error": {"message": "Engine crashed.", "type": "server_error", "code": None}})
    fake.queue(Script([*good, bad]))
    body = {"model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        run_gateway(config_for(fake)) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.url + "/v1/messages", json={**body, "stream": True}) as resp,
    ):
        raw = await resp.read()
    events = named_events(raw)
    name, payload = events[-1]
    assert name == "error"
    assert payload["error"] == {"type": "api_error", "message": "Engine crashed."}
    assert payload["request_id"] == resp.headers["X-Request-Id"]
    assert [n for n, _ in events].count("error") == 1


# ----- the embedded demo --------------------------------------------------------------------------


async def test_demo_stream_event_sequence() -> None:
    async with run_gateway(DEMO_CONFIG) as gw, _sdk(gw) as client:
        stream = await client.messages.create(
            model="claude-demo", max_tokens=8, messages=USER, stream=True
        )
        events = [event async for event in stream]
    names = [event.type for event in events]
    deltas = names.count("content_block_delta")
    assert deltas >= 1
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert _text_of(events).startswith("Hello from Sluice!")
    end = events[-2]
    assert end.type == "message_delta"
    assert end.delta.stop_reason == "max_tokens"  # the demo's answer is longer than 8 words
    assert end.usage.output_tokens == 8
    assert end.usage.input_tokens is not None
    assert end.usage.input_tokens > 0


async def test_demo_stream_helper_and_non_streaming_agree() -> None:
    async with run_gateway(DEMO_CONFIG) as gw, _sdk(gw) as client:
        async with client.messages.stream(
            model="claude-demo", max_tokens=500, messages=USER
        ) as stream:
            streamed = await stream.get_final_message()
        unary = await client.messages.create(model="claude-demo", max_tokens=500, messages=USER)
    for message in (streamed, unary):
        assert message.model == "claude-demo"
        assert message.stop_reason == "end_turn"
        assert message.content[0].type == "text"
        assert "You asked about: Say hello." in message.content[0].text
        assert message.usage.input_tokens > 0
    assert streamed.content[0].type == unary.content[0].type == "text"
    assert streamed.content[0].text == unary.content[0].text
    assert streamed.usage.output_tokens == unary.usage.output_tokens
    assert streamed.usage.input_tokens == unary.usage.input_tokens
