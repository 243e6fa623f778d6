"""Stored Responses: what `previous_response_id`, GET and DELETE need, per caller.

A record holds the Response object and the conversation that led to it (every input
item, earlier turns expanded), so a follow-up is one lookup: its conversation is the
record's input plus the record's output. Records are scoped to the caller's team: another
team's id is not found. Bounded: `retention_seconds` from creation, and in memory at most
`max_entries` records and `max_bytes` bytes (the oldest go first); a conversation larger
than `max_entry_bytes` is not stored.

`put` is synchronous: the memory store writes at once; the Redis store writes in a task it
holds, and a `get` on this replica waits for a pending write of the same id, so a client
that follows up the moment it read `response.completed` finds its response. (A follow-up
sent to another replica within that write's round trip may not.)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import orjson

from gateway.protocols.responses.config import ResponsesConfig
from gateway.protocols.responses.types import Item, Response

log = logging.getLogger("sluice.responses")

__all__ = ["MemoryStore", "RedisStore", "ResponseStore", "StoredResponse", "build_store"]


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """One kept Response: whose it is, the Response, and the conversation before it.

    A Response a native upstream holds is kept as a pointer: `upstream` names the adapter
    that answered it, `response` holds only its id, `input` is empty (the upstream keeps
    the conversation; follow-ups, GET and DELETE go there)."""

    scope: str
    response: Response
    input: list[Item]
    upstream: str | None = None

    @property
    def id(self) -> str:
        """The Response's id."""
        return self.response["id"]

    def conversation(self) -> list[Item]:
        """What a follow-up continues: the input items, then this response's output."""
        return [*self.input, *self.response["output"]]

    def encode(self) -> bytes:
        """The record as JSON."""
        obj: dict[str, Any] = {"scope": self.scope, "response": self.response, "input": self.input}
        if self.upstream is not None:
            obj["upstream"] = self.upstream
        return orjson.dumps(obj)

    @classmethod
    def decode(cls, raw: bytes) -> StoredResponse | None:
        """A record from JSON; None for anything else (a foreign or damaged value)."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("response"), dict):
            return None
        scope, items = obj.get("scope"), obj.get("input")
        if not isinstance(scope, str) or not isinstance(items, list):
            return None
        upstream = obj.get("upstream")
        return cls(
            scope,
            cast(Response, obj["response"]),
            cast("list[Item]", items),
            upstream if isinstance(upstream, str) else None,
        )


class ResponseStore(Protocol):
    """Where stored Responses live."""

    def put(self, record: StoredResponse) -> None:
        """Keep `record` (dropped if it is larger than an entry may be)."""
        ...

    async def get(self, scope: str, response_id: str) -> StoredResponse | None:
        """The record, if it exists, is `scope`'s and has not expired."""
        ...

    async def delete(self, scope: str, response_id: str) -> bool:
        """Forget the record; False if there was none for `scope`."""
        ...

    async def close(self) -> None:
        """Finish pending writes and release connections."""
        ...


class MemoryStore:
    """Records in this process, oldest first; bounded by count, bytes and retention."""

    def __init__(
        self, config: ResponsesConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._records: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # id -> (expiry, raw)
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._records)

    def put(self, record: StoredResponse) -> None:
        raw = record.encode()
        if len(raw) > self.config.max_entry_bytes:
            log.info(
                "response %s not stored: %d bytes is over max_entry_bytes", record.id, len(raw)
            )
            return
        self._drop(record.id)
        self._records[record.id] = (self._clock() + self.config.retention_seconds, raw)
        self.bytes += len(raw)
        self._evict()

    def _drop(self, response_id: str) -> None:
        old = self._records.pop(response_id, None)
        if old is not None:
            self.bytes -= len(old[1])

    def _evict(self) -> None:
        now = self._clock()
        config = self.config
        while self._records:
            oldest_id, (expiry, _raw) = next(iter(self._records.items()))
            over = len(self._records) > config.max_entries or self.bytes > config.max_bytes
            if not over and expiry > now:
                return
            self._drop(oldest_id)

    def _live(self, scope: str, response_id: str) -> StoredResponse | None:
        entry = self._records.get(response_id)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._drop(response_id)
            return None
        record = StoredResponse.decode(entry[1])
        return record if record is not None and record.scope == scope else None

    async def get(self, scope: str, response_id: str) -> StoredResponse | None:
        return self._live(scope, response_id)

    async def delete(self, scope: str, response_id: str) -> bool:
        if self._live(scope, response_id) is None:
            return False
        self._drop(response_id)
        return True

    async def close(self) -> None:
        self._records.clear()
        self.bytes = 0


class RedisStore:
    """Records in Redis, one key per response with the retention as its TTL, shared by
    every replica. A Redis failure is logged; the response is then not stored."""

    def __init__(self, config: ResponsesConfig) -> None:
        from redis.asyncio import Redis  # the redis client loads only when configured

        assert config.redis_url is not None
        self.config = config
        self.redis: Any = Redis.from_url(
            config.redis_url.get_secret_value(), socket_connect_timeout=2.0
        )
        self._pending: dict[str, asyncio.Task[None]] = {}

    def _key(self, response_id: str) -> str:
        return f"{self.config.key_prefix}{response_id}"

    def put(self, record: StoredResponse) -> None:
        raw = record.encode()
        if len(raw) > self.config.max_entry_bytes:
            log.info(
                "response %s not stored: %d bytes is over max_entry_bytes", record.id, len(raw)
            )
            return
        task = asyncio.get_running_loop().create_task(self._write(record.id, raw))
        self._pending[record.id] = task
        task.add_done_callback(functools.partial(self._written, record.id))

    def _written(self, response_id: str, task: asyncio.Task[None]) -> None:
        if self._pending.get(response_id) is task:
            del self._pending[response_id]

    async def _write(self, response_id: str, raw: bytes) -> None:
        ttl_ms = max(1, int(self.config.retention_seconds * 1000))
        try:
            await self.redis.set(self._key(response_id), raw, px=ttl_ms)
        except Exception as err:  # RedisError, OSError: the response is just not kept
            log.warning("storing response %s in Redis failed: %s", response_id, type(err).__name__)

    async def get(self, scope: str, response_id: str) -> StoredResponse | None:
        pending = self._pending.get(response_id)
        if pending is not None:
            await asyncio.shield(pending)
        raw = await self.redis.get(self._key(response_id))
        record = StoredResponse.decode(raw) if isinstance(raw, bytes) else None
        return record if record is not None and record.scope == scope else None

    async def delete(self, scope: str, response_id: str) -> bool:
        if await self.get(scope, response_id) is None:
            return False
        return bool(await self.redis.delete(self._key(response_id)))

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending.values(), return_exceptions=True)
        await self.redis.aclose()


def build_store(config: ResponsesConfig) -> ResponseStore:
    """The store the config asks for."""
    if config.store == "redis":
        return RedisStore(config)
    return MemoryStore(config)
