"""A fast fake OpenAI-compatible upstream for the streaming benchmarks.

It is a raw asyncio Protocol with a minimal HTTP/1.1 parser (keep-alive, Content-Length and
chunked request bodies) so that it costs far less CPU per event than the proxies under test.

    python -m benchmarks.fake_upstream --port 9000 [--events 50 --ttft-ms 0 --gap-ms 0]

Endpoints:
  POST /v1/chat/completions   stream:true -> text/event-stream in OpenAI's wire format;
                              stream:false -> one chat.completion JSON object
  GET  /v1/models             one model, "bench"
  GET  /healthz, /readyz      200 "ok"
  GET  /_bench/stats          counters (streams started/completed/aborted, open, events)
  POST /_bench/config         set the default stream shape:
                              {"events", "ttft_ms", "gap_ms", "burst"}

The stream shape is taken from, in order: the request body's extra field
`"bench": {"events": N, "ttft_ms": T, "gap_ms": G, "burst": B}`, else the defaults set by
/_bench/config, else the command line. A stream is: a role delta, `events` content deltas,
a finish_reason "stop" delta (plus a usage chunk when stream_options.include_usage is set),
then `data: [DONE]`. Each event is written as its own HTTP chunk. The first event is due
`ttft_ms` after the request was parsed and event k is due `k * gap_ms` after the first one
(an absolute schedule, so timer jitter does not accumulate). With a gap > 0 every event is its
own write. A gap of 0 writes as fast as flow control allows, yielding to the event loop between
writes so concurrent streams interleave; each event is still its own HTTP chunk, but up to
`burst` (default 16) of them are handed to the kernel in one write, which keeps the fake's CPU
cost per event well below the proxies' (a busy proxy reads many events per recv() anyway).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, cast

import orjson

from benchmarks._runtime import raise_fd_limit, run

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
WRITE_HIGH_WATER = 64 * 1024
MAX_EVENTS = 10_000_000


class BadRequest(Exception):
    """The request could not be parsed."""


@dataclass
class StreamShape:
    """How a stream looks: content events, time to first event, gap between events, and how
    many due events may share one write when the gap is 0 (`burst`; 1 = one write per event)."""

    events: int = 50
    ttft_ms: float = 0.0
    gap_ms: float = 0.0
    burst: int = 16

    def updated(self, raw: Any) -> StreamShape:
        """A copy with the fields present in the JSON object `raw` replaced (validated)."""
        if not isinstance(raw, dict):
            return StreamShape(self.events, self.ttft_ms, self.gap_ms, self.burst)
        events = int(raw.get("events", self.events))
        ttft = float(raw.get("ttft_ms", self.ttft_ms))
        gap = float(raw.get("gap_ms", self.gap_ms))
        burst = int(raw.get("burst", self.burst))
        if not 0 <= events <= MAX_EVENTS or ttft < 0 or gap < 0 or not 1 <= burst <= 1024:
            raise BadRequest(
                "bench: events must be in [0, 1e7], burst in [1, 1024], ttft_ms and gap_ms >= 0"
            )
        return StreamShape(events, ttft, gap, burst)


@dataclass
class Counters:
    """What the fake has served since it started."""

    started: int = 0
    completed: int = 0
    aborted: int = 0
    open: int = 0
    events: int = 0


class State:
    """Process-wide state shared by all connections."""

    def __init__(self, shape: StreamShape) -> None:
        self.shape = shape
        self.counters = Counters()
        self.seq = 0


@dataclass
class Request:
    """One parsed HTTP request."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


def _decode_chunked(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """Decode a chunked body starting at `pos`; None while incomplete."""
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        except ValueError as exc:
            raise BadRequest("bad chunk size") from exc
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)
            return (bytes(out), end + 4) if end >= 0 else None
        start = eol + 2
        if len(buf) < start + size + 2:
            return None
        out += buf[start : start + size]
        if len(out) > MAX_BODY:
            raise BadRequest("body too large")
        pos = start + size + 2


def _parse_head(head: str) -> tuple[str, str, str, dict[str, str]]:
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest("bad request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest("bad header line")
        headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers


def parse_request(buf: bytearray) -> tuple[Request, int] | None:
    """Parse one request from the front of `buf`: (request, bytes used), or None if partial."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise BadRequest("header too large")
        return None
    method, path, version, headers = _parse_head(buf[:end].decode("latin-1"))
    pos = end + 4
    if "chunked" in headers.get("transfer-encoding", "").lower():
        decoded = _decode_chunked(buf, pos)
        if decoded is None:
            return None
        body, used = decoded
    else:
        length = int(headers.get("content-length", "0") or "0")
        if not 0 <= length <= MAX_BODY:
            raise BadRequest("bad content-length")
        if len(buf) < pos + length:
            return None
        body, used = bytes(buf[pos : pos + length]), pos + length
    conn = headers.get("connection", "").lower()
    keep_alive = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
    return Request(method, path, headers, body, keep_alive), used


def _response_head(status: str, ctype: str, length: int | None, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Type: {ctype}"]
    if length is None:
        lines += ["Cache-Control: no-cache", "Transfer-Encoding: chunked"]
    else:
        lines.append(f"Content-Length: {length}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class ChunkFactory:
    """Builds `data: {...}\\n\\n` events of one completion in OpenAI's chunk format."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        head = orjson.dumps(
            {"id": completion_id, "object": "chat.completion.chunk", "created": created}
        )
        self._head = b"data: " + head[:-1] + b',"model":' + orjson.dumps(model)
        self._choice = self._head + b',"choices":[{"index":0,"delta":'

    def role(self) -> bytes:
        return self._choice + b'{"role":"assistant","content":""},"finish_reason":null}]}\n\n'

    def content(self, index: int) -> bytes:
        return self._choice + b'{"content":" t%d"},"finish_reason":null}]}\n\n' % index

    def stop(self) -> bytes:
        return self._choice + b'{},"finish_reason":"stop"}]}\n\n'

    def usage(self, completion_tokens: int) -> bytes:
        usage = {
            "prompt_tokens": 8,
            "completion_tokens": completion_tokens,
            "total_tokens": 8 + completion_tokens,
        }
        return self._head + b',"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n"


def expected_text(events: int) -> str:
    """The assistant text a stream of `events` content events carries."""
    return "".join(f" t{i}" for i in range(1, events + 1))


def _frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)


class FakeProtocol(asyncio.Protocol):
    """One client connection: parses requests one at a time and serves them."""

    def __init__(self, state: State, loop: asyncio.AbstractEventLoop) -> None:
        self._state = state
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._task: asyncio.Task[bool] | None = None
        self._closed = False
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._task is None:
            self._next_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake()
        if self._task is not None:
            self._task.cancel()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    # -- request loop ------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _next_request(self) -> None:
        try:
            parsed = parse_request(self._buf)
        except (BadRequest, ValueError, UnicodeDecodeError) as exc:
            self._send_simple("400 Bad Request", str(exc).encode(), keep_alive=False)
            return
        if parsed is None:
            return
        request, used = parsed
        del self._buf[:used]
        self._task = self._loop.create_task(self._serve(request))
        self._task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task[bool]) -> None:
        self._task = None
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not isinstance(exc, ConnectionError):
            print(f"fake upstream: handler failed: {exc!r}", file=sys.stderr, flush=True)
        if self._closed or self._transport is None:
            return
        keep_alive = not task.cancelled() and exc is None and task.result()
        if not keep_alive:
            self._transport.close()
            return
        if self._buf:
            self._next_request()

    async def _writable(self) -> None:
        if self._closed:
            raise ConnectionResetError("client went away")
        while self._paused:
            self._waiter = self._loop.create_future()
            await self._waiter
            if self._closed:
                raise ConnectionResetError("client went away")

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    def _send_simple(
        self, status: str, body: bytes, keep_alive: bool, ctype: str = "text/plain"
    ) -> None:
        self._write(_response_head(status, ctype, len(body), keep_alive) + body)
        if not keep_alive and self._transport is not None:
            self._transport.close()

    def _send_json(self, obj: Any, keep_alive: bool) -> None:
        self._send_simple("200 OK", orjson.dumps(obj), keep_alive, "application/json")

    # -- handlers ----------------------------------------------------------------------------
    async def _serve(self, req: Request) -> bool:
        route = (req.method, req.path.split("?", 1)[0])
        if route == ("POST", "/v1/chat/completions"):
            return await self._chat(req)
        if route in (("GET", "/healthz"), ("GET", "/readyz")):
            self._send_simple("200 OK", b"ok\n", req.keep_alive)
        elif route == ("GET", "/v1/models"):
            model = {"id": "bench", "object": "model", "created": 0, "owned_by": "bench"}
            self._send_json({"object": "list", "data": [model]}, req.keep_alive)
        elif route == ("GET", "/_bench/stats"):
            self._send_json(asdict(self._state.counters), req.keep_alive)
        elif route == ("POST", "/_bench/config"):
            try:
                self._state.shape = self._state.shape.updated(orjson.loads(req.body or b"{}"))
            except (BadRequest, ValueError, TypeError) as exc:
                self._send_simple("400 Bad Request", str(exc).encode(), req.keep_alive)
            else:
                self._send_json(asdict(self._state.shape), req.keep_alive)
        else:
            self._send_simple("404 Not Found", b"not found\n", req.keep_alive)
        return req.keep_alive

    async def _chat(self, req: Request) -> bool:
        try:
            body = orjson.loads(req.body)
            if not isinstance(body, dict):
                raise BadRequest("body must be a JSON object")
            shape = self._state.shape.updated(body.get("bench"))
        except (BadRequest, ValueError, TypeError) as exc:
            self._send_simple("400 Bad Request", str(exc).encode(), req.keep_alive)
            return req.keep_alive
        model = str(body.get("model", "bench"))
        self._state.seq += 1
        factory = ChunkFactory(
            f"chatcmpl-bench{os.getpid():x}x{self._state.seq:09d}", int(time.time()), model
        )
        if body.get("stream") is True:
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            await self._stream(req.keep_alive, shape, factory, usage)
        else:
            await self._complete(req.keep_alive, shape, factory, model)
        return req.keep_alive

    async def _complete(
        self, keep_alive: bool, shape: StreamShape, factory: ChunkFactory, model: str
    ) -> None:
        await asyncio.sleep(shape.ttft_ms / 1000)
        message = {"role": "assistant", "content": expected_text(shape.events)}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        usage = {"prompt_tokens": 8, "completion_tokens": shape.events}
        usage["total_tokens"] = 8 + shape.events
        obj = {
            "id": f"chatcmpl-bench{self._state.seq}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
        self._send_json(obj, keep_alive)

    async def _stream(
        self, keep_alive: bool, shape: StreamShape, factory: ChunkFactory, usage: bool
    ) -> None:
        counters = self._state.counters
        counters.started += 1
        counters.open += 1
        try:
            await self._stream_events(keep_alive, shape, factory, usage)
        except (ConnectionError, asyncio.CancelledError):
            counters.aborted += 1
            raise
        else:
            counters.completed += 1
        finally:
            counters.open -= 1

    async def _stream_events(
        self, keep_alive: bool, shape: StreamShape, factory: ChunkFactory, usage: bool
    ) -> None:
        loop, counters = self._loop, self._state.counters
        first_due = loop.time() + shape.ttft_ms / 1000
        gap = shape.gap_ms / 1000
        burst = 1 if gap else shape.burst
        self._write(_response_head("200 OK", "text/event-stream; charset=utf-8", None, keep_alive))
        total = shape.events + 2
        k = 0
        while k < total:
            delay = first_due + k * gap - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif k and not gap:
                await asyncio.sleep(0)  # let the other streams interleave
            await self._writable()
            end = min(total, k + burst)
            self._write(b"".join(_frame(_event(factory, i, total)) for i in range(k, end)))
            counters.events += end - k
            k = end
        if usage:
            await self._writable()
            self._write(_frame(factory.usage(shape.events)))
        await self._writable()
        self._write(_frame(b"data: [DONE]\n\n") + b"0\r\n\r\n")


def _event(factory: ChunkFactory, k: int, total: int) -> bytes:
    """Event k of a stream of `total` events: role delta, content deltas, finish delta."""
    if k == 0:
        return factory.role()
    if k < total - 1:
        return factory.content(k)
    return factory.stop()


async def serve(host: str, port: int, shape: StreamShape) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    state = State(shape)
    server = await loop.create_server(
        lambda: FakeProtocol(state, loop), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()
    print(f"fake upstream listening on http://{bound[0]}:{bound[1]}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="listen address (loopback)")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--events", type=int, default=50, help="content events per stream")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="time to first event")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="gap between events")
    parser.add_argument("--burst", type=int, default=16, help="events per write when gap is 0")
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    args = parser.parse_args(argv)
    raise_fd_limit()
    shape = StreamShape(args.events, args.ttft_ms, args.gap_ms, args.burst)
    run(serve(args.host, args.port, shape), use_uvloop=not args.no_uvloop)


if __name__ == "__main__":
    main()
