"""One pipelined Redis connection for the rate limiter's per-request scripts.

redis-py's asyncio client spends most of a call in its own machinery (a connection taken
from and returned to a pool, a retry wrapper, the parser's line reads), about 2/3 of the
limiter's CPU per request. This client does what the limiter needs and nothing else: one
TCP connection, commands written back to back (those issued in the same event-loop pass go
out in one write), replies matched to callers in order (Redis answers a connection's
commands in the order it got them), RESP2 parsed from one buffer.

A caller that gives up (a timeout) must call `abort`: a reply that never comes (a request
lost on the way) would otherwise shift every later reply onto the wrong caller. A
cancelled caller needs nothing: its reply is read and dropped in its turn. The next call
after a lost connection opens a new one (AUTH and SELECT first, when the URL has them).

`connect_params` says whether a URL is one this client can serve (plain TCP); TLS, Unix
sockets and URL options stay with redis-py.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, cast

__all__ = ["PipelinedRedis", "ReplyError", "connect_params"]

_CRLF = b"\r\n"
_PLAIN_KEYS = frozenset({"host", "port", "db", "username", "password"})


class ReplyError(Exception):
    """Redis answered with an error (`-ERR ...`, `-NOSCRIPT ...`)."""


def connect_params(url: str) -> dict[str, Any] | None:
    """host, port, db, username, password of a plain `redis://` URL; None for any other."""
    from redis.asyncio.connection import parse_url

    params: dict[str, Any] = dict(parse_url(url))
    if not set(params) <= _PLAIN_KEYS:
        return None
    return params


def _encode(args: tuple[Any, ...]) -> bytes:
    """A RESP command; a two-word command name (`"SCRIPT LOAD"`) goes as two words."""
    if isinstance(args[0], str) and " " in args[0]:
        args = (*args[0].split(), *args[1:])
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    return b"".join(parts)


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


def _parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One RESP2 reply at `pos`: (value, position after it); _Incomplete if cut short."""
    end = buf.find(_CRLF, pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos], bytes(buf[pos + 1 : end])
    pos = end + 2
    if kind == 58:  # ':'
        return int(line), pos
    if kind == 36:  # '$'
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return bytes(buf[pos : pos + size]), pos + size + 2
    if kind == 42:  # '*'
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 43:  # '+'
        return line, pos
    if kind == 45:  # '-'
        return ReplyError(line.decode(errors="replace")), pos
    raise ConnectionError(f"unexpected reply type {chr(kind)!r} from Redis")


class _Protocol(asyncio.Protocol):
    """Callers' futures in command order, resolved as replies come in."""

    def __init__(self) -> None:
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport: no isinstance here
        self.transport = cast(asyncio.Transport, transport)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Queue `command`; it goes out with the others of this loop pass."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.waiting.append(future)
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(command)
        return future

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and not self.lost:
            self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos = 0
        try:
            while self.waiting:
                try:
                    value, pos = _parse(buf, pos)
                except _Incomplete:
                    break
                future = self.waiting.popleft()
                if not future.done():
                    if isinstance(value, ReplyError):
                        future.set_exception(value)
                    else:
                        future.set_result(value)
        except (ValueError, ConnectionError) as err:
            self.fail(ConnectionError(f"bad reply from Redis: {err}"))
            return
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError("the connection to Redis was lost"))

    def fail(self, err: Exception) -> None:
        """Fail every caller still waiting and close the connection."""
        self.lost = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(err)
        if self.transport is not None:
            self.transport.abort()


class PipelinedRedis:
    """Commands over one pipelined connection, opened on first use and after a loss."""

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self._auth = (username, password)
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    async def call(self, *args: Any) -> Any:
        """Send one command, return its reply; ReplyError for an error reply, ConnectionError
        when the connection failed."""
        proto = self._proto
        if proto is None or proto.lost:
            proto = await self._connect()
        return await proto.send(_encode(args))

    async def _connect(self) -> _Protocol:
        task = self._connecting
        if task is None:
            task = self._connecting = asyncio.get_running_loop().create_task(self._open())
            task.add_done_callback(self._connected)
        return await asyncio.shield(task)

    def _connected(self, task: asyncio.Task[_Protocol]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self._proto = task.result()

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        _transport, proto = await loop.create_connection(_Protocol, self.host, self.port)
        username, password = self._auth
        setup = []
        if password is not None:
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            setup.append(proto.send(_encode(auth)))
        if self.db:
            setup.append(proto.send(_encode(("SELECT", self.db))))
        try:
            for reply in setup:
                await reply
        except BaseException:
            proto.fail(ConnectionError("Redis refused the connection set-up"))
            raise
        return proto

    def abort(self) -> None:
        """Drop the connection (after a timeout): its callers fail, the next call reconnects."""
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.fail(ConnectionError("the connection to Redis was dropped after a timeout"))

    async def close(self) -> None:
        """Close the connection."""
        if self._connecting is not None:
            self._connecting.cancel()
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.lost = True
            proto.transport.close()
