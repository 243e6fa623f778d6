"""The bounded event log of one resumable stream, and the registry of this replica's logs.

Each event with data gets an id `<stream id>.<n>` (n = 1, 2, ...) and is kept, already
encoded, so a client that reconnects with `Last-Event-ID` gets exactly the events after it.
The log holds at most `max_bytes`; past that the oldest events are dropped, and a resume
from before them is refused rather than served with a hole.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.sse import SSEEvent

_EVENT_ID = re.compile(r"^(?:(rs_[A-Za-z0-9_-]{8,64})\.)?(\d{1,12})$")
_STREAM_ID = re.compile(r"^rs_[A-Za-z0-9_-]{8,64}$")


def new_stream_id() -> str:
    """An unguessable stream id (128 random bits)."""
    return "rs_" + secrets.token_urlsafe(16)


def valid_stream_id(text: str) -> bool:
    """Whether `text` has the shape of a stream id (before any lookup)."""
    return _STREAM_ID.fullmatch(text) is not None


def parse_event_id(text: str) -> tuple[str | None, int] | None:
    """`rs_x.12` -> ("rs_x", 12), `12` -> (None, 12); None if it is neither."""
    match = _EVENT_ID.fullmatch(text.strip())
    if match is None:
        return None
    return match.group(1), int(match.group(2))


def with_id(event: SSEEvent, event_id: str) -> bytes:
    """The event's wire bytes carrying `id: event_id` (an upstream's own id is replaced)."""
    if event.raw is not None and event.id is None:
        return b"id: " + event_id.encode() + b"\n" + event.raw.lstrip(b"\r\n")
    return event.replace(id=event_id).encode()


class ResumeExpired(Exception):
    """The events after the requested id are no longer all in the log."""


@dataclass(slots=True)
class Reader:
    """One client reading a log: `position` is the last sequence number it was sent."""

    position: int


class StreamLog:
    """The encoded events of one stream, in order, from `first_seq` to `last_seq`."""

    def __init__(self, stream_id: str, owner: str, headers: dict[str, str], max_bytes: int):
        self.stream_id = stream_id
        self.owner = owner  # the key id that started it ("" without auth)
        self.headers = headers  # the response headers the first client got
        self.max_bytes = max_bytes
        self._entries: deque[tuple[int, bytes]] = deque()
        self.last_seq = 0
        self.size = 0
        self.finished = False
        self.lost = False  # an event no client was sent has been dropped
        self.abandoned = False  # generation was cancelled: nobody came back in time
        self.delivered = 0  # highest sequence number some client was sent
        self.readers: list[Reader] = []
        self._changed = asyncio.Event()
        self._caught_up = asyncio.Event()

    @property
    def first_seq(self) -> int:
        """The oldest sequence number still held (last_seq + 1 when empty)."""
        return self._entries[0][0] if self._entries else self.last_seq + 1

    def append(self, events: Iterable[SSEEvent]) -> bytes:
        """Number, encode and keep `events`; returns their bytes as the client gets them."""
        out: list[bytes] = []
        prefix = self.stream_id + "."
        for event in events:
            if event.data_bytes is None:  # comments and keep-alives: sent live, not kept
                out.append(event.encode())
                continue
            self.last_seq += 1
            data = with_id(event, prefix + str(self.last_seq))
            self._entries.append((self.last_seq, data))
            self.size += len(data)
            out.append(data)
        while self.size > self.max_bytes and len(self._entries) > 1:
            seq, data = self._entries.popleft()
            self.size -= len(data)
            if seq > self.delivered:
                self.lost = True
        self._wake()
        return b"".join(out)

    def finish(self) -> None:
        """No more events will come."""
        self.finished = True
        self._wake()

    def abandon(self) -> None:
        """Generation was cancelled before the end; a late resume is refused."""
        self.abandoned = True
        self.finish()

    def since(self, after: int) -> list[tuple[int, bytes]]:
        """The entries after sequence number `after`; ResumeExpired if some are gone."""
        if after + 1 < self.first_seq:
            raise ResumeExpired()
        skip = after + 1 - self.first_seq
        return [entry for i, entry in enumerate(self._entries) if i >= skip]

    def mark_delivered(self, seq: int) -> None:
        """A client was sent everything up to `seq`."""
        if seq > self.delivered:
            self.delivered = seq

    def attach(self, after: int) -> Reader:
        """A reader starting after `after` (ResumeExpired if that part is gone)."""
        self.since(after)
        reader = Reader(after)
        self.readers.append(reader)
        return reader

    def detach(self, reader: Reader) -> None:
        """The reader's client is gone."""
        if reader in self.readers:
            self.readers.remove(reader)
        self._caught_up.set()

    async def changed(self) -> None:
        """Wait until an event is appended or the log finishes."""
        self._changed.clear()
        await self._changed.wait()

    def lag(self) -> int:
        """How many events the slowest reader is behind."""
        if not self.readers:
            return 0
        return self.last_seq - min(reader.position for reader in self.readers)

    async def wait_for_readers(self, window: int) -> None:
        """Backpressure: wait while some reader is more than `window` events behind."""
        while self.lag() > window:
            self._caught_up.clear()
            await self._caught_up.wait()

    def advanced(self) -> None:
        """A reader moved forward (see `wait_for_readers`)."""
        self._caught_up.set()

    def _wake(self) -> None:
        self._changed.set()


class LogRegistry:
    """This replica's stream logs by id; a finished log is kept `retention` seconds."""

    def __init__(self, retention: float) -> None:
        self.retention = retention
        self.logs: dict[str, StreamLog] = {}

    def add(self, log: StreamLog) -> None:
        """Register a new log."""
        self.logs[log.stream_id] = log

    def get(self, stream_id: str) -> StreamLog | None:
        """The log with this id, if this replica has it."""
        return self.logs.get(stream_id)

    def retire(self, log: StreamLog) -> None:
        """The stream ended: forget its log after the retention period."""
        loop = asyncio.get_running_loop()
        loop.call_later(self.retention, self.logs.pop, log.stream_id, None)
