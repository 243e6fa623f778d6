"""Upstream timeouts (configured tiny): 504 before headers, a final error event after."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from gateway.testing.fake_upstream import FakeUpstream, Script, openai_stream
from gateway.testing.harness import run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
    chat_body,
    config_for,
    final_error,
    json_error,
    split_events,
)


async def _post_timed(
    http: aiohttp.ClientSession, url: str, stream: bool = True, within: float = BOUND
) -> tuple[int, bytes, float]:
    started = time.perf_counter()
    try:
        async with (
            asyncio.timeout(within),
            http.post(url + CHAT, json=chat_body(stream=stream)) as resp,
        ):
            body = await resp.read()
    except TimeoutError:
        pytest.fail(f"the request did not end within {within} s")
    return resp.status, body, time.perf_counter() - started


@pytest.mark.parametrize("stream", [True, False])
async def test_no_response_headers_is_first_byte_504(
    fake: FakeUpstream, http: aiohttp.ClientSession, stream: bool
) -> None:
    never = asyncio.Event()
    fake.queue(Script(openai_stream(["x"]), release=never))
    config = config_for(fake, timeouts={"first_byte": 0.2})
    async with run_gateway(config) as gw:
        status, body, elapsed = await _post_timed(http, gw.v1, stream)
        (exchange,) = fake.exchanges
        async with asyncio.timeout(BOUND):
            await exchange.finished.wait()
    assert status == 504
    error = json_error(body)
    assert error["code"] == "upstream_first_byte_timeout"
    assert error["type"] == "timeout_error"
    assert 0.2 <= elapsed < 3.0
    assert exchange.closed_by_peer, "the gateway must close the upstream connection"
    assert exchange.chunks_written == 0


@pytest.mark.parametrize(
    "chunks",
    [pytest.param([], id="headers-only"), pytest.param([b": ping\n\n"], id="comment-only")],
)
async def test_headers_but_no_event_is_first_byte_504(
    fake: FakeUpstream, http: aiohttp.ClientSession, chunks: list[bytes]
) -> None:
    """A keep-alive comment is not a first event: the header hold still ends in a 504."""
    fake.queue(Script(chunks, then="hang"))
    config = config_for(fake, timeouts={"first_byte": 0.2})
    async with run_gateway(config) as gw:
        status, body, elapsed = await _post_timed(http, gw.v1)
        (exchange,) = fake.exchanges
        async with asyncio.timeout(BOUND):
            await exchange.finished.wait()
    assert status == 504
    assert json_error(body)["code"] == "upstream_first_byte_timeout"
    assert elapsed < 3.0
    assert exchange.closed_by_peer


async def test_idle_gap_after_first_event_ends_with_idle_timeout_event(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """`idle` counts from the last event, whatever `first_byte` is (here much larger)."""
    events = openai_stream(["first"], done=False)[:2]
    fake.queue(Script(events, then="hang"))
    config = config_for(fake, timeouts={"idle": 0.2, "first_byte": 30.0})
    async with run_gateway(config) as gw:
        status, raw, elapsed = await _post_timed(http, gw.v1, within=2.0)
        (exchange,) = fake.exchanges
        async with asyncio.timeout(BOUND):
            await exchange.finished.wait()
    assert status == 200
    assert split_events(raw)[:-1] == events
    error = final_error(raw)
    assert error["code"] == "upstream_idle_timeout"
    assert error["type"] == "timeout_error"
    assert 0.2 <= elapsed < 3.0
    assert exchange.closed_by_peer


async def test_steady_trickle_past_total_ends_with_total_timeout_event(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """Every gap is far below `idle`, but the whole stream outlasts `total`."""
    events = openai_stream([f" t{i}" for i in range(60)])
    fake.queue(Script(events, delays=0.02))
    config = config_for(fake, timeouts={"total": 0.4, "idle": 5.0, "first_byte": 5.0})
    async with run_gateway(config) as gw:
        status, raw, elapsed = await _post_timed(http, gw.v1)
        (exchange,) = fake.exchanges
        async with asyncio.timeout(BOUND):
            await exchange.finished.wait()
    assert status == 200
    got = split_events(raw)
    assert 1 < len(got) - 1 < len(events), "some events, not all, before the cut"
    assert got[:-1] == events[: len(got) - 1]
    assert final_error(raw)["code"] == "upstream_total_timeout"
    assert elapsed < 3.0
    assert exchange.closed_by_peer
    assert exchange.chunks_written < len(events)


async def test_non_streaming_body_past_total_is_504(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script([b'{"object": "chat.'], content_type="application/json", then="hang"))
    config = config_for(fake, timeouts={"total": 0.3})
    async with run_gateway(config) as gw:
        status, body, elapsed = await _post_timed(http, gw.v1, stream=False)
    assert status == 504
    assert json_error(body)["code"] == "upstream_total_timeout"
    assert elapsed < 3.0


async def test_fast_stream_is_untouched_by_tight_timeouts(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    events = openai_stream(["quick", " one"])
    fake.queue(Script(events))
    config = config_for(fake, timeouts={"first_byte": 2.0, "idle": 2.0, "total": 4.0})
    async with run_gateway(config) as gw:
        status, raw, _ = await _post_timed(http, gw.v1)
    assert status == 200
    assert raw == b"".join(events)
