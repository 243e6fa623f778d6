"""1,000 streams open at once through a real `sluice serve`, held open, then released.

The gateway runs as a subprocess started with a soft open-files limit of 1024, as from a
login shell: 1,000 streams need about 2,000 sockets in the gateway (one to the client, one
to the upstream each), so this only passes because `sluice serve` raises its soft limit to
the hard one at start-up.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from gateway.testing.fake_upstream import Exchange, openai_stream
from tests.integration._process import gateway_process, parse_metrics, raise_nofile_limit
from tests.integration._support import (
    CHAT,
    DONE,
    GatedScript,
    GatedUpstream,
    chat_body,
    chat_contents,
    config_for,
)

STREAMS = 1000
GATEWAY_SOFT_NOFILE = 1024  # what the gateway starts with; it needs about 2 * STREAMS
# This process holds a client socket and a fake-upstream socket per stream.
TEST_NOFILE = 2 * STREAMS + 512
BOUND = 60.0  # the whole test on a busy 2-core machine; it takes a few seconds


def _tokens(index: int) -> list[str]:
    return [f"stream {index}", " held", " then", " released"]


def _index(exchange: Exchange) -> int:
    text = exchange.body["messages"][0]["content"]
    assert isinstance(text, str)
    return int(text.removeprefix("stream "))


async def test_a_thousand_concurrent_streams(tmp_path: Path) -> None:
    soft, hard = raise_nofile_limit(TEST_NOFILE)
    if soft < TEST_NOFILE or (hard != resource.RLIM_INFINITY and hard < 2 * STREAMS + 256):
        pytest.skip(f"open-files limit too low for {STREAMS} streams (soft {soft}, hard {hard})")
    release = asyncio.Event()

    def hold_after_first_event(exchange: Exchange) -> GatedScript:
        # The gateway commits headers at the first data event (the role chunk), so every
        # client gets headers and one event, then the stream is held until `release`.
        return GatedScript(openai_stream(_tokens(_index(exchange))), gates={1: release})

    upstream = GatedUpstream(responder=hold_after_first_event)
    await upstream.start()
    try:
        config = config_for(upstream)
        async with (
            gateway_process(config, tmp_path, nofile_soft=GATEWAY_SOFT_NOFILE) as gw,
            asyncio.timeout(BOUND),
        ):
            await _run(gw.v1, upstream, release, gw.rss)
            assert gw.nofile()[0] >= 2 * STREAMS
            async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/metrics") as resp:
                metrics = parse_metrics(await resp.text())
        assert sum(value for _, value in metrics["sluice_inflight_streams"]) == 0
        completed = [
            value
            for labels, value in metrics["sluice_requests_total"]
            if labels["outcome"] == "completed"
        ]
        assert sum(completed) == STREAMS
    finally:
        await upstream.close()


async def _run(
    v1: str, upstream: GatedUpstream, release: asyncio.Event, rss: Callable[[], int]
) -> None:
    first_events = 0
    all_started = asyncio.Event()

    async def one(http: aiohttp.ClientSession, index: int) -> bytes:
        nonlocal first_events
        body = chat_body(messages=[{"role": "user", "content": f"stream {index}"}])
        async with http.post(v1 + CHAT, json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.content_type == "text/event-stream"
            first = await resp.content.readuntil(b"\n\n")
            assert first.startswith(b"data: ")
            assert b'"role":"assistant"' in first
            first_events += 1
            if first_events == STREAMS:
                all_started.set()
            rest = await resp.read()
        return first + rest

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        before = rss()
        started = time.perf_counter()
        # A TaskGroup: the first failing stream cancels the rest and is reported.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(http, i)) for i in range(STREAMS)]
            await all_started.wait()
            opened = time.perf_counter() - started
            # Every stream is open and held: none went past its first event upstream.
            assert len(upstream.exchanges) == STREAMS
            assert all(exchange.chunks_written == 1 for exchange in upstream.exchanges)
            held_rss = rss()
            release.set()
    for index, task in enumerate(tasks):
        raw = task.result()
        assert chat_contents(raw) == _tokens(index)
        assert raw.endswith(DONE)
    per_stream = (held_rss - before) / STREAMS
    print(
        f"\n{STREAMS} streams open in {opened:.2f} s; gateway RSS {before >> 20} MiB idle, "
        f"{held_rss >> 20} MiB with all open (~{per_stream / 1024:.0f} KiB per open stream)"
    )
