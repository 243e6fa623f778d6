"""Where a streamed answer goes: an HTTP response, a WebSocket, or a resumable stream's log.

The stream relay (`gateway.stream`) pulls events from the upstream and through the chain,
then hands them to a sink. A sink's `send` is awaited, so a slow client slows the relay
down (backpressure) whatever carries the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import aiohttp
from aiohttp import web

from gateway.headers import SSE_RESPONSE_HEADERS
from gateway.sse import SSEEvent, encode_events


class ClientGone(Exception):
    """Writing to the client failed: it disconnected."""


def sse_response(request: web.Request, headers: Mapping[str, str]) -> web.StreamResponse:
    """A 200 `text/event-stream` response: chunked for HTTP/1.1 clients; for HTTP/1.0 ones
    (which have no chunked encoding) a close-delimited body, ended by closing the
    connection."""
    response = web.StreamResponse(status=200, headers={**SSE_RESPONSE_HEADERS, **headers})
    if request.version >= aiohttp.HttpVersion11:
        response.enable_chunked_encoding()
    else:
        response.force_close()  # no Content-Length, no chunks: EOF ends the body
        response.headers["Connection"] = "close"
    return response


class StreamSink(Protocol):
    """The client end of one streamed answer.

    `committed` is True once `open` put the start of the answer on the wire: from then on
    every failure is a final error event, never another response.
    """

    committed: bool

    async def open(self, headers: Mapping[str, str]) -> bool:
        """Commit the start of the answer (for HTTP: status 200 and `headers`).

        Returns False if the client is already gone.
        """
        ...

    async def send(self, events: list[SSEEvent]) -> int:
        """Deliver `events` in the client's format; returns the bytes sent.

        Raises ClientGone when the client disconnected.
        """
        ...

    async def close(self) -> bool:
        """The answer is over (normally or after its final error event).

        Returns False if the client turned out to be gone.
        """
        ...


class HttpSink:
    """A `text/event-stream` response to an aiohttp request (see `sse_response`)."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self.committed = False

    async def open(self, headers: Mapping[str, str]) -> bool:
        response = sse_response(self.request, headers)
        self.response = response
        self.committed = True  # a failed prepare may have sent part of the head already
        try:
            await response.prepare(self.request)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            return False
        return True

    async def send(self, events: list[SSEEvent]) -> int:
        # `send_bytes` inlined: one coroutine fewer per write on the hot path.
        data = events[0].encode() if len(events) == 1 else encode_events(events)
        assert self.response is not None
        try:
            await self.response.write(data)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as err:
            raise ClientGone() from err
        return len(data)

    async def send_bytes(self, data: bytes) -> None:
        """Write encoded events (ClientGone when the client disconnected)."""
        assert self.response is not None
        try:
            await self.response.write(data)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as err:
            raise ClientGone() from err

    async def close(self) -> bool:
        assert self.response is not None
        try:
            await self.response.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            return False
        return True
