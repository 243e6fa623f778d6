"""The replay cache at the request level: serve a kept answer, or record the one that goes out.

`Proxy.serve` hands a request to `ReplayCache.serve` after admission and the chain's
`on_request` (so auth, rate limits and prompt filters apply to every request) when its
route opts in. A hit is streamed into the request's sink (or returned as the unary body)
without an upstream; a miss runs the attempts as usual through a `RecordingSink` that
keeps each write's events, their bytes and their offset from the first write, and the
answer is kept only if it completed (no error, no cut, not ended by a plugin) and fits
the size bound. What is kept is what the client got, in its own format, so every lane
(OpenAI chat and completions, Anthropic native and translated, Responses) works alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Final

from aiohttp import web
from prometheus_client import Counter

from gateway.context import Outcome, RequestContext, Usage
from gateway.overhead import OVERHEAD, OVERHEAD_HEADER, overhead_ms
from gateway.replay.config import ReplayConfig, RouteReplay
from gateway.replay.key import cacheable, request_key
from gateway.replay.marker import mark_body, mark_events
from gateway.replay.state import ENDED_EARLY, REPLAY
from gateway.replay.store import Entry, ReplayStore, StoredEvent, build_store
from gateway.sinks import ClientGone, StreamSink
from gateway.sse import SSEEvent

if TYPE_CHECKING:
    from gateway.chain import Chain
    from gateway.metrics import GatewayMetrics
    from gateway.proxy import Inbound, Served

CACHE_HEADER: Final = "X-Sluice-Cache"
BATCH: Final = 64  # events per write when replaying at once


def cache_directives(headers: Mapping[str, str]) -> set[str]:
    """The client's `Cache-Control` directives, lower-cased, without their values."""
    value = headers.get("Cache-Control", "")
    return {part.partition("=")[0].strip().lower() for part in value.split(",")} - {""}


class RecordingSink:
    """Passes a stream through to `inner`, keeping what went out (up to `limit` bytes)."""

    def __init__(self, inner: StreamSink, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.events: list[StoredEvent] = []
        self.size = 0
        self.overflow = False
        self.closed = False
        self._start: float | None = None

    @property
    def committed(self) -> bool:
        """The inner sink's."""
        return self.inner.committed

    @committed.setter
    def committed(self, value: bool) -> None:
        self.inner.committed = value

    async def open(self, headers: Mapping[str, str]) -> bool:
        return await self.inner.open(headers)

    async def send(self, events: list[SSEEvent]) -> int:
        sent = await self.inner.send(events)
        if not self.overflow:
            now = time.perf_counter()
            if self._start is None:
                self._start = now
            offset = now - self._start
            for event in events:
                raw, data = event.encode(), event.data_bytes
                self.size += len(raw) + len(data or b"") + 24
                if self.size > self.limit:
                    self.overflow = True
                    self.events.clear()
                    break
                self.events.append(StoredEvent(offset, event.event, data, raw))
        return sent

    async def close(self) -> bool:
        self.closed = await self.inner.close()
        return self.closed


def _kept(ctx: RequestContext) -> bool:
    """The answer completed as the upstream meant it: no error, no cut, no plugin's end."""
    return ctx.outcome is Outcome.COMPLETED and ctx.error is None and not ctx.get(ENDED_EARLY)


class ReplayCache:
    """The store, the request-level hook and `sluice_replay_cache_total`."""

    def __init__(self, config: ReplayConfig, metrics: GatewayMetrics) -> None:
        self.config = config
        self.store: ReplayStore = build_store(config)
        self.metrics = metrics
        self.counter = Counter(
            "sluice_replay_cache",
            "Replay cache results by route: hit, miss, bypass (client's Cache-Control), "
            "store (an answer kept), skip (a request or answer not cacheable).",
            ["route", "result"],
            registry=metrics.registry,
        )

    async def close(self) -> None:
        """Release the store."""
        await self.store.close()

    def _count(self, ctx: RequestContext, result: str) -> None:
        self.counter.labels(self.metrics.labels.model(ctx), result).inc()

    async def serve(
        self,
        ctx: RequestContext,
        inbound: Inbound,
        chain: Chain,
        attempts: Callable[[Inbound], Awaitable[Served]],
    ) -> Served:
        """Answer from the cache, or run `attempts` and keep the answer when it may be."""
        assert ctx.route is not None
        settings = ctx.route.replay
        if settings is None:
            return await attempts(inbound)
        key = request_key(ctx, shared=settings.shared) if cacheable(ctx) else None
        if key is None:
            self._count(ctx, "skip")
            return await attempts(inbound)
        directives = cache_directives(inbound.headers)
        no_store = "no-store" in directives
        result = "bypass" if no_store or "no-cache" in directives else "miss"
        if result == "miss":
            entry = await self.store.get(key)
            if entry is not None and entry.stream == ctx.stream:
                return await self._hit(ctx, inbound.sink, chain, entry, settings)
        ctx.set(REPLAY, result)
        ctx.response_headers[CACHE_HEADER] = result
        self._count(ctx, result)
        if no_store:
            return await attempts(inbound)
        limit = settings.max_entry_bytes or self.config.max_entry_bytes
        kept: Entry | None = None
        if ctx.stream:
            recorder = RecordingSink(inbound.sink, limit)
            served = await attempts(dataclasses.replace(inbound, sink=recorder))
            if _kept(ctx) and recorder.closed and not recorder.overflow and recorder.events:
                events = tuple(mark_events(recorder.events))
                kept = Entry(True, events, response_model=ctx.response_model)
        else:
            served = await attempts(inbound)
            body = served.body if isinstance(served, web.Response) else None
            if _kept(ctx) and isinstance(body, bytes) and len(body) <= limit:
                kept = Entry(False, body=mark_body(body), response_model=ctx.response_model)
        stored = kept is not None and await self.store.put(key, kept)
        self._count(ctx, "store" if stored else "skip")
        return served

    async def _hit(
        self,
        ctx: RequestContext,
        sink: StreamSink,
        chain: Chain,
        entry: Entry,
        settings: RouteReplay,
    ) -> Served:
        """Serve `entry`: no upstream, no tokens, cost 0."""
        ctx.set(REPLAY, "hit")
        ctx.response_headers[CACHE_HEADER] = "hit"
        self._count(ctx, "hit")
        ctx.usage = Usage(0, 0, 0, source="cache")
        ctx.response_model = entry.response_model
        overhead = ctx.require(OVERHEAD)
        if not entry.stream:
            ctx.outcome = Outcome.COMPLETED
            ctx.bytes_out = len(entry.body)
            ctx.overhead_seconds = overhead.answered = overhead.now(ctx)
            return web.Response(
                body=entry.body,
                content_type="application/json",
                headers={
                    "X-Request-Id": ctx.request_id,
                    **ctx.response_headers,
                    OVERHEAD_HEADER: overhead_ms(ctx.overhead_seconds),
                },
            )
        await chain.run_response_start(ctx)
        ctx.overhead_seconds = overhead.answered = overhead.now(ctx)
        headers = {
            "X-Request-Id": ctx.request_id,
            **ctx.response_headers,
            OVERHEAD_HEADER: overhead_ms(ctx.overhead_seconds),
        }
        if not await sink.open(headers):
            ctx.outcome = Outcome.CLIENT_DISCONNECTED
            return None
        ctx.timing.response_started = time.perf_counter()
        self.metrics.stream_started(ctx)
        try:
            if settings.pacing == "original":
                await self._paced(ctx, sink, entry.events)
            else:
                for i in range(0, len(entry.events), BATCH):
                    await _send(ctx, sink, entry.events[i : i + BATCH])
            closed = await sink.close()
        except ClientGone:
            closed = False
        finally:
            self.metrics.stream_ended(ctx)
        ctx.outcome = Outcome.COMPLETED if closed else Outcome.CLIENT_DISCONNECTED
        return None

    async def _paced(
        self, ctx: RequestContext, sink: StreamSink, events: tuple[StoredEvent, ...]
    ) -> None:
        """Each recorded write again, after its recorded gap (at most `max_gap_seconds`)."""
        cap = self.config.max_gap_seconds
        previous = 0.0
        i = 0
        while i < len(events):
            offset = events[i].offset
            j = i
            while j < len(events) and events[j].offset == offset:
                j += 1
            gap = min(max(0.0, offset - previous), cap)
            if gap > 0:
                await asyncio.sleep(gap)
            await _send(ctx, sink, events[i:j])
            previous = offset
            i = j


async def _send(ctx: RequestContext, sink: StreamSink, stored: tuple[StoredEvent, ...]) -> None:
    events = [SSEEvent(e.data, event=e.event, raw=e.raw) for e in stored]
    sent = await sink.send(events)
    now = time.perf_counter()
    timing = ctx.timing
    if timing.first_event_written is None:
        timing.first_event_written = now
    timing.last_event_written = now
    ctx.events_out += len(events)
    ctx.bytes_out += sent
