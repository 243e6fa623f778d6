"""Resumable streams across replicas: each stream's log mirrored into a Redis Stream.

Keys, under `resumable.key_prefix` + `{stream id}` (braced: one Redis Cluster slot per
stream): the stream itself (entry id `<n>-0` holds
event n's bytes in field `d`; a last entry with field `end` marks the end), `:meta` (the
owner and the response headers) and `:reader` (a short lease a remote reader renews, which
keeps generation going past the grace period). Every key expires `grace + retention`
seconds after the last write, so a crashed replica leaves nothing behind for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import Callable
from typing import Any, cast

import aiohttp
import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, ResponseError

from gateway.config import ResumableConfig
from gateway.errors import GatewayError
from gateway.resume_errors import abandoned, error_event, expired, not_found
from gateway.sinks import sse_response
from gateway.streamlog import ResumeExpired, StreamLog

log = logging.getLogger("sluice.resume")

LEASE_MS = 5000  # a remote reader's lease; renewed every LEASE_MS / 2.5
BLOCK_MS = 1000  # longest XREAD wait before the reader checks the stream still exists
REDIS_ERRORS = (RedisError, OSError, TimeoutError)
# A failed write is retried after these pauses (seconds); then the mirror is broken, and
# marking the stream as unavailable is tried after BROKEN_MARK_RETRIES.
WRITE_RETRIES = (0.05, 0.2, 0.5)
WRITE_TIMEOUT = 0.5  # seconds per try of one batch
BROKEN_MARK_RETRIES = (0.5, 1.0, 2.0, 4.0)
ANNOUNCE_WAIT = 2.0  # longest wait for the stream's meta in Redis before its headers go out


def unavailable() -> GatewayError:
    """A stream that exists, but whose events could not be shared through Redis."""
    return GatewayError(
        503,
        "This stream exists, but its events could not be shared with other replicas; "
        "resume it on the replica that serves it, or send the request again.",
        type="server_error",
        code="stream_unavailable",
        headers={"Retry-After": "1"},
    )


def stream_key(prefix: str, stream_id: str) -> str:
    """The Redis Stream's key; the braces keep a stream's keys in one Redis Cluster slot."""
    return f"{prefix}{{{stream_id}}}"


class RedisStreams:
    """The Redis side of resumable streams for one replica."""

    def __init__(self, config: ResumableConfig) -> None:
        assert config.redis_url is not None
        self.config = config
        self.prefix = config.key_prefix
        self.ttl = int(config.grace_seconds + config.retention_seconds) + 5
        self.redis: Redis = Redis.from_url(
            config.redis_url.get_secret_value(), socket_connect_timeout=2.0
        )
        self.warned = False

    def mirror(self, log_: StreamLog) -> RedisMirror:
        """Start mirroring a new stream's log."""
        return RedisMirror(self, log_)

    async def close(self) -> None:
        """Close the connection pool."""
        await self.redis.aclose()

    def failed(self, what: str, err: BaseException) -> None:
        """Log a Redis failure once per incident (no URL, no secrets)."""
        if not self.warned:
            self.warned = True
            log.warning("resumable streams: Redis %s failed (%s)", what, type(err).__name__)

    async def tail(
        self, request: web.Request, stream_id: str, owner: str, after: int
    ) -> web.StreamResponse:
        """Serve a stream whose log lives on another replica, from after `after`."""
        key = stream_key(self.prefix, stream_id)
        meta: Any
        first: Any
        try:
            meta = await self.redis.hgetall(key + ":meta")
            first = await self.redis.xrange(key, "-", "+", count=1)
        except REDIS_ERRORS as err:
            self.failed("read", err)
            raise GatewayError(
                503,
                "Resumable streams are unavailable right now; retry.",
                type="server_error",
                code="resume_unavailable",
            ) from None
        if not meta or meta.get(b"owner", b"").decode() != owner:
            raise not_found()
        if meta.get(b"state") == b"broken":
            raise unavailable()
        if first:
            first_seq = int(first[0][0].split(b"-")[0])
            if first_seq > after + 1:
                raise expired()
        headers = orjson.loads(meta.get(b"headers", b"{}"))
        response = sse_response(request, headers)
        lease = asyncio.create_task(self._hold_lease(key + ":reader"))
        try:
            await response.prepare(request)
            ended = await self._pump(response, key, after)
            if ended is not None:
                await response.write(error_event(ended))
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass
        finally:
            lease.cancel()
        return response

    async def _pump(
        self, response: web.StreamResponse, key: str, after: int
    ) -> GatewayError | None:
        """Write entries after `after` until the end marker; an error if the log broke off."""
        position = after
        while True:
            reply: Any
            try:
                reply = await self.redis.xread({key: f"{position}-0"}, count=256, block=BLOCK_MS)
                if not reply and not await self.redis.exists(key):
                    return GatewayError(
                        502,
                        "The replica generating this stream went away.",
                        type="upstream_error",
                        code="stream_lost",
                    )
            except REDIS_ERRORS as err:
                self.failed("read", err)
                return GatewayError(
                    503,
                    "Lost the connection to the stream log.",
                    type="server_error",
                    code="resume_unavailable",
                )
            for _stream, entries in reply:
                chunk: list[bytes] = []
                for entry_id, fields in entries:
                    seq = int(entry_id.split(b"-")[0])
                    if b"end" in fields:
                        if chunk:
                            await response.write(b"".join(chunk))
                        return abandoned() if fields[b"end"] == b"abandoned" else None
                    if seq != position + 1:
                        return expired()  # trimmed past this reader: never a hole
                    chunk.append(fields[b"d"])
                    position = seq
                if chunk:
                    await response.write(b"".join(chunk))

    async def _hold_lease(self, reader_key: str) -> None:
        token = secrets.token_hex(8)
        while True:
            try:
                await self.redis.set(reader_key, token, px=LEASE_MS)
            except REDIS_ERRORS as err:
                self.failed("lease", err)
            await asyncio.sleep(LEASE_MS / 2500)


class RedisMirror:
    """Copies one stream's log into Redis, in order, from a single writer task.

    Every write is retried (WRITE_RETRIES) before the mirror gives up; then it keeps
    trying to mark the stream `broken` in its meta, so other replicas answer 503
    `stream_unavailable` rather than 404 for a stream that exists.
    """

    def __init__(self, streams: RedisStreams, log_: StreamLog) -> None:
        self.streams = streams
        self.log = log_
        self.key = stream_key(streams.prefix, log_.stream_id)
        self.written = 0  # last sequence number in Redis
        self._wake = asyncio.Event()
        self._wake.set()
        self.announced = asyncio.Event()  # the meta is in Redis (or the mirror gave up)
        self.task = asyncio.create_task(self._run())
        self.broken = False

    def changed(self) -> None:
        """The log grew or finished."""
        self._wake.set()

    async def wait_announced(self, within: float = ANNOUNCE_WAIT) -> None:
        """Wait (bounded) until other replicas can find the stream: before its id goes out."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self.announced.wait()

    async def reader_attached(self) -> bool:
        """Whether a reader on some replica holds a lease on this stream."""
        try:
            return bool(await self.streams.redis.exists(self.key + ":reader"))
        except REDIS_ERRORS as err:
            self.streams.failed("lease check", err)
            return False

    async def _write(self, fill: Callable[[Pipeline], None]) -> None:
        """Run one batch of writes, retried; raises the last error if every try failed.

        A retried batch may repeat entries that did land: Redis refuses those (an id not
        above the last one), which is what a retry wants.
        """
        for pause in (0.0, *WRITE_RETRIES):
            if pause:
                await asyncio.sleep(pause)
            pipe = self.streams.redis.pipeline(transaction=False)
            fill(pipe)
            try:
                async with asyncio.timeout(WRITE_TIMEOUT):
                    results = await pipe.execute(raise_on_error=False)
            except REDIS_ERRORS as err:
                failure: BaseException = err
                continue
            errors = [r for r in results if isinstance(r, Exception) and not _repeated(r)]
            if not errors:
                return
            failure = errors[0]
        raise failure

    async def _run(self) -> None:
        ttl, meta = self.streams.ttl, self.key + ":meta"
        head: dict[str, Any] = {"owner": self.log.owner, "headers": orjson.dumps(self.log.headers)}
        try:

            def announce(pipe: Pipeline) -> None:
                pipe.hset(meta, mapping=cast("Any", head))
                pipe.expire(meta, ttl)

            await self._write(announce)
            self.announced.set()
            while True:
                await self._wake.wait()
                self._wake.clear()
                try:
                    entries = self.log.since(self.written)
                except ResumeExpired:
                    entries = self.log.since(self.log.first_seq - 1)
                finished = self.log.finished
                await self._write(functools.partial(self._batch, entries, finished))
                if entries:
                    self.written = entries[-1][0]
                if finished:
                    return
        except REDIS_ERRORS as err:
            self.broken = True
            self.announced.set()
            self.streams.failed("write", err)
            await self._mark_broken(meta, head)

    def _batch(self, entries: list[tuple[int, bytes]], finished: bool, pipe: Pipeline) -> None:
        """The writes that bring Redis up to `entries` (and the end marker if finished)."""
        ttl, log_ = self.streams.ttl, self.log
        for seq, data in entries:
            pipe.xadd(self.key, {"d": data}, id=f"{seq}-0")
        if log_.first_seq > 1:
            pipe.xtrim(self.key, minid=f"{log_.first_seq}-0", approximate=False)
        if finished:
            end = b"abandoned" if log_.abandoned else b"1"
            pipe.xadd(self.key, {"end": end}, id=f"{log_.last_seq + 1}-0")
        pipe.expire(self.key, ttl)
        pipe.expire(self.key + ":meta", ttl)

    async def _mark_broken(self, meta: str, head: dict[str, Any]) -> None:
        """Tell other replicas the stream exists but cannot be resumed there (bounded)."""
        for pause in BROKEN_MARK_RETRIES:
            await asyncio.sleep(pause)
            try:
                pipe = self.streams.redis.pipeline(transaction=False)
                pipe.hset(meta, mapping=cast("Any", {**head, "state": "broken"}))
                pipe.expire(meta, self.streams.ttl)
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await pipe.execute()
                return
            except REDIS_ERRORS:
                continue


def _repeated(err: Exception) -> bool:
    """An XADD refused because the entry is in the stream already (a retried batch)."""
    return isinstance(err, ResponseError) and "equal or smaller" in str(err)
