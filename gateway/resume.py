"""Resumable streams: generation outlives a dropped connection; a client catches up by id.

A resumable request runs in its own task (`Proxy.handle` starts it), writing through a
`ResumableSink`: every event goes into the stream's `StreamLog` (and, with several
replicas, into Redis through `RedisMirror`) and on to the client while it is attached.
When the client drops, generation goes on for `grace_seconds`; a client that comes back
(`GET /v1/streams/{id}` with `Last-Event-ID`, on any replica) is sent every event after
that id, then the live rest. Past the grace period, or once an event no client was sent
has to be dropped from the bounded log, the upstream is cancelled as usual.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from gateway.auth import KeyStore, key_from_headers
from gateway.config import ResumableConfig
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.resume_errors import abandoned, error_event, expired, not_found
from gateway.sinks import ClientGone, HttpSink, sse_response
from gateway.sse import SSEEvent
from gateway.streamlog import (
    LogRegistry,
    Reader,
    ResumeExpired,
    StreamLog,
    new_stream_id,
    parse_event_id,
    valid_stream_id,
)

if TYPE_CHECKING:
    from gateway.resume_redis import RedisMirror

log = logging.getLogger("sluice.resume")

STREAM_ID_HEADER = "X-Sluice-Stream-Id"
RESUMABLE_HEADER = "X-Sluice-Resumable"
READER_WINDOW = 64  # events a resumed reader may fall behind before generation waits for it


def wants_resume(headers: Mapping[str, str]) -> bool:
    """The client asked for a resumable stream (`X-Sluice-Resumable: 1|true|yes`)."""
    return headers.get(RESUMABLE_HEADER, "").strip().lower() in ("1", "true", "yes")


class ResumableSink(HttpSink):
    """The first client of a resumable stream: writes go to the log, then to the client."""

    def __init__(
        self, request: web.Request, resumer: Resumer, ctx: RequestContext, *, requested: bool
    ) -> None:
        super().__init__(request)
        self.resumer = resumer
        self.ctx = ctx
        self.requested = requested  # by the request's header; the route may ask for it too
        self.log: StreamLog | None = None
        self.attached = True
        self.producer: asyncio.Task[object] | None = None  # cancelled when nobody comes back
        self._grace: asyncio.TimerHandle | None = None
        self.mirror: RedisMirror | None = None

    async def open(self, headers: Mapping[str, str]) -> bool:
        route = self.ctx.route
        if not (self.requested or (route is not None and route.resumable)):
            return await super().open(headers)  # a plain stream after all
        stream_id = new_stream_id()
        shown = {**headers, STREAM_ID_HEADER: stream_id}
        owner = self.ctx.identity.key_id or ""
        config = self.resumer.config
        self.log = StreamLog(stream_id, owner, shown, config.max_bytes)
        self.resumer.registry.add(self.log)
        if self.resumer.redis is not None:
            self.mirror = self.resumer.redis.mirror(self.log)
            await self.mirror.wait_announced()  # the id must be resumable anywhere once sent
        if not await super().open(shown):
            self.detach()
        return True  # the log is a client too: generation goes on

    async def send(self, events: list[SSEEvent]) -> int:
        log_ = self.log
        if log_ is None:
            return await super().send(events)
        data = log_.append(events)
        if self.mirror is not None:
            self.mirror.changed()
        if self.attached:
            try:
                await super().send_bytes(data)
                log_.mark_delivered(log_.last_seq)
            except ClientGone:
                self.detach()
        if log_.lost and not self.attached and not log_.readers:
            raise ClientGone()  # a resume could no longer be served without a hole
        await log_.wait_for_readers(READER_WINDOW)
        return len(data)

    async def close(self) -> bool:
        log_ = self.log
        if log_ is None:
            return await super().close()
        log_.finish()
        if self.mirror is not None:
            self.mirror.changed()
        self.resumer.registry.retire(log_)
        self._cancel_grace()
        if self.attached:
            return await super().close()
        return True

    def ended(self) -> None:
        """The producer task is over; if it never closed the log, it was abandoned."""
        self._cancel_grace()
        log_ = self.log
        if log_ is not None and not log_.finished:
            log_.abandon()
            if self.mirror is not None:
                self.mirror.changed()
            self.resumer.registry.retire(log_)

    def detach(self) -> None:
        """The first client is gone: keep generating for the grace period."""
        if not self.attached:
            return
        self.attached = False
        self._arm_grace()

    def _arm_grace(self) -> None:
        loop = asyncio.get_running_loop()
        self._grace = loop.call_later(self.resumer.config.grace_seconds, self._grace_over)

    def _cancel_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def _grace_over(self) -> None:
        self._grace = None
        log_ = self.log
        if log_ is None or log_.finished or self.producer is None:
            return
        if log_.readers:
            self._arm_grace()  # someone came back here; check again later
            return
        if self.mirror is not None:
            self.resumer.spawn(self._grace_over_remote())
            return
        self.producer.cancel()

    async def _grace_over_remote(self) -> None:
        assert self.mirror is not None
        if await self.mirror.reader_attached():
            self._arm_grace()
        elif self.producer is not None and not (self.log and self.log.finished):
            self.producer.cancel()


class Resumer:
    """Resumable streams of this replica: the sink factory and `GET /v1/streams/{id}`."""

    def __init__(
        self, config: ResumableConfig, keys: KeyStore | None, *, routes_opt_in: bool = False
    ) -> None:
        self.config = config
        self.keys = keys
        self.routes_opt_in = routes_opt_in  # some route makes every stream resumable
        self.registry = LogRegistry(config.retention_seconds)
        self.redis = None
        if config.redis_url is not None:
            from gateway.resume_redis import RedisStreams

            self.redis = RedisStreams(config)
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: object) -> None:
        """Run a small background job, keeping a reference until it is done."""
        assert asyncio.iscoroutine(coro)
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop background jobs and the Redis connection."""
        for task in list(self._tasks):
            task.cancel()
        if self.redis is not None:
            await self.redis.close()

    def _owner(self, headers: Mapping[str, str]) -> str:
        if self.keys is None:
            return ""
        return self.keys.authenticate(key_from_headers(headers)).key_id

    async def resume_by_event_id(self, request: web.Request) -> web.StreamResponse:
        """A request carrying `Last-Event-ID: rs_x.n` (the original POST again): resume rs_x."""
        last = request.headers["Last-Event-ID"]
        parsed = parse_event_id(last)
        stream_id = parsed[0] if parsed is not None and parsed[0] is not None else ""
        return await self.resume(request, stream_id, last)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/streams/{id}: replay after `Last-Event-ID` (or `?after=n`), then go live."""
        stream_id = request.match_info["stream_id"]
        after_text = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
        return await self.resume(request, stream_id, after_text)

    async def resume(
        self, request: web.Request, stream_id: str, after_text: str
    ) -> web.StreamResponse:
        """Serve stream `stream_id` from after the given event id."""
        try:
            owner = self._owner(request.headers)
            parsed = parse_event_id(after_text)
            if parsed is None or (parsed[0] is not None and parsed[0] != stream_id):
                raise GatewayError(
                    400,
                    "`Last-Event-ID` must be an event id of this stream, like rs_x.12.",
                    param="Last-Event-ID",
                    code="invalid_event_id",
                )
            after = parsed[1]
            if not valid_stream_id(stream_id):
                raise not_found()
            log_ = self.registry.get(stream_id)
            if log_ is not None:
                if log_.owner != owner:
                    raise not_found()
                return await self._tail_local(request, log_, after)
            if self.redis is not None:
                return await self.redis.tail(request, stream_id, owner, after)
            raise not_found()
        except GatewayError as err:
            return err.to_response()

    async def _tail_local(
        self, request: web.Request, log_: StreamLog, after: int
    ) -> web.StreamResponse:
        if log_.abandoned:
            raise abandoned()
        try:
            reader = log_.attach(after)
        except ResumeExpired:
            raise expired() from None
        response = sse_response(request, log_.headers)
        try:
            await response.prepare(request)
            await _pump_local(response, log_, reader)
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass
        finally:
            log_.detach(reader)
        return response


async def _pump_local(response: web.StreamResponse, log_: StreamLog, reader: Reader) -> None:
    while True:
        try:
            entries = log_.since(reader.position)
        except ResumeExpired:
            # This reader fell behind the size bound: end with an error, never a hole.
            await response.write(error_event(expired()))
            return
        if entries:
            await response.write(b"".join(data for _seq, data in entries))
            reader.position = entries[-1][0]
            log_.mark_delivered(reader.position)
            log_.advanced()
            continue
        if log_.finished:
            if log_.abandoned:
                await response.write(error_event(abandoned()))
            return
        await log_.changed()
