"""Where replayed answers live: a bounded in-memory LRU, or Redis shared by replicas.

An `Entry` is what the client got: a stream's events (each with its wire bytes and its
offset from the first write) or a unary body, already marked as cached (see
`gateway.replay.marker`). Redis holds the `encode`d form under `<prefix><key>` with a TTL.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, Protocol

import orjson

from gateway.replay.config import ReplayConfig

log = logging.getLogger("sluice.replay")

_MAGIC: Final = b"SR1"
_HEAD: Final = struct.Struct("!dHII")  # offset, name length, data length, raw length
_NO_DATA: Final = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event as it left the gateway: seconds after the first write, name, data, bytes."""

    offset: float
    event: str | None
    data: bytes | None
    raw: bytes


@dataclass(frozen=True, slots=True)
class Entry:
    """One kept answer: `events` for a stream, `body` for a unary answer."""

    stream: bool
    events: tuple[StoredEvent, ...] = ()
    body: bytes = b""
    response_model: str | None = None

    @property
    def size(self) -> int:
        """Bytes held (what the size bounds count)."""
        if not self.stream:
            return len(self.body)
        return sum(len(e.raw) + len(e.data or b"") + 24 for e in self.events)


def encode(entry: Entry) -> bytes:
    """The entry as bytes (for Redis)."""
    meta = orjson.dumps({"stream": entry.stream, "model": entry.response_model})
    parts = [_MAGIC, struct.pack("!I", len(meta)), meta]
    if not entry.stream:
        parts.append(entry.body)
        return b"".join(parts)
    parts.append(struct.pack("!I", len(entry.events)))
    for event in entry.events:
        name = event.event.encode() if event.event is not None else b""
        data_len = _NO_DATA if event.data is None else len(event.data)
        parts.append(_HEAD.pack(event.offset, len(name), data_len, len(event.raw)))
        parts.extend((name, event.data or b"", event.raw))
    return b"".join(parts)


def decode(blob: bytes) -> Entry | None:
    """An entry from `encode`'s bytes; None if they are not one (another version)."""
    try:
        if not blob.startswith(_MAGIC):
            return None
        pos = len(_MAGIC)
        (meta_len,) = struct.unpack_from("!I", blob, pos)
        pos += 4
        meta = orjson.loads(blob[pos : pos + meta_len])
        pos += meta_len
        model = meta.get("model")
        model = model if isinstance(model, str) else None
        if not meta.get("stream"):
            return Entry(False, body=blob[pos:], response_model=model)
        (count,) = struct.unpack_from("!I", blob, pos)
        pos += 4
        events = []
        for _ in range(count):
            offset, name_len, data_len, raw_len = _HEAD.unpack_from(blob, pos)
            pos += _HEAD.size
            name = blob[pos : pos + name_len].decode() if name_len else None
            pos += name_len
            data = None
            if data_len != _NO_DATA:
                data = blob[pos : pos + data_len]
                pos += data_len
            raw = blob[pos : pos + raw_len]
            pos += raw_len
            events.append(StoredEvent(offset, name, data, raw))
        if pos != len(blob):
            return None
        return Entry(True, tuple(events), response_model=model)
    except (struct.error, orjson.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


class ReplayStore(Protocol):
    """Keeps entries by key for `ttl_seconds`."""

    async def get(self, key: str) -> Entry | None:
        """The entry under `key`, or None (missing, expired, or the store failed)."""
        ...

    async def put(self, key: str, entry: Entry) -> bool:
        """Keep `entry` under `key`; False if it was not kept."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryStore:
    """This replica's answers: LRU bounded in entries and bytes, each with a TTL."""

    def __init__(self, config: ReplayConfig) -> None:
        self.ttl = config.ttl_seconds
        self.max_entries = config.max_entries
        self.max_bytes = config.max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[Entry, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        entry, expires = found
        if expires <= time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    async def put(self, key: str, entry: Entry) -> bool:
        size = entry.size
        if size > self.max_bytes:
            return False
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (entry, time.monotonic() + self.ttl)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def _drop(self, key: str) -> None:
        entry, _ = self._entries.pop(key)
        self.bytes -= entry.size

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0


class RedisStore:
    """Answers shared by every replica: one Redis string per key, expiring after the TTL.

    A Redis that fails or is slow is a miss (and a store not made), logged, never an error
    to the client.
    """

    def __init__(self, config: ReplayConfig, *, timeout: float = 2.0) -> None:
        from redis.asyncio import Redis  # only with a redis_url: memory needs no client

        assert config.redis_url is not None
        self.prefix = config.key_prefix
        self.ttl_ms = max(1, int(config.ttl_seconds * 1000))
        self.redis: Redis = Redis.from_url(
            config.redis_url.get_secret_value(),
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
        )

    async def get(self, key: str) -> Entry | None:
        from redis.exceptions import RedisError

        try:
            blob = await self.redis.get(self.prefix + key)
        except (RedisError, OSError) as err:
            log.warning("replay cache: Redis read failed: %s", type(err).__name__)
            return None
        if not isinstance(blob, bytes):
            return None
        return decode(blob)

    async def put(self, key: str, entry: Entry) -> bool:
        from redis.exceptions import RedisError

        try:
            await self.redis.set(self.prefix + key, encode(entry), px=self.ttl_ms)
        except (RedisError, OSError) as err:
            log.warning("replay cache: Redis write failed: %s", type(err).__name__)
            return False
        return True

    async def close(self) -> None:
        await self.redis.aclose()


def build_store(config: ReplayConfig) -> ReplayStore:
    """Redis when `redis_url` is set, else memory."""
    if config.redis_url is not None:
        return RedisStore(config)
    return MemoryStore(config)
