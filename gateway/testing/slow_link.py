"""A loopback TCP relay in front of a server whose traffic a test can hold, for faults that
a real network or a loaded machine produce: a reply that comes too late, a request lost.

    async with SlowLink(server_port) as link:
        client = Redis.from_url(f"redis://127.0.0.1:{link.port}/0")
        link.mode = "late"   # requests reach the server, replies are held
        link.mode = "lost"   # requests are dropped: they never reach the server
        link.mode = "pass"   # everything flows again (held replies are delivered)

Deterministic: what reached the relay in "pass" or "late" mode reaches the server, even
when the client gives up and closes its connection meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Literal

__all__ = ["SlowLink"]

Mode = Literal["pass", "late", "lost"]


class SlowLink:
    """Relays 127.0.0.1:`port` to 127.0.0.1:`target`; `mode` says what gets through."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._mode: Mode = "pass"
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.forwarded = asyncio.Event()  # set whenever request bytes reach the server
        self.dropped = asyncio.Event()  # set whenever request bytes are lost ("lost")
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def mode(self) -> Mode:
        """What gets through now (see the module docstring)."""
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        self._mode = mode
        if mode == "pass":
            self._flowing.set()
        else:
            self._flowing.clear()

    async def start(self) -> None:
        """Listen on a free loopback port (`port`)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and drop every relayed connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        for coro in (
            self._pipe(reader, up_writer, requests=True),
            self._pipe(up_reader, writer, requests=False),
        ):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        requests: bool,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if requests and self._mode == "lost":
                    self.dropped.set()
                    continue
                if not requests:
                    await self._flowing.wait()  # "late": replies wait for "pass"
                writer.write(data)
                await writer.drain()
                if requests:
                    self.forwarded.set()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def __aenter__(self) -> SlowLink:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
