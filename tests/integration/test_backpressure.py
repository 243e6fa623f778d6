"""A client that stops reading stops the upstream: nothing piles up in the gateway.

The first test checks the bytes (all delivered, in order) with an in-process gateway; the
second runs `sluice serve` as a subprocess and accounts for every byte the upstream wrote
and the client has not read: all but about 1 MiB sit in kernel socket buffers (read from
/proc/net/tcp), and the gateway's RSS stays flat while the client stalls, reads slowly,
then reads 96 MiB to the end.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import overload

import aiohttp
import orjson

from gateway.testing.fake_upstream import FakeUpstream, Script, openai_chunk, openai_stream, sse
from gateway.testing.harness import run_gateway
from tests.integration._process import gateway_process
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


# ----- the same against a real `sluice serve`: where the bytes are, and its memory ------------

BIG_EVENTS = 6144  # x 16 KiB: 96 MiB, more than twice every socket buffer on the path
CLIENT_RCVBUF = 64 << 10  # the client's receive buffer, fixed before connecting
SLOW_READ = 12 << 20  # read this much slowly (64 KiB every few ms) after the stall
# Bytes the upstream wrote that are neither read by the client nor in a kernel socket
# buffer: the gateway's aiohttp read buffer (it pauses the upstream socket past 2 x 64
# KiB) plus one socket read (256 KiB), one batch being written and the transport's write
# buffer past its high-water mark, and the fake's own write buffer. Measured: about 1 MiB.
USER_SPACE_BOUND = 2 << 20
# While bytes move, reading four sockets' queues is not one atomic snapshot: a sample can
# miss up to a socket read or two in flight between them.
MOVING_SLACK = 1 << 20
RSS_BOUND = 8 << 20  # gateway RSS growth, stalled and through all 96 MiB (measured: ~3 MiB)


class LazyEvents(Sequence[bytes]):
    """`size` distinct ~16 KiB events then [DONE], made only when the fake sends them."""

    def __init__(self, size: int) -> None:
        assert size < 100_000  # fixed-width tags: every event has the same length
        self.size = size

    def __len__(self) -> int:
        return self.size + 1

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index == self.size:
            return DONE
        if not 0 <= index < self.size:
            raise IndexError(index)
        return sse(openai_chunk(f"<{index:05d}>" + "x" * EVENT_TEXT))

    @property
    def total(self) -> int:
        """Bytes in the whole stream."""
        return self.size * len(self[0]) + len(DONE)


def kernel_queued(ports: set[int]) -> int:
    """Bytes in the send and receive queues of every IPv4 TCP socket with an end on `ports`."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if {int(local.split(":")[1], 16), int(remote.split(":")[1], 16)} & ports:
            tx, rx = queues.split(":")
            total += int(tx, 16) + int(rx, 16)
    return total


class SlowClient:
    """One HTTP/1.1 request on a raw socket with a small receive buffer; decodes the chunked
    body as it arrives, counting payload bytes (nothing is kept but the last 64)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        self.sock.setblocking(False)
        self.pending = b""
        self.payload = 0
        self.tail = b""
        self.ended = False

    async def post(self, path: str, body: bytes) -> bytes:
        """Send the request; return the status line once the response head is in."""
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        await loop.sock_sendall(self.sock, head.encode() + body)
        received = b""
        while b"\r\n\r\n" not in received:
            received += await self._recv(1 << 16)
        status_line, _, self.pending = received.partition(b"\r\n\r\n")
        self._decode()
        return status_line.split(b"\r\n", 1)[0]

    async def read(self, most: int) -> None:
        """Read up to `most` bytes of the body (one socket read)."""
        self.pending += await self._recv(most)
        self._decode()

    async def _recv(self, most: int) -> bytes:
        data = await asyncio.get_running_loop().sock_recv(self.sock, most)
        assert data, "the gateway closed the connection early"
        return data

    def _decode(self) -> None:
        while not self.ended and (line_end := self.pending.find(b"\r\n")) >= 0:
            size = int(self.pending[:line_end].split(b";")[0], 16)
            end = line_end + 2 + size + 2
            if len(self.pending) < end:
                return
            chunk = self.pending[line_end + 2 : end - 2]
            self.payload += len(chunk)
            self.tail = (self.tail + chunk)[-64:]
            self.pending = self.pending[end:]
            self.ended = size == 0

    def close(self) -> None:
        self.sock.close()


async def test_slow_reader_leaves_the_bytes_in_kernel_buffers(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """A real `sluice serve`, a client that first reads nothing, then reads slowly, then
    fast: the upstream blocks while the client stalls and advances only as it reads; the
    bytes written upstream and not yet read are (but for about 1 MiB) in kernel socket
    buffers, not in the gateway; and the gateway's RSS stays flat through all 96 MiB."""
    events = LazyEvents(BIG_EVENTS)
    fake.queue(Script(openai_stream(["warm", " up"])), Script(events))
    async with gateway_process(config_for(fake), tmp_path) as gw:
        async with aiohttp.ClientSession() as http, http.post(gw.v1 + CHAT, json=chat_body()) as r:
            assert (await r.read()).endswith(DONE)  # warm: every import and pool in place
        baseline = gw.rss()
        client = SlowClient(int(gw.url.rsplit(":", 1)[1]))
        ports = {client.port, fake.port}
        try:
            async with asyncio.timeout(60):
                status = await client.post("/v1" + CHAT, orjson.dumps(chat_body()))
                assert status.startswith(b"HTTP/1.1 200"), status
                exchange = fake.exchanges[-1]

                def in_user_space() -> int:
                    written = exchange.bytes_written
                    return written - client.payload - kernel_queued(ports)

                # The client reads nothing more: the upstream's writes must stop.
                stalled = await _until_steady(lambda: exchange.bytes_written)
                assert stalled < events.total // 2, f"{stalled} bytes written to a stalled client"
                assert not exchange.finished.is_set()
                held = [in_user_space()]
                stalled_rss = peak = gw.rss()
                assert held[0] < USER_SPACE_BOUND, (stalled, client.payload, held)

                # Slowly: the upstream advances as the client reads, no faster.
                reads = 0
                while client.payload < SLOW_READ:
                    await client.read(64 << 10)
                    reads += 1
                    if reads % 8 == 0:
                        held.append(in_user_space())
                    await asyncio.sleep(0.002)
                assert exchange.bytes_written > stalled
                peak = max(peak, gw.rss())

                # Then fast, to the end.
                while not client.ended:
                    await client.read(1 << 18)
                    if client.payload % (4 << 20) < (1 << 18):
                        peak = max(peak, gw.rss())
                await exchange.finished.wait()
        finally:
            client.close()
    assert client.payload == events.total
    assert client.tail.endswith(b"\n\n" + DONE)
    assert exchange.bytes_written == events.total
    assert not exchange.closed_by_peer
    assert max(held) < USER_SPACE_BOUND + MOVING_SLACK, max(held)
    assert stalled_rss - baseline < RSS_BOUND
    assert peak - baseline < RSS_BOUND, f"RSS {baseline >> 20} -> peak {peak >> 20} MiB"
    print(
        f"\nstalled client: upstream wrote {stalled / 2**20:.1f} MiB, all but "
        f"{held[0] / 2**10:.0f} KiB in kernel buffers (at most {max(held) / 2**10:.0f} KiB while "
        f"reading slowly); gateway RSS {baseline / 2**20:.1f} MiB, {stalled_rss / 2**20:.1f} "
        f"stalled, peak {peak / 2**20:.1f}"
    )


async def _until_steady(read: Callable[[], int], *, steady: float = 0.5, within: float = 20) -> int:
    """`read()` once it has not changed for `steady` seconds (TimeoutError after `within`)."""
    async with asyncio.timeout(within):
        last, since = read(), time.monotonic()
        while time.monotonic() - since < steady:
            await asyncio.sleep(0.05)
            if (now := read()) != last:
                last, since = now, time.monotonic()
        return last
