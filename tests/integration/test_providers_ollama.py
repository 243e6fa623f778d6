"""Upstream kind `ollama`: OpenAI clients in front of Ollama's native NDJSON API, over loopback.

The fake answers `/api/chat` and `/api/generate` with byte-exact NDJSON (lines cut anywhere,
including inside UTF-8 sequences); the tests check the native request body it received and
what the official OpenAI SDK makes of the re-emitted OpenAI SSE.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolUnionParam
from openai.types.shared_params import FunctionDefinition

from gateway.context import Outcome
from gateway.testing.fake_upstream import FakeUpstream, json_script, rechunk
from gateway.testing.harness import run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
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
    OLLAMA_MODEL,
    SDKStream,
    cut_at,
    inside,
    ndjson_script,
    ollama_chat_part,
    ollama_done,
    ollama_generate_part,
    ollama_line,
    openai_sdk,
    read_sdk_stream,
    root_url,
)

OPERATOR_OPTIONS: dict[str, Any] = {"num_ctx": 8192, "temperature": 0.8}
WEATHER_FUNCTION: FunctionDefinition = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
}
TOOLS: list[ChatCompletionToolUnionParam] = [{"type": "function", "function": WEATHER_FUNCTION}]
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What's the weather in Paris?"},
]
TOKENS = ["Il fait ", "18 \u00b0C \u00e0 Paris ", "\U0001f324\ufe0f."]
OLLAMA_ERROR = (
    "model runner has unexpectedly stopped, this may be due to resource limitations or an "
    "internal error, check ollama server logs for details"
)


def _config(fake: FakeUpstream, plugins: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "upstreams": {
            "local": {"kind": "ollama", "base_url": root_url(fake), "options": OPERATOR_OPTIONS}
        },
        "routes": [
            # One attempt: these tests look at a single exchange with the fake.
            {"model": "m", "upstream": "local", "upstream_model": OLLAMA_MODEL, "retries": 0}
        ],
        "plugins": plugins or [],
    }


def _text_lines(tokens: list[str], *, prompt: int = 26) -> bytes:
    parts = [ollama_line(ollama_chat_part(token)) for token in tokens]
    return b"".join([*parts, ollama_line(ollama_done(prompt=prompt, completion=len(tokens)))])


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with asyncio.timeout(BOUND), http.post(url, json=body) as resp:
        return resp.status, await resp.read()


# ----- /api/chat streaming ------------------------------------------------------------------------


async def test_chat_stream_text_tool_call_and_usage_reach_the_openai_sdk(
    fake: FakeUpstream,
) -> None:
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
    data = b"".join(
        [
            *[ollama_line(ollama_chat_part(token)) for token in TOKENS],
            ollama_line(ollama_chat_part("", tool_calls=[call])),
            ollama_line(ollama_done(prompt=26, completion=12)),
        ]
    )
    # Cut inside two-byte (°, à) and four-byte (🌤) UTF-8 sequences, inside a JSON key, and
    # right before and after a line's newline.
    first_newline = data.index(b"\n")
    cuts = sorted(
        {
            inside(data, "\u00b0", 1),
            inside(data, "\u00e0", 1),
            inside(data, "\U0001f324", 2),
            inside(data, "\U0001f324", 3),
            inside(data, '"tool_calls"', 5),
            first_newline,
            first_newline + 1,
        }
    )
    fake.queue(ndjson_script(cut_at(data, *cuts)))
    async with run_gateway(_config(fake)) as gw, openai_sdk(gw) as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            tools=TOOLS,
            temperature=0.3,
            top_p=0.9,
            seed=7,
            max_tokens=64,
            stop=["\n\n"],
            stream=True,
            stream_options={"include_usage": True},
            # A client may tune sampling options but never size the model in memory.
            extra_body={"options": {"num_ctx": 1, "top_k": 20}, "num_gpu": 99},
        )
        got = await read_sdk_stream(stream)

    assert got.text == "".join(TOKENS)
    assert list(got.tools) == [0]
    tool = got.tools[0]
    assert tool.name == "get_weather"
    assert tool.id
    assert json.loads(tool.arguments) == {"city": "Paris", "unit": "celsius"}
    assert got.finish == ["tool_calls"]
    assert {chunk.model for chunk in got.chunks} == {"m"}
    last = got.chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (26, 12)
    assert last.usage.total_tokens == 38
    assert all(chunk.usage is None for chunk in got.chunks[:-1])

    (exchange,) = fake.exchanges
    assert exchange.path == "/api/chat"
    assert "authorization" not in {name.lower() for name in exchange.headers}
    assert exchange.body == {
        "model": OLLAMA_MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What's the weather in Paris?"},
        ],
        "stream": True,
        "tools": [{"type": "function", "function": WEATHER_FUNCTION}],
        "options": {
            "num_ctx": 8192,  # the operator's, not the client's
            "temperature": 0.3,  # the client's wins over the operator's default
            "top_p": 0.9,
            "seed": 7,
            "num_predict": 64,
            "stop": ["\n\n"],
            "top_k": 20,
        },
    }


async def test_chat_stream_without_include_usage_has_no_usage_chunk(fake: FakeUpstream) -> None:
    fake.queue(ndjson_script(rechunk(_text_lines(["Bon", "jour"]), [3, 1, 7])))
    async with run_gateway(_config(fake)) as gw, openai_sdk(gw) as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        got = await read_sdk_stream(stream)
    assert got.texts == ["Bon", "jour"]
    assert got.finish == ["stop"]
    assert got.usages == []
    (exchange,) = fake.exchanges
    assert exchange.body["options"] == OPERATOR_OPTIONS


async def test_last_line_without_newline_still_completes_the_stream(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    data = _text_lines(["Hel", "lo"], prompt=9)
    assert data.endswith(b"\n")
    fake.queue(ndjson_script(rechunk(data[:-1], [5, 2])))
    probe, log = make_probe()
    config = _config(fake, plugins=[{"name": "probe"}])
    async with run_gateway(config, registry={"probe": probe}) as gw:
        status, raw = await _post(http, gw.v1 + CHAT, chat_body())
        (ctx,) = await log.wait_ends(1)
    assert status == 200
    events = split_events(raw)
    assert events[-1] == DONE
    assert chat_contents(raw) == ["Hel", "lo"]
    finishes = [event_choice["finish_reason"] for event_choice in _choices(events[:-1])]
    assert [f for f in finishes if f] == ["stop"]
    assert ctx.outcome is Outcome.COMPLETED
    # The usage of the unterminated last line is recorded, though the client did not ask.
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (9, 2)
    assert ctx.usage.total_tokens == 11
    assert ctx.usage.source == "upstream"


def _choices(events: list[bytes]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for event in events:
        payload = orjson.loads(event.removeprefix(b"data: "))
        out += payload["choices"]
    return out


async def test_error_line_mid_stream_is_one_final_error_event(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    data = b"".join(
        [
            ollama_line(ollama_chat_part("Par")),
            ollama_line(ollama_chat_part("tial")),
            ollama_line({"error": OLLAMA_ERROR}),
            ollama_line(ollama_chat_part("never sent")),
        ]
    )
    fake.queue(ndjson_script(rechunk(data, [13, 4])))
    probe, log = make_probe()
    async with run_gateway(_config(fake, [{"name": "probe"}]), registry={"probe": probe}) as gw:
        status, raw = await _post(http, gw.v1 + CHAT, chat_body())
        (ctx,) = await log.wait_ends(1)
    assert status == 200
    error = final_error(raw)
    assert error["message"] == OLLAMA_ERROR
    assert error["type"] == "upstream_error"
    assert chat_contents(b"".join(split_events(raw)[:-1])) == ["Par", "tial"]
    assert b"never sent" not in raw
    assert ctx.outcome is Outcome.UPSTREAM_ERROR


async def test_error_line_mid_stream_raises_in_the_sdk(fake: FakeUpstream) -> None:
    data = ollama_line(ollama_chat_part("Par")) + ollama_line({"error": OLLAMA_ERROR})
    fake.queue(ndjson_script([data]))
    async with run_gateway(_config(fake)) as gw, openai_sdk(gw) as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        got = SDKStream()
        with pytest.raises(openai.APIError, match="model runner has unexpectedly stopped"):
            await read_sdk_stream(stream, got)
    assert got.texts == ["Par"]


async def test_error_as_the_first_line_is_an_http_error(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(ndjson_script([ollama_line({"error": OLLAMA_ERROR})]))
    async with run_gateway(_config(fake)) as gw:
        status, raw = await _post(http, gw.v1 + CHAT, chat_body())
    assert status == 502
    assert json_error(raw)["message"] == OLLAMA_ERROR


@pytest.mark.parametrize("mid_line", [False, True])
async def test_stream_cut_before_the_done_line_is_truncated(
    fake: FakeUpstream, http: aiohttp.ClientSession, mid_line: bool
) -> None:
    """Closing without the `done` line is a truncation, wherever the cut falls."""
    data = _text_lines(["Hel", "lo"])
    done_starts = data.rindex(b"\n", 0, len(data) - 1) + 1
    cut = done_starts + 10 if mid_line else done_starts
    fake.queue(ndjson_script([data[:cut]]))
    async with run_gateway(_config(fake)) as gw:
        status, raw = await _post(http, gw.v1 + CHAT, chat_body())
    assert status == 200
    assert chat_contents(b"".join(split_events(raw)[:-1])) == ["Hel", "lo"]
    assert final_error(raw)["code"] == "upstream_truncated"


# ----- /api/generate, non-streaming, unsupported endpoints ----------------------------------------


async def test_completions_go_to_api_generate(fake: FakeUpstream) -> None:
    data = b"".join(
        [
            ollama_line(ollama_generate_part(" a")),
            ollama_line(ollama_generate_part(" t\u00eame")),
            ollama_line(ollama_done(chat=False, done_reason="length", prompt=4, completion=5)),
        ]
    )
    fake.queue(ndjson_script(cut_at(data, inside(data, "\u00ea", 1))))
    async with run_gateway(_config(fake)) as gw, openai_sdk(gw) as client:
        stream = await client.completions.create(
            model="m",
            prompt="Once upon",
            max_tokens=5,
            stop=".",
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    texts = [choice.text for chunk in chunks for choice in chunk.choices if choice.text]
    assert texts == [" a", " t\u00eame"]
    finishes = [choice.finish_reason for chunk in chunks for choice in chunk.choices]
    assert [f for f in finishes if f] == ["length"]
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (4, 5)
    (exchange,) = fake.exchanges
    assert exchange.path == "/api/generate"
    assert exchange.body == {
        "model": OLLAMA_MODEL,
        "prompt": "Once upon",
        "stream": True,
        "options": {"num_ctx": 8192, "temperature": 0.8, "num_predict": 5, "stop": ["."]},
    }


async def test_non_streaming_chat_becomes_a_chat_completion(fake: FakeUpstream) -> None:
    answer = {
        **ollama_done(prompt=9, completion=3),
        "message": {"role": "assistant", "content": "Bonjour \u00e0 vous !"},
    }
    fake.queue(json_script(answer))
    async with run_gateway(_config(fake)) as gw, openai_sdk(gw) as client:
        completion = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert completion.model == "m"
    assert completion.choices[0].message.content == "Bonjour \u00e0 vous !"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (9, 3)
    (exchange,) = fake.exchanges
    assert exchange.path == "/api/chat"
    assert exchange.body["stream"] is False


async def test_ollama_404_keeps_its_status_and_message(fake: FakeUpstream) -> None:
    message = f'model "{OLLAMA_MODEL}" not found, try pulling it first'
    fake.queue(json_script({"error": message}, status=404))
    async with run_gateway(_config(fake)) as gw, openai_sdk(gw) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert caught.value.status_code == 404
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url",
        ),
    ],
)
async def test_what_ollama_cannot_do_is_a_400_before_anything_is_sent(
    fake: FakeUpstream, http: aiohttp.ClientSession, extra: dict[str, Any], param: str
) -> None:
    probe, log = make_probe()
    async with run_gateway(_config(fake, [{"name": "probe"}]), registry={"probe": probe}) as gw:
        status, raw = await _post(http, gw.v1 + CHAT, chat_body(**extra))
        (ctx,) = await log.wait_ends(1)
    assert status == 400
    error = json_error(raw)
    assert error["code"] == "unsupported_parameter"
    assert error["param"] == param
    assert fake.exchanges == []
    assert ctx.status == 400


async def test_untranslatable_request_is_a_rejection_not_an_upstream_error(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """Access logs and metrics must not count a request nobody sent as an upstream failure."""
    probe, log = make_probe()
    async with run_gateway(_config(fake, [{"name": "probe"}]), registry={"probe": probe}) as gw:
        status, _ = await _post(http, gw.v1 + CHAT, chat_body(n=2))
        (ctx,) = await log.wait_ends(1)
    assert status == 400
    assert fake.exchanges == []
    assert ctx.outcome is Outcome.REJECTED


async def test_embeddings_on_an_ollama_route_are_unsupported(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with run_gateway(_config(fake)) as gw:
        status, raw = await _post(http, gw.v1 + EMBEDDINGS, {"model": "m", "input": "hello"})
    assert status == 400
    error = json_error(raw)
    assert error["code"] == "unsupported_endpoint"
    assert error["param"] == "model"
    assert fake.exchanges == []
