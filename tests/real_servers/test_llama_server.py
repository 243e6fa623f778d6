"""`sluice serve` in front of a real llama-cpp-python server, driven by the openai SDK.

Opt-in (`llama` marker, SLUICE_LLAMA=1): one command builds, caches and installs what it
needs and runs it, `tools/llama-tests.sh`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.context import upstream_request_id
from tests.integration._process import GatewayProcess, gateway_process
from tests.real_servers.llama_server import LlamaServer, llama_server

pytestmark = pytest.mark.llama

BOUND = 120.0  # one small generation on a busy 2-core CPU
MODEL = "smol"
Messages = list[openai.types.chat.ChatCompletionMessageParam]
PROMPT: Messages = [{"role": "user", "content": "Name three colours."}]
STORY: Messages = [{"role": "user", "content": "Write a very long story about a dragon."}]
TOO_LONG: Messages = [{"role": "user", "content": "colour " * 2000}]


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """One llama-cpp-python server for the whole layer (loading the model takes a while)."""
    with llama_server(tmp_path_factory.mktemp("llama")) as server:
        yield server


@pytest.fixture
async def gateway(llama: LlamaServer, tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    """`sluice serve` with a config as the README writes it for a llama.cpp server."""
    config = {
        "upstreams": {"llama": {"kind": "openai", "base_url": llama.base_url}},
        "routes": [{"model": MODEL, "upstream": "llama"}],
        "plugins": [{"name": "access_log"}],
    }
    async with gateway_process(config, tmp_path) as gw:
        yield gw


@pytest.fixture
async def client(gateway: GatewayProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official SDK pointed at the gateway, with no retries of its own."""
    sdk = openai.AsyncOpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=BOUND)
    async with sdk:
        yield sdk


def _access_lines(gw: GatewayProcess) -> list[dict[str, Any]]:
    lines = []
    for line in gw.log_text().splitlines():
        if line.startswith("{"):
            parsed = json.loads(line)
            if parsed.get("event") == "request":
                lines.append(parsed)
    return lines


async def _wait_for(what: str, found: Any, within: float = BOUND) -> None:
    """Poll a log for an external process's reaction (no other signal exists)."""
    deadline = time.monotonic() + within
    while not found():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_streaming_arrives_in_chunks_and_ends(
    client: openai.AsyncOpenAI, gateway: GatewayProcess
) -> None:
    async with asyncio.timeout(BOUND):
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=PROMPT, stream=True, max_tokens=24, temperature=0
        )
        request_id = raw.headers["x-request-id"]
        pieces: list[str] = []
        finish = None
        async for chunk in raw.parse():
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
    assert re.fullmatch(r"req_[0-9a-f]{32}", request_id)
    assert len(pieces) >= 3, pieces
    assert "".join(pieces).strip()
    assert finish in ("stop", "length")
    (line,) = _access_lines(gateway)
    assert (line["status"], line["outcome"]) == (200, "completed")
    assert line["upstream_request_id"] == upstream_request_id(request_id)


async def test_the_raw_stream_is_well_formed_sse_ending_with_done(
    gateway: GatewayProcess,
) -> None:
    body = {"model": MODEL, "messages": PROMPT, "stream": True, "max_tokens": 16}
    async with (
        aiohttp.ClientSession() as http,
        asyncio.timeout(BOUND),
        http.post(gateway.v1 + "/chat/completions", json=body) as resp,
    ):
        raw = await resp.read()
    assert resp.status == 200, raw
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    assert events[-2] == b"data: [DONE]"
    for event in events[:-2]:
        assert event.startswith(b"data: {"), event
        assert json.loads(event.removeprefix(b"data: "))["object"] == "chat.completion.chunk"


async def test_non_streaming(client: openai.AsyncOpenAI) -> None:
    async with asyncio.timeout(BOUND):
        completion = await client.chat.completions.create(
            model=MODEL, messages=PROMPT, max_tokens=24, temperature=0
        )
    (choice,) = completion.choices
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_include_usage_is_accepted(
    client: openai.AsyncOpenAI, gateway: GatewayProcess
) -> None:
    """llama-cpp-python ignores `stream_options.include_usage` (it sends no usage chunk);
    the stream must still succeed, and any usage the client gets must be plausible."""
    async with asyncio.timeout(BOUND):
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=PROMPT,
            stream=True,
            max_tokens=16,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content
    usages = [c.usage for c in chunks if c.usage is not None]
    for usage in usages:
        assert usage.prompt_tokens > 0
        assert 0 < usage.completion_tokens <= 16
    (line,) = _access_lines(gateway)
    assert line["outcome"] == "completed"


async def test_client_disconnect_mid_stream_stops_the_generation(
    client: openai.AsyncOpenAI, gateway: GatewayProcess, llama: LlamaServer
) -> None:
    before = llama.log_text().count("Disconnected from client")
    async with asyncio.timeout(BOUND):
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=STORY,
            stream=True,
            max_tokens=400,
        )
        received = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
                if received == 3:
                    break
        await stream.close()
    await _wait_for(
        "the gateway's access log line",
        lambda: [line["outcome"] for line in _access_lines(gateway)] == ["client_disconnected"],
    )
    await _wait_for(
        "llama-cpp-python to notice the disconnect",
        lambda: llama.log_text().count("Disconnected from client") > before,
    )
    (line,) = _access_lines(gateway)
    assert line["completion_tokens"] is None or line["completion_tokens"] < 400
    # The server is free again: the next request is answered.
    async with asyncio.timeout(BOUND):
        completion = await client.chat.completions.create(
            model=MODEL, messages=PROMPT, max_tokens=8
        )
    assert completion.choices[0].message.content


async def test_a_prompt_longer_than_the_context_is_the_servers_400(
    client: openai.AsyncOpenAI,
) -> None:
    async with asyncio.timeout(BOUND):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=TOO_LONG, max_tokens=8)
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 512 tokens" in caught.value.message


async def test_a_stream_the_server_ends_without_an_event_is_a_clean_502(
    client: openai.AsyncOpenAI,
) -> None:
    """Streaming, llama-cpp-python checks the context only after its 200 and then closes
    the body empty: the client gets a JSON upstream error, not a hang or a torn stream."""
    async with asyncio.timeout(BOUND):
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(
                model=MODEL, messages=TOO_LONG, stream=True, max_tokens=8
            )
    assert caught.value.status_code == 502
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "upstream_error"
