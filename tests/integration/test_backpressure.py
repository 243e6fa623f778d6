"""A client that stops reading stops the upstream: nothing piles up in the gateway."""

from __future__ import annotations

import asyncio

import orjson

from gateway.testing.fake_upstream import FakeUpstream, Script, openai_chunk, sse
from gateway.testing.harness import run_gateway
from tests.integration._support import CHAT, DONE, RawClient, chat_body, config_for

EVENTS = 2000
EVENT_TEXT = 16 << 10  # ~16 KiB of content per event
STALL_WINDOW = 2.0  # how long the client reads nothing
MAX_IN_FLIGHT = 16 << 20  # what kernel buffers and small user-space buffers may hold


def _big_stream() -> list[bytes]:
    """2000 distinct ~16 KiB events (each names its index, so order and loss show), [DONE]."""
    chunks = []
    for i in range(EVENTS):
        tag = f"<{i:05d}>"
        chunks.append(sse(openai_chunk(tag + "x" * (EVENT_TEXT - 2 * len(tag)) + tag)))
    chunks.append(DONE)
    return chunks


async def test_stalled_reader_throttles_the_upstream(fake: FakeUpstream) -> None:
    chunks = _big_stream()
    expected = b"".join(chunks)
    assert len(expected) > 30 << 20
    fake.queue(Script(chunks))
    async with run_gateway(config_for(fake)) as gw:
        client = await RawClient.connect(gw.url)
        try:
            await client.post_json("/v1" + CHAT, chat_body())
            async with asyncio.timeout(10):
                head = await client.read_head()
            assert head.status == 200
            assert head.headers["transfer-encoding"] == "chunked"
            (exchange,) = fake.exchanges

            # The client reads nothing more: the upstream must not be able to finish.
            finished_early = True
            try:
                await asyncio.wait_for(exchange.finished.wait(), STALL_WINDOW)
            except TimeoutError:
                finished_early = False
            assert not finished_early, "the upstream wrote everything to a stalled client"
            stalled_at = exchange.bytes_written
            assert stalled_at < MAX_IN_FLIGHT, f"{stalled_at} bytes buffered for a stalled client"
            assert stalled_at < len(expected) // 2

            # Now read it all: every byte intact, in order, ending in [DONE].
            async with asyncio.timeout(30):
                body = await client.read_body(head)
                await exchange.finished.wait()
        finally:
            await client.close()
    assert len(body) == len(expected)
    assert body == expected
    assert body.endswith(b"\n\n" + DONE)
    last = orjson.loads(body[: -len(DONE)].rsplit(b"\n\n", 2)[-2].removeprefix(b"data: "))
    assert last["choices"][0]["delta"]["content"].startswith(f"<{EVENTS - 1:05d}>")
    assert exchange.bytes_written == len(expected)
    assert not exchange.closed_by_peer
