"""Upstream kind `anthropic`: OpenAI clients in front of Anthropic's Messages API, over loopback.

The fake speaks Anthropic's exact wire format (named SSE events, awkward byte splits); the
tests check what it received (path, headers, Messages body) and what the official OpenAI SDK
makes of the translated stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolUnionParam

from gateway.context import Outcome, RequestContext, Usage
from gateway.plugin import Plugin
from gateway.sse import SSEEvent
from gateway.testing.fake_upstream import FakeUpstream, Script, json_script, rechunk
from gateway.testing.harness import run_gateway
from plugins.token_count import TOKENS, TokenCounter
from tests.integration._support import (
    BOUND,
    CHAT,
    COMPLETIONS,
    DONE,
    EMBEDDINGS,
    chat_body,
    chat_contents,
    final_error,
    json_error,
    make_probe,
    split_events,
)
from tests.integration.provider_fakes import (
    SDKStream,
    anthropic_error_body,
    anthropic_error_event,
    anthropic_message,
    anthropic_message_end,
    anthropic_message_start,
    anthropic_text_block,
    anthropic_tool_block,
    named_events,
    openai_sdk,
    read_sdk_stream,
    root_url,
)

KEY = "sk-ant-api03-upstream-key-0123456789"
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
    "required": ["city"],
}
TOOLS: list[ChatCompletionToolUnionParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": WEATHER_SCHEMA,
        },
    }
]
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What's the weather in Paris?"},
]
TEXT = ["Let me check", " the weather in Par", "is \u2600\ufe0f."]
ARGUMENT_PIECES = ['{"city": "Pa', 'ris", "unit"', ': "celsius"}']


def _config(
    fake: FakeUpstream, plugins: Sequence[dict[str, Any]] = (), **upstream: Any
) -> dict[str, Any]:
    return {
        "upstreams": {
            "claude": {
                "kind": "anthropic",
                "base_url": root_url(fake),
                "api_key": KEY,
                "default_max_tokens": 1000,
                **upstream,
            }
        },
        "routes": [
            # One attempt: these tests look at a single exchange with the fake.
            {"model": "m", "upstream": "claude", "upstream_model": "claude-test", "retries": 0}
        ],
        "plugins": list(plugins),
    }


def _tool_transcript(*, cache_read: int = 10) -> list[bytes]:
    """Text block, then a tool_use block whose input arrives in pieces; stop_reason tool_use."""
    return [
        anthropic_message_start(input_tokens=25, cache_read=cache_read),
        *anthropic_text_block(0, TEXT, ping=True),
        *anthropic_tool_block(1, "toolu_01XYZ", "get_weather", ARGUMENT_PIECES),
        *anthropic_message_end("tool_use", 89),
    ]


def _text_transcript(texts: Sequence[str], output_tokens: int = 3) -> list[bytes]:
    return [
        anthropic_message_start(input_tokens=25),
        *anthropic_text_block(0, texts, ping=True),
        *anthropic_message_end("end_turn", output_tokens),
    ]


def _headers_named(headers: dict[str, str], name: str) -> list[str]:
    return [value for key, value in headers.items() if key.lower() == name]


# ----- a plugin that records what the chain saw ---------------------------------------------------


@dataclass
class SpyLog:
    """What the spy saw: every data event's JSON, and the context's usage at on_end."""

    payloads: list[Any] = field(default_factory=list)
    usage: Usage | None = None
    outcome: Outcome | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class Spy(Plugin):
    """Records the parsed events the chain passes and the usage at on_end."""

    name = "spy"
    log: ClassVar[SpyLog]

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        self.log.payloads.append(event.data if event.is_done else event.json())
        return None

    async def on_end(self, ctx: RequestContext) -> None:
        self.log.usage = Usage(
            ctx.usage.prompt_tokens,
            ctx.usage.completion_tokens,
            ctx.usage.total_tokens,
            ctx.usage.source,
        )
        self.log.outcome = ctx.outcome
        self.log.ended.set()


def _make_spy() -> tuple[type[Spy], SpyLog]:
    record = SpyLog()

    class BoundSpy(Spy):
        log = record

    return BoundSpy, record


# ----- streaming ---------------------------------------------------------------------------------


async def test_stream_text_tool_call_and_usage_reach_the_openai_sdk(fake: FakeUpstream) -> None:
    fake.queue(Script(rechunk(b"".join(_tool_transcript()), [7, 1, 13, 2])))
    async with run_gateway(_config(fake)) as gw, openai_sdk(gw) as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice="required",
            stop=["END"],
            temperature=0.2,
            stream=True,
            stream_options={"include_usage": True},
        )
        got = await read_sdk_stream(stream)

    assert got.text == "Let me check the weather in Paris \u2600\ufe0f."
    assert list(got.tools) == [0]
    call = got.tools[0]
    assert call.id == "toolu_01XYZ"
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris", "unit": "celsius"}
    assert got.finish == ["tool_calls"]
    assert {chunk.model for chunk in got.chunks} == {"m"}
    # The usage chunk comes last, with no choices; every other chunk says usage: null.
    last = got.chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (35, 89)
    assert last.usage.total_tokens == 124
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens == 10
    assert all(chunk.usage is None for chunk in got.chunks[:-1])

    (exchange,) = fake.exchanges
    assert exchange.path == "/v1/messages"
    assert _headers_named(exchange.headers, "x-api-key") == [KEY]
    assert _headers_named(exchange.headers, "anthropic-version") == ["2023-06-01"]
    assert _headers_named(exchange.headers, "authorization") == []
    assert "client-key-not-for-upstream" not in str(exchange.headers)
    assert exchange.body == {
        "model": "claude-test",
        "max_tokens": 1000,  # the upstream's default_max_tokens: the client sent none
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
        "tools": [
            {
                "name": "get_weather",
                "description": "Current weather for a city.",
                "input_schema": WEATHER_SCHEMA,
            }
        ],
        "tool_choice": {"type": "any"},
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "stream": True,
    }


async def test_stream_without_include_usage_has_no_usage_chunk(fake: FakeUpstream) -> None:
    fake.queue(Script(_text_transcript(["Bon", "jour"], output_tokens=2)))
    async with run_gateway(_config(fake)) as gw, openai_sdk(gw) as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        got = await read_sdk_stream(stream)
    assert got.texts == ["Bon", "jour"]
    assert got.finish == ["stop"]
    assert got.usages == []
    assert all(chunk.choices for chunk in got.chunks)


async def test_plugin_sees_openai_chunks_and_usage_from_the_anthropic_upstream(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """The chain speaks OpenAI on every route; usage is the upstream's even if not asked for."""
    fake.queue(Script(_tool_transcript(cache_read=0)))
    spy, log = _make_spy()
    config = _config(fake, plugins=[{"name": "spy"}])
    async with (
        run_gateway(config, registry={"spy": spy}) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body(tools=TOOLS)) as resp,
    ):
        raw = await resp.read()
        await log.ended.wait()
    assert resp.status == 200
    assert split_events(raw)[-1] == DONE
    assert log.payloads, "the plugin saw no event"
    for payload in log.payloads:
        assert isinstance(payload, dict)
        assert payload["object"] == "chat.completion.chunk"
        assert isinstance(payload["choices"], list)
        assert len(payload["choices"]) == 1, "no usage-only chunk: the client did not ask"
    deltas = [payload["choices"][0]["delta"] for payload in log.payloads]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in deltas) == "".join(TEXT)
    assert chat_contents(raw) == TEXT
    names = [c["function"]["name"] for d in deltas for c in d.get("tool_calls", []) if "id" in c]
    assert names == ["get_weather"]
    finishes = [payload["choices"][0]["finish_reason"] for payload in log.payloads]
    assert [f for f in finishes if f] == ["tool_calls"]
    assert log.outcome is Outcome.COMPLETED
    assert log.usage == Usage(25, 89, 114, "upstream")


# ----- non-streaming -----------------------------------------------------------------------------


async def test_non_streaming_message_becomes_a_chat_completion(fake: FakeUpstream) -> None:
    content: list[dict[str, Any]] = [
        {"type": "text", "text": "Hi there, caf\u00e9."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
    ]
    fake.queue(json_script(anthropic_message(content, stop_reason="tool_use")))
    async with run_gateway(_config(fake)) as gw, openai_sdk(gw) as client:
        answer = await client.chat.completions.create(
            model="m", messages=MESSAGES, max_completion_tokens=77, stop="END"
        )
    assert answer.object == "chat.completion"
    assert answer.model == "m"
    choice = answer.choices[0]
    assert choice.message.content == "Hi there, caf\u00e9."
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None
    assert len(calls) == 1
    assert calls[0].id == "toolu_1"
    assert calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (12, 7)
    assert answer.usage.total_tokens == 19
    (exchange,) = fake.exchanges
    assert exchange.path == "/v1/messages"
    assert exchange.body == {
        "model": "claude-test",
        "max_tokens": 77,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
        "stop_sequences": ["END"],
    }


# ----- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "path"),
    [
        ("", "/v1/messages"),
        ("/", "/v1/messages"),
        ("/v1", "/v1/messages"),
        ("/v1/", "/v1/messages"),
        ("/proxy/anthropic", "/proxy/anthropic/v1/messages"),
        ("/proxy/anthropic/v1", "/proxy/anthropic/v1/messages"),
    ],
)
async def test_base_url_with_or_without_v1(fake: FakeUpstream, suffix: str, path: str) -> None:
    fake.queue(json_script(anthropic_message([{"type": "text", "text": "ok"}])))
    config = _config(fake, base_url=root_url(fake) + suffix)
    async with run_gateway(config) as gw, openai_sdk(gw) as client:
        answer = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert answer.choices[0].message.content == "ok"
    (exchange,) = fake.exchanges
    assert exchange.path == path


async def test_error_event_mid_stream_raises_in_the_sdk(fake: FakeUpstream) -> None:
    transcript = [
        anthropic_message_start(),
        *anthropic_text_block(0, ["Partial", " answer"])[:-1],  # no content_block_stop
        anthropic_error_event("overloaded_error", "Overloaded"),
    ]
    fake.queue(Script(rechunk(b"".join(transcript), [11, 3])))
    async with run_gateway(_config(fake)) as gw, openai_sdk(gw) as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        got = SDKStream()
        with pytest.raises(openai.APIError, match="Overloaded") as caught:
            await read_sdk_stream(stream, got)
    assert got.texts == ["Partial", " answer"], "events before the error are delivered"
    assert got.finish == []
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "upstream_overloaded"


@pytest.mark.parametrize(
    ("tail", "code"),
    [
        ([anthropic_error_event("overloaded_error", "Overloaded")], "upstream_overloaded"),
        ([], "upstream_truncated"),  # the upstream closed before message_stop
    ],
)
async def test_stream_failure_after_headers_is_one_final_error_event(
    fake: FakeUpstream, http: aiohttp.ClientSession, tail: list[bytes], code: str
) -> None:
    transcript = [anthropic_message_start(), *anthropic_text_block(0, ["Hel", "lo"]), *tail]
    fake.queue(Script(transcript))
    spy, log = _make_spy()
    async with (
        run_gateway(_config(fake, plugins=[{"name": "spy"}]), registry={"spy": spy}) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body()) as resp,
    ):
        raw = await resp.read()
        await log.ended.wait()
    assert resp.status == 200
    error = final_error(raw)
    assert error["code"] == code
    assert error["type"] == "upstream_error"
    assert chat_contents(b"".join(split_events(raw)[:-1])) == ["Hel", "lo"]
    assert log.outcome is Outcome.UPSTREAM_ERROR


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [("overloaded_error", 502, "upstream_overloaded"), ("invalid_request_error", 400, None)],
)
async def test_error_event_before_any_content_is_a_real_http_error(
    fake: FakeUpstream, http: aiohttp.ClientSession, kind: str, status: int, code: str | None
) -> None:
    """A 200 whose first event is `event: error` becomes an HTTP error (headers were held)."""
    fake.queue(Script([anthropic_error_event(kind, "Try again later.")]))
    async with (
        run_gateway(_config(fake)) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body()) as resp,
    ):
        raw = await resp.read()
    assert resp.status == status
    error = json_error(raw)
    assert error["message"] == "Try again later."
    assert error["code"] == (code or kind)


@pytest.mark.parametrize("stream", [True, False])
async def test_anthropic_400_before_the_stream_is_a_400_with_its_message(
    fake: FakeUpstream, stream: bool
) -> None:
    message = "max_tokens: 100000 > 64000, which is the maximum allowed for claude-test"
    fake.queue(json_script(anthropic_error_body("invalid_request_error", message), status=400))
    async with run_gateway(_config(fake)) as gw, openai_sdk(gw) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="m", messages=MESSAGES, max_tokens=100000, stream=stream
            )
    assert caught.value.status_code == 400
    assert message in caught.value.message
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "invalid_request_error"
    (exchange,) = fake.exchanges
    assert exchange.body["max_tokens"] == 100000


@pytest.mark.parametrize(
    ("status", "kind", "message", "expected", "leaks"),
    [
        (529, "overloaded_error", "Overloaded", openai.InternalServerError, False),
        (401, "authentication_error", "invalid x-api-key", openai.InternalServerError, True),
        (
            429,
            "rate_limit_error",
            "Number of request tokens exceeded",
            openai.RateLimitError,
            False,
        ),
    ],
)
async def test_anthropic_status_errors_map_to_the_gateway_contract(
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    status: int,
    kind: str,
    message: str,
    expected: type[openai.APIStatusError],
    leaks: bool,
) -> None:
    """529 (Anthropic's overloaded) and credential failures are 502s; a 429 stays a 429."""
    fake.queue(json_script(anthropic_error_body(kind, message), status=status))
    async with run_gateway(_config(fake)) as gw:
        async with openai_sdk(gw) as client:
            with pytest.raises(expected) as caught:
                await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        assert caught.value.status_code == (status if status == 429 else 502)
        body = caught.value.body
        assert isinstance(body, dict)
        if status == 429:
            assert body["type"] == "rate_limit_error"
        else:
            assert body["type"] == "upstream_error"
        assert (message in caught.value.message) is not leaks


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (COMPLETIONS, {"model": "m", "prompt": "Once"}),
        (EMBEDDINGS, {"model": "m", "input": "hello"}),
    ],
)
async def test_endpoints_anthropic_cannot_serve_are_400_unsupported_endpoint(
    fake: FakeUpstream, http: aiohttp.ClientSession, path: str, body: dict[str, Any]
) -> None:
    async with (
        run_gateway(_config(fake)) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + path, json=body) as resp,
    ):
        raw = await resp.read()
    assert resp.status == 400
    assert json_error(raw)["code"] == "unsupported_endpoint"
    assert fake.exchanges == []


async def test_what_anthropic_cannot_do_is_a_400_before_anything_is_sent(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    spy, log = _make_spy()
    async with (
        run_gateway(_config(fake, plugins=[{"name": "spy"}]), registry={"spy": spy}) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body(n=2)) as resp,
    ):
        raw = await resp.read()
        await log.ended.wait()
    assert resp.status == 400
    assert json_error(raw)["param"] == "n"
    assert fake.exchanges == []
    # Nothing reached the upstream: the request was refused, not failed by the upstream.
    assert log.outcome is Outcome.REJECTED


async def test_client_anthropic_headers_cannot_override_the_configured_ones(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script(_text_transcript(["ok"], output_tokens=1)))
    headers = {
        "Anthropic-Version": "1999-01-01",
        "X-Api-Key": "client-anthropic-key",
        "Authorization": "Bearer client-token-0123456789",
        "Anthropic-Beta": "tools-2024-04-04",
    }
    async with (
        run_gateway(_config(fake)) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body(), headers=headers) as resp,
    ):
        raw = await resp.read()
    assert resp.status == 200
    assert chat_contents(raw) == ["ok"]
    (exchange,) = fake.exchanges
    assert _headers_named(exchange.headers, "anthropic-version") == ["2023-06-01"]
    assert _headers_named(exchange.headers, "x-api-key") == [KEY]
    assert _headers_named(exchange.headers, "authorization") == []
    assert _headers_named(exchange.headers, "anthropic-beta") == ["tools-2024-04-04"]


# ----- usage of streams cut short, and Anthropic clients on an Anthropic upstream -----------------


def _counted(fake: FakeUpstream, cache_dir: Path) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """token_count (the character heuristic for claude-test), then a probe."""
    probe, log = make_probe()
    options = {"cache_dir": str(cache_dir), "default_encoding": None}
    config = _config(fake, plugins=[{"name": "token_count", "options": options}, {"name": "probe"}])
    return config, {"token_count": TokenCounter, "probe": probe}, log


@pytest.mark.parametrize(
    "tail",
    [[anthropic_error_event("overloaded_error", "Overloaded")], [], "disconnect"],
    ids=["error-event", "truncated", "client-disconnect"],
)
async def test_a_cut_stream_records_the_local_partial_count_not_message_starts_usage(
    fake: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path, tail: list[bytes] | str
) -> None:
    """message_start's usage (output_tokens 1) is preliminary: a stream cut before
    message_delta is counted locally, as on OpenAI upstreams."""
    texts = ["Hello there, ", "general Kenobi"]
    head = [anthropic_message_start(input_tokens=25), *anthropic_text_block(0, texts)]
    if tail == "disconnect":
        fake.queue(Script(head, then="hang"))
    else:
        fake.queue(Script([*head, *tail]))
    config, registry, log = _counted(fake, tmp_path)
    async with run_gateway(config, registry=registry) as gw, asyncio.timeout(BOUND):
        resp = await http.post(gw.v1 + CHAT, json=chat_body())
        assert resp.status == 200
        if tail == "disconnect":
            await resp.content.readuntil(b"Kenobi")  # both texts passed the chain
            resp.close()
            (exchange,) = await fake.wait_for_requests(1)
            await exchange.finished.wait()
        else:
            assert final_error(await resp.read())["type"] == "upstream_error"
        (ctx,) = await log.wait_ends(1)
    tokens = ctx.require(TOKENS)
    expected = Outcome.CLIENT_DISCONNECTED if tail == "disconnect" else Outcome.UPSTREAM_ERROR
    assert ctx.outcome is expected
    assert ctx.usage.source == "local_partial"
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (
        tokens.prompt_tokens,
        tokens.completion_tokens,
    )
    assert tokens.prompt_tokens != 25, "not message_start's input_tokens"
    assert tokens.completion_tokens > 1, "not message_start's output_tokens"


async def test_a_stream_cut_after_message_delta_keeps_the_upstreams_final_usage(
    fake: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """message_delta's usage is the final count: it stays the truth if message_stop is lost."""
    transcript = _text_transcript(["Bon", "jour"], output_tokens=7)[:-1]  # no message_stop
    fake.queue(Script(transcript))
    config, registry, log = _counted(fake, tmp_path)
    async with run_gateway(config, registry=registry) as gw, asyncio.timeout(BOUND):
        async with http.post(gw.v1 + CHAT, json=chat_body()) as resp:
            assert final_error(await resp.read())["code"] == "upstream_truncated"
        (ctx,) = await log.wait_ends(1)
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (25, 7)
    assert ctx.usage.source == "upstream"


async def test_anthropic_client_on_an_anthropic_upstream_gets_its_id_and_usage(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """The native lane: the upstream's events reach the client as they were sent."""
    transcript = [
        anthropic_message_start(msg_id="msg_01Abc", input_tokens=25, cache_read=10, cache_write=5),
        *anthropic_text_block(0, TEXT, ping=True),
        *anthropic_message_end("end_turn", 42),
    ]
    fake.queue(Script(rechunk(b"".join(transcript), [9, 2, 31])), Script(transcript))
    body = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    async with run_gateway(_config(fake)) as gw:
        async with (
            asyncio.timeout(BOUND),
            http.post(gw.url + "/v1/messages", json={**body, "stream": True}) as resp,
        ):
            raw = await resp.read()
        client = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        try:
            async with client.messages.stream(
                model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                message = await stream.get_final_message()
        finally:
            await client.close()

    assert raw == b"".join(transcript)
    name, start = named_events(raw)[0]
    assert name == "message_start"
    assert start["message"]["id"] == "msg_01Abc"
    assert message.id == "msg_01Abc"
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens) == (25, 42)
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (10, 5)


async def test_anthropic_client_non_streaming_on_an_anthropic_upstream_keeps_the_id(
    fake: FakeUpstream,
) -> None:
    content: list[dict[str, Any]] = [{"type": "text", "text": "Hi."}]
    fake.queue(json_script(anthropic_message(content)))
    async with run_gateway(_config(fake)) as gw:
        client = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        try:
            message = await client.messages.create(
                model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
            )
        finally:
            await client.close()
    assert message.id == "msg_01Unary"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 7)
