"""POST /v1/responses: the official openai SDK, unmodified, through a real gateway.

The translated lane: requests run as chat inside the gateway (the chain sees chat chunks),
answers go out as Responses events; the gateway keeps the conversation so
`previous_response_id`, GET and DELETE work in front of any chat upstream. Upstreams: an
OpenAI-compatible fake that records what it received, and the embedded demo model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from pydantic import BaseModel

from gateway.auth import hash_key
from gateway.context import Outcome
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
from tests.integration._support import BOUND, RawClient, config_for, make_probe
from tests.integration.provider_fakes import named_events, openai_tool_stream

TOKENS = ["Hel", "lo ", "w\u00f6rld \U0001f30d"]
USAGE: dict[str, Any] = {
    "prompt_tokens": 11,
    "completion_tokens": 3,
    "total_tokens": 14,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 1},
}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * len(TOKENS),
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
ML_KEY = "sk-sluice-ml-team-key-0123456789"
OPS_KEY = "sk-sluice-ops-team-key-abcdefghij"


@asynccontextmanager
async def _sdk(gw: RunningGateway, key: str = "x") -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=BOUND)
    try:
        yield client
    finally:
        await client.close()


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return sse({"id": "chatcmpl-r", "object": "chat.completion.chunk", "choices": [choice]})


# ----- streaming ----------------------------------------------------------------------------------


async def test_create_stream_yields_every_event_with_usage(fake: FakeUpstream) -> None:
    fake.queue(Script(rechunk(b"".join(openai_stream(TOKENS, usage=USAGE)), [7, 2, 19])))
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        stream = await client.responses.create(
            model="m", input="Say hello", instructions="Be terse.", stream=True
        )
        events = [event async for event in stream]

    assert [event.type for event in events] == TEXT_EVENTS
    assert [event.sequence_number for event in events] == list(range(len(events)))
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.status == "completed"
    assert done.response.output_text == "".join(TOKENS)
    assert done.response.model == "m"
    usage = done.response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (11, 3, 14)
    assert usage.input_tokens_details.cached_tokens == 4
    assert usage.output_tokens_details.reasoning_tokens == 1
    (exchange,) = fake.exchanges
    assert exchange.path == "/v1/chat/completions"
    assert exchange.body["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Say hello"},
    ]
    assert exchange.body["stream_options"] == {"include_usage": True}


async def test_wire_has_event_lines_matching_each_type(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script(openai_stream(["a", "b"])))
    async with run_gateway(config_for(fake)) as gw:
        body = {"model": "m", "input": "hi", "stream": True}
        async with http.post(gw.url + "/v1/responses", json=body) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/event-stream"
            raw = await resp.read()
    events = named_events(raw)
    assert all(name == data["type"] for name, data in events)
    assert b"[DONE]" not in raw


async def test_stream_helper_gets_the_final_response(fake: FakeUpstream) -> None:
    fake.queue(Script(openai_stream(TOKENS, usage=USAGE)))
    async with (
        run_gateway(config_for(fake)) as gw,
        _sdk(gw) as client,
        client.responses.stream(model="m", input="hi") as stream,
    ):
        deltas = [
            event.delta async for event in stream if event.type == "response.output_text.delta"
        ]
        final = await stream.get_final_response()
    assert deltas == TOKENS
    assert final.output_text == "".join(TOKENS)
    assert final.id.startswith("resp_")


async def test_reasoning_deltas_become_a_reasoning_summary(fake: FakeUpstream) -> None:
    chunks = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"reasoning_content": "Think"}),
        _chunk({"reasoning_content": "ing."}),
        _chunk({"content": "Answer"}),
        _chunk({}, "stop"),
        b"data: [DONE]\n\n",
    ]
    fake.queue(Script(chunks))
    async with (
        run_gateway(config_for(fake)) as gw,
        _sdk(gw) as client,
        client.responses.stream(
            model="m", input="hi", reasoning={"effort": "low", "summary": "auto"}
        ) as stream,
    ):
        types = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert "response.reasoning_summary_text.delta" in types
    reasoning, _message = final.output
    assert reasoning.type == "reasoning"
    assert [part.text for part in reasoning.summary] == ["Thinking."]
    assert final.output_text == "Answer"
    assert fake.exchanges[0].body["reasoning_effort"] == "low"


async def test_length_finish_is_response_incomplete(fake: FakeUpstream) -> None:
    fake.queue(Script([_chunk({"content": "cut"}), _chunk({}, "length"), b"data: [DONE]\n\n"]))
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        stream = await client.responses.create(
            model="m", input="hi", max_output_tokens=1, stream=True
        )
        events = [event async for event in stream]
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert fake.exchanges[0].body["max_tokens"] == 1


# ----- non-streaming and structured output ------------------------------------------------------


class Weather(BaseModel):
    city: str
    celsius: int


async def test_parse_with_a_pydantic_model_sends_a_json_schema(fake: FakeUpstream) -> None:
    fake.queue(json_script(openai_completion('{"city": "Paris", "celsius": 21}')))
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        parsed = await client.responses.parse(
            model="m", input="Weather in Paris?", text_format=Weather
        )
    assert parsed.output_parsed == Weather(city="Paris", celsius=21)
    assert parsed.usage is not None
    assert parsed.usage.total_tokens == 7
    sent = fake.exchanges[0].body
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["name"] == "Weather"
    assert sent["response_format"]["json_schema"]["schema"]["required"] == ["city", "celsius"]
    assert "stream" not in sent


# ----- function calling ---------------------------------------------------------------------------


async def test_function_call_round_trip_through_previous_response_id(fake: FakeUpstream) -> None:
    fake.queue(
        Script(openai_tool_stream(call_id="call_1", pieces=['{"city":', ' "Paris"}'])),
        json_script(openai_completion("It is sunny.")),
    )
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        async with client.responses.stream(
            model="m",
            input="Weather in Paris?",
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
        ) as stream:
            first = await stream.get_final_response()
        (call,) = first.output
        assert call.type == "function_call"
        assert (call.call_id, call.name, call.arguments) == (
            "call_1",
            "get_weather",
            '{"city": "Paris"}',
        )
        second = await client.responses.create(
            model="m",
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": "call_1", "output": "sunny"}],
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
        )
    assert second.output_text == "It is sunny."
    assert second.previous_response_id == first.id
    assert fake.exchanges[0].body["tools"][0]["function"]["name"] == "get_weather"
    assert fake.exchanges[1].body["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]


async def test_function_call_round_trip_with_explicit_input(fake: FakeUpstream) -> None:
    fake.queue(json_script(openai_completion("Done.")))
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        answer = await client.responses.create(
            model="m",
            store=False,
            input=[
                {"role": "user", "content": "Weather?"},
                {
                    "type": "function_call",
                    "call_id": "c9",
                    "name": "get_weather",
                    "arguments": "{}",
                },
                {"type": "function_call_output", "call_id": "c9", "output": "rain"},
            ],
        )
    assert answer.output_text == "Done."
    messages = fake.exchanges[0].body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["id"] == "c9"


# ----- errors -------------------------------------------------------------------------------------


async def test_upstream_error_before_headers_is_openai_json(fake: FakeUpstream) -> None:
    fake.queue(json_script({"error": {"message": "slow down", "type": "rate_limit"}}, status=429))
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.responses.create(model="m", input="hi", stream=True)
    assert info.value.status_code == 429
    assert "slow down" in info.value.message


async def test_unsupported_input_is_a_400_naming_it(fake: FakeUpstream) -> None:
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.create(
                model="m",
                input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f1"}]}],
            )
    assert info.value.param == "input[0].content[0]"
    assert fake.exchanges == []


async def test_upstream_break_after_headers_is_response_failed(fake: FakeUpstream) -> None:
    fake.queue(Script(openai_stream(["partial"], done=False)[:2], then="reset"))
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        stream = await client.responses.create(model="m", input="hi", stream=True)
        events = [event async for event in stream]
    last = events[-1]
    assert last.type == "response.failed"
    assert last.response.status == "failed"
    assert last.response.error is not None
    assert last.response.error.code == "server_error"
    assert [event.type for event in events].count("response.failed") == 1


async def test_stream_helper_raises_on_response_failed(fake: FakeUpstream) -> None:
    fake.queue(Script(openai_stream(["partial"], done=False)[:2], then="reset"))
    async with (
        run_gateway(config_for(fake)) as gw,
        _sdk(gw) as client,
        client.responses.stream(model="m", input="hi") as stream,
    ):
        with pytest.raises(RuntimeError):
            await stream.get_final_response()


async def test_disconnect_cancels_the_upstream(fake: FakeUpstream) -> None:
    probe, log = make_probe()
    fake.queue(Script(openai_stream(["one", " two"], done=False), then="hang"))
    config = config_for(fake, plugins=[{"name": "probe"}])
    async with run_gateway(config, registry={"probe": probe}) as gw:
        client = await RawClient.connect(gw.url)
        try:
            async with asyncio.timeout(BOUND):
                await client.post_json(
                    "/v1/responses", {"model": "m", "input": "hi", "stream": True}
                )
                assert (await client.read_head()).status == 200
                received = bytearray()
                await client.read_until(received, b"response.output_text.delta")
            (exchange,) = fake.exchanges
            client.abort()
            async with asyncio.timeout(BOUND):
                await exchange.finished.wait()
                await log.wait_ends(1)
        finally:
            await client.close()
    assert exchange.closed_by_peer
    assert log.outcomes == [Outcome.CLIENT_DISCONNECTED]


# ----- the store ----------------------------------------------------------------------------------


def _teams_config(fake: FakeUpstream) -> dict[str, Any]:
    config = config_for(fake)
    config["teams"] = {
        "ml": {"keys": [{"name": "ci", "sha256": hash_key(ML_KEY)}]},
        "ops": {"keys": [{"name": "bot", "sha256": hash_key(OPS_KEY)}]},
    }
    return config


async def test_get_input_items_and_delete_are_scoped_to_the_team(fake: FakeUpstream) -> None:
    fake.queue(json_script(openai_completion("Hi there")))
    async with (
        run_gateway(_teams_config(fake)) as gw,
        _sdk(gw, ML_KEY) as ml,
        _sdk(gw, OPS_KEY) as ops,
    ):
        made = await ml.responses.create(model="m", input="hello")
        got = await ml.responses.retrieve(made.id)
        assert got.output_text == "Hi there"
        assert got.id == made.id
        items = await ml.responses.input_items.list(made.id)
        assert [item.type for item in items.data] == ["message"]
        with pytest.raises(openai.NotFoundError):
            await ops.responses.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            await ops.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            await ops.responses.create(model="m", input="more", previous_response_id=made.id)
        await ml.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            await ml.responses.retrieve(made.id)
    assert len(fake.exchanges) == 1  # the refused follow-up never went upstream


async def test_store_false_keeps_nothing(fake: FakeUpstream) -> None:
    fake.queue(Script(openai_stream(["x"])))
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        async with client.responses.stream(model="m", input="hi", store=False) as stream:
            final = await stream.get_final_response()
        assert fake.exchanges[0].body.get("store") is None  # the gateway's setting, not sent
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(final.id)
        with pytest.raises(openai.NotFoundError) as info:
            await client.responses.create(model="m", input="x", previous_response_id=final.id)
    assert info.value.param == "previous_response_id"


async def test_a_chain_of_turns_carries_the_whole_conversation(fake: FakeUpstream) -> None:
    fake.queue(
        json_script(openai_completion("one")),
        Script(openai_stream(["two"])),
        json_script(openai_completion("three")),
    )
    async with run_gateway(config_for(fake)) as gw, _sdk(gw) as client:
        first = await client.responses.create(model="m", input="a")
        async with client.responses.stream(
            model="m", input="b", previous_response_id=first.id
        ) as stream:
            second = await stream.get_final_response()
        await client.responses.create(model="m", input="c", previous_response_id=second.id)
    assert fake.exchanges[2].body["messages"] == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "c"},
    ]


# ----- the embedded demo model --------------------------------------------------------------------


DEMO_CONFIG: dict[str, Any] = {
    "upstreams": {"demo": {"kind": "demo", "ttft_ms": 0.0, "itl_ms": 0.0}},
    "routes": [{"model": "demo", "upstream": "demo"}],
}


async def test_demo_model_streams_and_answers() -> None:
    async with run_gateway(DEMO_CONFIG) as gw, _sdk(gw) as client:
        async with client.responses.stream(model="demo", input="Say hi") as stream:
            final = await stream.get_final_response()
        assert final.status == "completed"
        assert final.output_text
        unary = await client.responses.create(
            model="demo", input="again", previous_response_id=final.id
        )
    assert unary.output_text
    assert unary.usage is not None
    assert unary.usage.output_tokens > 0


async def test_raw_error_json_before_headers(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with (
        run_gateway(config_for(fake)) as gw,
        http.post(gw.url + "/v1/responses", json={"model": "m"}) as resp,
    ):
        status, body = resp.status, orjson.loads(await resp.read())
    assert status == 400
    assert body["error"]["param"] == "input"
