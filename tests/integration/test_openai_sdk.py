"""The official `openai` SDK, unmodified, talking to the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import openai
import pytest
from openai.types.chat import ChatCompletionChunk

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
from tests.integration._support import DONE, GatedUpstream, config_for, gated_script

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello"}
]


@pytest.fixture
def fake(gated: GatedUpstream) -> GatedUpstream:
    """Here the upstream can also hold chunks (GatedScript); plain Scripts play as usual."""
    return gated


@pytest.fixture
async def gw(fake: GatedUpstream) -> AsyncIterator[RunningGateway]:
    async with run_gateway(config_for(fake)) as running:
        yield running


@pytest.fixture
async def client(gw: RunningGateway) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="x", max_retries=0, timeout=10.0)
    try:
        yield sdk
    finally:
        await sdk.close()


async def _collect(
    stream: openai.AsyncStream[ChatCompletionChunk],
    into: list[str],
    on_token: Callable[[], None] | None = None,
) -> None:
    """Append every content token to `into` (so they survive an exception)."""
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                into.append(choice.delta.content)
                if on_token is not None:
                    on_token()


async def test_chat_stream_collects_tokens_exactly(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    tokens = ["Hel", "lo", ", ", "w\u00f6rld", " \U0001f30d", "!"]
    fake.queue(Script(rechunk(b"".join(openai_stream(tokens)), [9, 2])))
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    got: list[str] = []
    finish: list[str] = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                got.append(choice.delta.content)
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert got == tokens
    assert finish == ["stop"]
    (exchange,) = fake.exchanges
    assert exchange.body["model"] == "gpt-test"
    assert exchange.body["stream"] is True


async def test_chat_stream_with_usage(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
    fake.queue(Script(openai_stream(["a", "b"], usage=usage)))
    stream = await client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 13


async def test_chat_non_streaming_returns_the_message(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.queue(json_script(openai_completion("Hello, caf\u00e9!")))
    answer = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert answer.choices[0].message.content == "Hello, caf\u00e9!"
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage is not None
    assert answer.usage.total_tokens == 7


async def test_truncated_stream_raises_api_error(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.queue(Script(openai_stream(["part", "ial"], done=False)[:-1]))
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    got: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        await _collect(stream, got)
    assert got == ["part", "ial"], "events before the cut are delivered"
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "upstream_truncated"


async def test_mid_stream_upstream_error_raises_api_error(
    fake: GatedUpstream, client: openai.AsyncOpenAI
) -> None:
    """The error event is held until the SDK has yielded the first token."""
    good = openai_stream(["ok"], done=False)[:-1]
    bad = sse({"error": {"message": "Engine crashed.", "type": "server_error"}})
    script, (gate,) = gated_script([b"".join(good), bad, DONE], 1)
    fake.queue(script)
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    got: list[str] = []
    with pytest.raises(openai.APIError, match="Engine crashed"):
        await _collect(stream, got, on_token=gate.set)
    assert got == ["ok"]


async def test_upstream_400_raises_bad_request(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    message = "'messages' must contain the word 'json' to use response_format."
    fake.queue(
        json_script(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": None,
                }
            },
            status=400,
        )
    )
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert caught.value.status_code == 400
    assert message in caught.value.message


async def test_unknown_model_raises_not_found(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="nope", messages=MESSAGES)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "model_not_found"


async def test_upstream_refusing_credentials_raises_server_error(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.queue(json_script({"error": {"message": "Incorrect API key"}}, status=401))
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert "Incorrect API key" not in caught.value.message


async def test_completions_stream(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    texts = ["The", " quick", " fox"]
    chunks = [
        sse(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1700000000,
                "model": "gpt-test",
                "choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": None}],
            }
        )
        for t in texts
    ]
    fake.queue(Script([*chunks, DONE]))
    stream = await client.completions.create(model="m", prompt="Once", stream=True)
    got = [choice.text async for chunk in stream for choice in chunk.choices]
    assert got == texts
    (exchange,) = fake.exchanges
    assert exchange.path == "/v1/completions"
    assert exchange.body["prompt"] == "Once"


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [model.id for model in page.data] == ["m"]
