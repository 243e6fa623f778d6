"""The content filter in a real gateway over loopback, with a fake upstream and real clients."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from gateway.testing.fake_upstream import (
    FakeUpstream,
    Script,
    json_script,
    openai_completion,
    openai_stream,
    rechunk,
)
from gateway.testing.harness import run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
    DONE,
    GatedUpstream,
    chat_body,
    chat_contents,
    config_for,
    event_json,
    gated_script,
    json_error,
    split_events,
)

KEY = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"
EMAIL = "jane.doe@example.com"


def filter_config(upstream: FakeUpstream, **options: Any) -> dict[str, Any]:
    plugin = {"name": "content_filter", "fail": "closed", "options": options}
    return config_for(upstream, plugins=[plugin])


def ask(content: str, **extra: Any) -> dict[str, Any]:
    return chat_body(messages=[{"role": "user", "content": content}], **extra)


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with asyncio.timeout(BOUND), http.post(url + CHAT, json=body) as resp:
        return resp.status, await resp.read()


def finish_reasons(raw: bytes) -> list[str]:
    return [
        choice["finish_reason"]
        for event in split_events(raw)
        if event != DONE
        for choice in event_json(event)["choices"]
        if choice.get("finish_reason")
    ]


# ----- prompts ------------------------------------------------------------------------------------


async def test_prompt_reject_is_a_400_naming_the_rule(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config = filter_config(fake, rules=[{"name": "no-secrets", "detector": "api_key"}])
    async with run_gateway(config) as gw:
        status, raw = await post(http, gw.v1, ask(f"store {KEY} for me"))
    assert status == 400
    error = json_error(raw)
    assert error["code"] == "content_filter"
    assert error["type"] == "invalid_request_error"
    assert "'no-secrets'" in error["message"]
    assert KEY not in raw.decode()
    assert fake.exchanges == [], "nothing was sent upstream"


async def test_prompt_redact_forwards_the_redacted_body(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config = filter_config(fake, prompt_action="redact")
    async with run_gateway(config) as gw:
        status, raw = await post(http, gw.v1, ask(f"mail {EMAIL}, key {KEY}"))
    assert status == 200
    assert "".join(chat_contents(raw)) == "Hello world"
    (exchange,) = fake.exchanges
    assert exchange.body["messages"] == [
        {"role": "user", "content": "mail [REDACTED:email], key [REDACTED:api_key]"}
    ]
    assert exchange.body["model"] == "gpt-test"


# ----- streams ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[1 << 20], [7], [1, 5, 2]], ids=["whole", "7-bytes", "awkward"])
async def test_streamed_secret_is_redacted(
    fake: FakeUpstream, http: aiohttp.ClientSession, sizes: list[int]
) -> None:
    tokens = ["Your", " key:", " sk-proj-", "abcdefghij", "klmnopqrstuvwxyz", "0123456789", ". Bye"]
    fake.queue(Script(rechunk(b"".join(openai_stream(tokens)), sizes)))
    async with run_gateway(filter_config(fake, prompt_action="off")) as gw:
        status, raw = await post(http, gw.v1, ask("hi"))
    assert status == 200
    assert "".join(chat_contents(raw)) == "Your key: [REDACTED:api_key]. Bye"
    assert KEY[:12].encode() not in raw
    assert finish_reasons(raw) == ["stop"]
    assert split_events(raw)[-1] == DONE


@pytest.mark.parametrize("sizes", [[1 << 20], [7], [1, 5, 2]], ids=["whole", "7-bytes", "awkward"])
async def test_clean_events_pass_byte_for_byte_around_a_split_match(
    fake: FakeUpstream, http: aiohttp.ClientSession, sizes: list[int]
) -> None:
    """With the default detectors any word may start an address: events wait whole, and
    every one not touched by the match reaches the client as the upstream sent it."""
    tokens = ["Write", " to", " jane", ".doe", "@", "example", ".com", " or", " not", " now", "."]
    upstream = openai_stream(tokens)
    fake.queue(Script(rechunk(b"".join(upstream), sizes)))
    async with run_gateway(filter_config(fake)) as gw:
        status, raw = await post(http, gw.v1, ask("hi"))
    assert status == 200
    assert "".join(chat_contents(raw)) == "Write to [REDACTED:email] or not now."
    assert EMAIL.encode() not in raw
    received = split_events(raw)
    untouched = [upstream[i] for i in (0, 1, 2, 8, 9, 10, 11, 12, 13)]  # all but the address
    assert all(event in received for event in untouched), "sent as they came"
    assert finish_reasons(raw) == ["stop"]


async def _stop_stream(
    gated: GatedUpstream, http: aiohttp.ClientSession, upstream: Sequence[bytes], gate_at: int
) -> tuple[bytes, Any]:
    """Play `upstream` (held at chunk `gate_at` until the client has all before it), then hang."""
    script, gates = gated_script(upstream, gate_at, then="hang")
    gated.queue(script)
    config = filter_config(gated, completion_action="stop")
    async with run_gateway(config) as gw:
        async with asyncio.timeout(BOUND), http.post(gw.v1 + CHAT, json=ask("hi")) as resp:
            assert resp.status == 200
            got = b""
            while not (got.endswith(b"\n\n") and "".join(chat_contents(got)) == "Your key is "):
                got += await resp.content.readany()
            gates[0].set()  # the rest comes in a later read than the released text
            raw = got + await resp.content.read()
        (exchange,) = gated.exchanges
        async with asyncio.timeout(BOUND):
            await exchange.finished.wait()
    return raw, exchange


async def test_stop_ends_the_stream_with_content_filter_and_closes_the_upstream(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    tokens = ["Your", " key", " is ", "sk-proj-abcdefghij", "klmnopqrstuvwxyz0123", " ok", " more"]
    upstream = openai_stream(tokens, done=False)[:-1]  # never finishes on its own
    raw, exchange = await _stop_stream(gated, http, upstream, 4)
    assert "".join(chat_contents(raw)) == "Your key is "
    events = split_events(raw)
    assert events[-1] == DONE
    final = event_json(events[-2])
    assert final["choices"][0]["finish_reason"] == "content_filter"
    assert (final["id"], final["model"]) == ("chatcmpl-test", "gpt-test")
    assert finish_reasons(raw) == ["content_filter"]
    assert exchange.closed_by_peer, "the upstream connection must be closed"


async def test_stop_keeps_earlier_text_of_the_same_upstream_read(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    upstream = openai_stream(["Your key is ", "safe. ", KEY, " ok"], done=False)[:-1]
    gated.queue(Script([b"".join(upstream)], then="hang"))
    async with run_gateway(filter_config(gated, completion_action="stop")) as gw:
        status, raw = await post(http, gw.v1, ask("hi"))
    assert status == 200
    assert "".join(chat_contents(raw)) == "Your key is safe. "
    assert finish_reasons(raw) == ["content_filter"]


async def test_non_streaming_response_is_redacted(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(json_script(openai_completion(f"Write to {EMAIL}.")))
    async with run_gateway(filter_config(fake)) as gw:
        status, raw = await post(http, gw.v1, ask("hi", stream=False))
    assert status == 200
    body = orjson.loads(raw)
    assert body["choices"][0]["message"]["content"] == "Write to [REDACTED:email]."


# ----- the official SDK ---------------------------------------------------------------------------


async def _sdk_stream(url: str, gate: asyncio.Event | None = None) -> tuple[str, list[str]]:
    """Stream a chat through the SDK; `gate` is set once some text has arrived."""
    sdk = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=BOUND)
    try:
        stream = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text: list[str] = []
        finishes: list[str] = []
        async for part in stream:
            for choice in part.choices:
                if choice.delta.content:
                    text.append(choice.delta.content)
                    if gate is not None:
                        gate.set()
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
        return "".join(text), finishes
    finally:
        await sdk.close()


async def test_openai_sdk_reads_a_redacted_stream(fake: FakeUpstream) -> None:
    tokens = ["Mail", " jane", ".doe@", "example", ".com", " now"]
    fake.queue(Script(openai_stream(tokens)))
    async with run_gateway(filter_config(fake)) as gw:
        text, finishes = await _sdk_stream(gw.v1)
    assert text == "Mail [REDACTED:email] now"
    assert finishes == ["stop"]


async def test_openai_sdk_reads_a_stopped_stream(gated: GatedUpstream) -> None:
    tokens = ["Key", ": ", "sk-proj-abcdefghij", "klmnopqrstuvwxyz0123", " ok"]
    script, gates = gated_script(openai_stream(tokens), 3)  # the key after "Key: " went out
    gated.queue(script)
    async with run_gateway(filter_config(gated, completion_action="stop")) as gw:
        text, finishes = await _sdk_stream(gw.v1, gates[0])
    assert text == "Key: "
    assert finishes == ["content_filter"]
