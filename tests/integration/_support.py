"""Helpers shared by the integration tests.

Request bodies, a small SSE splitter for what the client received, a fake upstream that
can hold any chunk until the test releases it, a probe plugin that records `on_end`, and
a hand-written HTTP client and a raw-socket upstream for tests that need exact control of
the bytes on either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from gateway.context import Outcome, RequestContext
from gateway.plugin import Plugin
from gateway.testing.fake_upstream import Exchange, FakeUpstream, Script

CHAT = "/chat/completions"
COMPLETIONS = "/completions"
EMBEDDINGS = "/embeddings"
DONE = b"data: [DONE]\n\n"
SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# Generous bounds: they only turn a hang into a failure, they never pace a test.
BOUND = 5.0


# ----- request bodies -----------------------------------------------------------------------


def chat_body(*, stream: bool = True, model: str = "m", **extra: Any) -> dict[str, Any]:
    """A minimal valid chat request."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        **extra,
    }


def completion_body(*, stream: bool = True, model: str = "m", **extra: Any) -> dict[str, Any]:
    """A minimal valid legacy completions request."""
    return {"model": model, "prompt": "Say hi", "stream": stream, **extra}


def config_for(
    fake: FakeUpstream | RawUpstream,
    *,
    server: Mapping[str, Any] | None = None,
    plugins: Sequence[Mapping[str, Any]] = (),
    route: Mapping[str, Any] | None = None,
    **upstream: Any,
) -> dict[str, Any]:
    """Model `m` routed to the fake as `gpt-test`, with optional server/plugins/route extras.

    The upstream is not asked for `stream_options.include_usage` unless `include_usage=True`
    is passed, and failed attempts are not retried unless the route says so, so these tests
    see one exchange: the client's request and the fake's bytes unchanged.
    """
    upstream = {"include_usage": False, **upstream}
    config: dict[str, Any] = {
        "upstreams": {"fake": {"kind": "openai", "base_url": fake.base_url, **upstream}},
        "routes": [
            {
                "model": "m",
                "upstream": "fake",
                "upstream_model": "gpt-test",
                "retries": 0,  # one attempt: these tests look at a single exchange
                **(route or {}),
            }
        ],
        "plugins": [dict(p) for p in plugins],
    }
    if server is not None:
        config["server"] = dict(server)
    return config


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----- reading what the client got ------------------------------------------------------------


def split_events(raw: bytes) -> list[bytes]:
    """Split an LF-framed SSE body into events (each with its blank line); no partial tail."""
    events: list[bytes] = []
    start = 0
    while (end := raw.find(b"\n\n", start)) != -1:
        events.append(raw[start : end + 2])
        start = end + 2
    assert start == len(raw), f"stream ended inside an event: {raw[start:]!r}"
    return events


def event_data(event: bytes) -> bytes:
    """The data field of one event (data lines joined with LF)."""
    lines = [line for line in event.split(b"\n") if line.startswith(b"data:")]
    assert lines, f"event without data: {event!r}"
    return b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in lines)


def event_json(event: bytes) -> Any:
    """The data field of one event parsed as JSON."""
    return orjson.loads(event_data(event))


def chat_contents(raw: bytes) -> list[str]:
    """The `delta.content` of every chat chunk in a client stream, in order (no [DONE])."""
    out: list[str] = []
    for event in split_events(raw):
        if event == DONE:
            continue
        for choice in event_json(event)["choices"]:
            content = choice["delta"].get("content")
            if content:
                out.append(content)
    return out


def final_error(raw: bytes) -> dict[str, Any]:
    """Assert the stream ends with one error event and no [DONE]; return its `error` object."""
    events = split_events(raw)
    assert events, "empty stream"
    assert DONE not in events, "an errored stream must not carry [DONE]"
    payload = event_json(events[-1])
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert isinstance(error, dict)
    assert {"message", "type", "code"} <= set(error), error
    for earlier in events[:-1]:
        assert b'"error"' not in earlier, "only the final event may be an error"
    return error


def json_error(body: bytes) -> dict[str, Any]:
    """The `error` object of an OpenAI-shaped JSON error body."""
    payload = orjson.loads(body)
    assert isinstance(payload, dict)
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert isinstance(error, dict)
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert "code" in error
    return error


# ----- a fake upstream that can hold any chunk ------------------------------------------------


@dataclass
class GatedScript(Script):
    """A Script that waits for `gates[i]` (after sending headers) before writing chunk i."""

    gates: dict[int, asyncio.Event] = field(default_factory=dict)


def gated_script(
    chunks: Sequence[bytes], *held: int, then: str = "eof"
) -> tuple[GatedScript, list[asyncio.Event]]:
    """A script holding chunks at the given indexes; returns it and the gates, in order."""
    gates = {index: asyncio.Event() for index in held}
    return GatedScript(list(chunks), then=then, gates=gates), [gates[i] for i in held]


class GatedUpstream(FakeUpstream):
    """FakeUpstream that honours GatedScript gates; other scripts play as usual."""

    async def _play(
        self, request: web.Request, script: Script, exchange: Exchange
    ) -> web.StreamResponse:
        if not isinstance(script, GatedScript):
            return await super()._play(request, script, exchange)
        response = web.StreamResponse(status=script.status, headers=script.headers)
        response.content_type = script.content_type
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i, chunk in enumerate(script.chunks):
            gate = script.gates.get(i)
            if gate is not None:
                await gate.wait()
            await response.write(chunk)
            exchange.chunks_written += 1
            exchange.bytes_written += len(chunk)
        if script.then == "hang":
            await asyncio.Event().wait()
        if script.then == "reset":
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write_eof()
        return response


# ----- a plugin that records how requests ended -----------------------------------------------


@dataclass
class ProbeLog:
    """Every context `on_end` saw, in order."""

    contexts: list[RequestContext] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def outcomes(self) -> list[Outcome | None]:
        """The outcome of each ended request."""
        return [ctx.outcome for ctx in self.contexts]

    async def wait_ends(self, count: int, within: float = BOUND) -> list[RequestContext]:
        """Block until `on_end` ran at least `count` times."""
        async with asyncio.timeout(within):
            while len(self.contexts) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.contexts


class Probe(Plugin):
    """Records `on_end` into the class's `log` (each test binds a fresh subclass)."""

    name = "probe"
    log: ClassVar[ProbeLog]

    async def on_end(self, ctx: RequestContext) -> None:
        self.log.contexts.append(ctx)
        self.log.changed.set()


def make_probe() -> tuple[type[Probe], ProbeLog]:
    """A Probe class bound to a fresh log."""
    record = ProbeLog()

    class BoundProbe(Probe):
        log = record

    return BoundProbe, record


# ----- a raw HTTP/1.1 client ------------------------------------------------------------------


@dataclass
class RawHead:
    """Status line and headers (names lower-cased, repeated ones joined with ", ")."""

    status: int
    headers: dict[str, str]
    version: str = "HTTP/1.1"


class RawClient:
    """One hand-driven HTTP connection: exact request bytes, explicit reads, abrupt close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed_at: float | None = None

    @classmethod
    async def connect(cls, url: str) -> RawClient:
        """Open a connection to the host:port of `url`."""
        parts = urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        return cls(reader, writer)

    async def send(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        version: str = "HTTP/1.1",
    ) -> None:
        """Write one request with a Content-Length body."""
        lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
        lines += [f"{name}: {value}" for name, value in headers]
        lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()

    async def post_json(
        self,
        path: str,
        body: Any,
        headers: Sequence[tuple[str, str]] = (),
        *,
        version: str = "HTTP/1.1",
    ) -> None:
        """POST a JSON body."""
        await self.send(
            "POST",
            path,
            [("Content-Type", "application/json"), *headers],
            orjson.dumps(body),
            version=version,
        )

    async def read_head(self) -> RawHead:
        """The response's status line and headers."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        version, status, *_ = status_line.split(" ", 2)
        assert version in ("HTTP/1.0", "HTTP/1.1"), status_line
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return RawHead(int(status), headers, version)

    async def read_chunk(self) -> bytes | None:
        """The next chunk of a chunked body; None after the last (zero-size) chunk."""
        size_line = await self.reader.readuntil(b"\r\n")
        size_field = size_line[:-2].split(b";", 1)[0]
        assert re.fullmatch(rb"[0-9a-fA-F]{1,16}", size_field), f"bad chunk size {size_line!r}"
        size = int(size_field, 16)
        if size == 0:
            await self.reader.readuntil(b"\r\n")  # no trailers are expected
            return None
        data = await self.reader.readexactly(size)
        assert await self.reader.readexactly(2) == b"\r\n", "bad chunk framing"
        return data

    async def read_body(self, head: RawHead) -> bytes:
        """The whole body, chunked or with Content-Length."""
        if head.headers.get("transfer-encoding") == "chunked":
            parts: list[bytes] = []
            while (chunk := await self.read_chunk()) is not None:
                parts.append(chunk)
            return b"".join(parts)
        return await self.reader.readexactly(int(head.headers["content-length"]))

    async def read_until(self, buffer: bytearray, marker: bytes) -> None:
        """Read chunks into `buffer` until it contains `marker` (EOFError at the body's end)."""
        while marker not in buffer:
            chunk = await self.read_chunk()
            if chunk is None:
                raise EOFError(f"body ended before {marker!r}")
            buffer += chunk

    def abort(self) -> float:
        """Reset the connection now; returns the perf_counter time it was closed."""
        self.closed_at = time.perf_counter()
        self.writer.transport.abort()
        return self.closed_at

    async def close(self) -> None:
        """Close politely (idempotent)."""
        if not self.writer.is_closing():
            self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


# ----- an upstream that writes exact bytes ----------------------------------------------------


HTTP_200_CHUNKED_SSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def http_chunk(data: bytes) -> bytes:
    """`data` as one well-formed chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass
class RawScript:
    """What a RawUpstream writes for one request: `steps` in order (bytes are written, an
    Event is waited for after what came before was flushed); then it closes the socket
    ("eof"), resets it ("reset"), or keeps it open until the gateway closes it ("hang")."""

    steps: list[bytes | asyncio.Event]
    then: str = "eof"


class RawUpstream:
    """A plain asyncio server as the upstream: any bytes, broken framing included."""

    def __init__(self) -> None:
        self.scripts: list[RawScript] = []
        self.requests: list[bytes] = []  # each request's head and body, as received
        self.closed_by_peer = asyncio.Event()  # the gateway closed a connection
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT/v1`, for an `openai` upstream's base_url."""
        return f"http://127.0.0.1:{self.port}/v1"

    def queue(self, *scripts: RawScript) -> None:
        """Answer the next requests with these scripts, in order."""
        self.scripts.extend(scripts)

    async def start(self) -> RawUpstream:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        """Stop listening and drop open connections."""
        if self._server is not None:
            self._server.close()
            for writer in self._open:
                writer.transport.abort()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            await self._play(reader, writer)
        finally:
            self._open.discard(writer)

    async def _play(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            self.requests.append(head + body)
            script = self.scripts.pop(0)
            for step in script.steps:
                if isinstance(step, asyncio.Event):
                    await writer.drain()
                    await step.wait()
                else:
                    writer.write(step)
            await writer.drain()
            if script.then == "hang":
                while await reader.read(65536):
                    pass
                self.closed_by_peer.set()
            elif script.then == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_by_peer.set()
        writer.close()
