"""The official SDKs see the same answer from the replay cache as from the upstream, on
every lane: OpenAI chat (streamed and not), Anthropic native and translated, Responses.

Each test asks twice; the upstream (a fake that counts requests) sees one request, and
what the SDK parsed from the cached answer equals what it parsed the first time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import openai
import pytest

from gateway.testing.fake_upstream import (
    FakeUpstream,
    Script,
    json_script,
    openai_completion,
    openai_stream,
)
from gateway.testing.harness import RunningGateway, run_gateway
from tests.integration._support import BOUND, config_for
from tests.integration.provider_fakes import (
    anthropic_message,
    anthropic_message_end,
    anthropic_message_start,
    anthropic_text_block,
    root_url,
)

TOKENS = ["Hel", "lo ", "w\u00f6rld \U0001f30d"]
USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello"}
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


def _replaying(fake: FakeUpstream) -> dict[str, Any]:
    return config_for(fake, route={"replay": True})


@asynccontextmanager
async def _openai(gw: RunningGateway) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="x", max_retries=0, timeout=BOUND)
    try:
        yield client
    finally:
        await client.close()


@asynccontextmanager
async def _anthropic(gw: RunningGateway) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0, timeout=BOUND)
    try:
        yield client
    finally:
        await client.close()


async def test_openai_sdk_streaming(fake: FakeUpstream) -> None:
    fake.queue(Script(openai_stream(TOKENS, usage=USAGE)))
    seen: list[tuple[list[str], Any, str, str]] = []
    async with run_gateway(_replaying(fake)) as gw, _openai(gw) as client:
        for _ in range(2):
            response = await client.chat.completions.with_raw_response.create(
                model="m",
                messages=MESSAGES,
                stream=True,
                temperature=0,
                stream_options={"include_usage": True},
            )
            text, usage, ids = [], None, set()
            async for chunk in response.parse():
                ids.add(chunk.id)
                text += [c.delta.content for c in chunk.choices if c.delta.content]
                usage = chunk.usage or usage
            (chunk_id,) = ids
            seen.append((text, usage, chunk_id, response.headers["X-Sluice-Cache"]))
    (text1, usage1, id1, how1), (text2, usage2, id2, how2) = seen
    assert (how1, how2) == ("miss", "hit")
    assert text1 == text2 == TOKENS
    assert usage1 == usage2
    assert usage2 is not None
    assert usage2.total_tokens == 14
    assert id1 == id2
    assert len(fake.exchanges) == 1


async def test_openai_sdk_unary(fake: FakeUpstream) -> None:
    fake.queue(json_script(openai_completion("Hi there")))
    async with run_gateway(_replaying(fake)) as gw, _openai(gw) as client:
        first = await client.chat.completions.create(model="m", messages=MESSAGES, seed=7)
        second = await client.chat.completions.create(model="m", messages=MESSAGES, seed=7)
    assert second.model_extra == {"x_sluice": {"usage_source": "cache"}}
    assert second.model_dump(exclude={"x_sluice"}) == first.model_dump()
    assert len(fake.exchanges) == 1


def _anthropic_stream() -> Script:
    return Script(
        [
            anthropic_message_start(input_tokens=9),
            *anthropic_text_block(0, TOKENS, ping=True),
            *anthropic_message_end("end_turn", 3),
        ]
    )


async def _messages_twice(gw: RunningGateway) -> list[anthropic.types.Message]:
    finals: list[anthropic.types.Message] = []
    async with _anthropic(gw) as client:
        for _ in range(2):
            async with client.messages.stream(
                model="m",
                max_tokens=64,
                messages=[{"role": "user", "content": "Say hello"}],
                extra_body={"temperature": 0},  # this SDK's stream() has no parameter for it
            ) as stream:
                finals.append(await stream.get_final_message())
    return finals


async def test_anthropic_sdk_on_the_native_lane(fake: FakeUpstream) -> None:
    fake.queue(
        _anthropic_stream(), json_script(anthropic_message([{"type": "text", "text": "Hi"}]))
    )
    config = {
        "upstreams": {"claude": {"kind": "anthropic", "base_url": root_url(fake), "api_key": "k"}},
        "routes": [{"model": "m", "upstream": "claude", "retries": 0, "replay": True}],
    }
    async with run_gateway(config) as gw:
        first, second = await _messages_twice(gw)
        async with _anthropic(gw) as client:
            unary = [
                await client.messages.create(
                    model="m",
                    max_tokens=64,
                    messages=[{"role": "user", "content": "Hi?"}],
                    extra_body={"temperature": 0},
                )
                for _ in range(2)
            ]
    assert second.model_dump() == first.model_dump()
    assert second.content[0].type == "text"
    assert second.content[0].text == "".join(TOKENS)
    assert unary[1].model_dump(exclude={"x_sluice"}) == unary[0].model_dump()
    assert len(fake.exchanges) == 2


async def test_anthropic_sdk_on_the_translated_lane(fake: FakeUpstream) -> None:
    fake.queue(Script(openai_stream(TOKENS, usage=USAGE)))
    async with run_gateway(config_for(fake, route={"replay": True}, include_usage=True)) as gw:
        first, second = await _messages_twice(gw)
    assert second.model_dump() == first.model_dump()
    assert second.usage.output_tokens == 3
    assert len(fake.exchanges) == 1


async def test_openai_sdk_on_the_responses_lane(fake: FakeUpstream) -> None:
    fake.queue(Script(openai_stream(TOKENS, usage=USAGE)), json_script(openai_completion("Hi")))
    async with run_gateway(_replaying(fake)) as gw, _openai(gw) as client:
        streamed = []
        for _ in range(2):
            stream = await client.responses.create(
                model="m", input="Say hello", temperature=0, stream=True
            )
            events = [event async for event in stream]
            streamed.append(events)
        unary = [
            await client.responses.create(model="m", input="Hi?", temperature=0) for _ in range(2)
        ]
    first, second = (events[-1] for events in streamed)
    assert first.type == second.type == "response.completed"
    assert second.response.model_dump() == first.response.model_dump()
    assert second.response.output_text == "".join(TOKENS)
    assert [e.type for e in streamed[1]] == [e.type for e in streamed[0]]
    assert unary[1].model_dump(exclude={"x_sluice"}) == unary[0].model_dump()
    assert len(fake.exchanges) == 2
