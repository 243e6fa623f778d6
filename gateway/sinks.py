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


class StreamSink(Protocol):
    """The client end of one streamed answer."""

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
    """A chunked `text/event-stream` response to an aiohttp request."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def open(self, headers: Mapping[str, str]) -> bool:
        response = web.StreamResponse(status=200, headers={**SSE_RESPONSE_HEADERS, **headers})
        response.enable_chunked_encoding()
        self.response = response
        try:
            await response.prepare(self.request)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            return False
        return True

    async def send(self, events: list[SSEEvent]) -> int:
        data = encode_events(events)
        await self.send_bytes(data)
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
