"""Latency meter: time to first token and inter-event gaps, recorded in the request context."""

from __future__ import annotations

import time
from dataclasses import dataclass

from gateway.context import RequestContext, StateKey
from gateway.plugin import Plugin
from gateway.sse import SSEEvent


@dataclass(slots=True)
class LatencyStats:
    """Per-request stream latency figures, in seconds. Read them from `LATENCY` in `on_end`."""

    ttft: float | None = None
    events: int = 0
    gap_count: int = 0
    gap_total: float = 0.0
    gap_max: float = 0.0
    duration: float | None = None
    _last: float | None = None

    @property
    def gap_mean(self) -> float | None:
        """Mean time between two consecutive events, or None with fewer than two."""
        return self.gap_total / self.gap_count if self.gap_count else None


LATENCY: StateKey[LatencyStats] = StateKey("latency")


class LatencyMeter(Plugin):
    """Records time to first token (request received to first event leaving the chain),
    inter-event gaps and duration in `ctx` under `LATENCY`."""

    name = "latency"

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.set(LATENCY, LatencyStats())

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        stats = ctx.get(LATENCY)
        if stats is None:
            return None
        now = time.perf_counter()
        if stats._last is None:
            stats.ttft = now - ctx.timing.received
        else:
            gap = now - stats._last
            stats.gap_count += 1
            stats.gap_total += gap
            if gap > stats.gap_max:
                stats.gap_max = gap
        stats._last = now
        stats.events += 1
        return None

    async def on_end(self, ctx: RequestContext) -> None:
        stats = ctx.get(LATENCY)
        if stats is None:
            return
        if ctx.timing.ended is not None:
            stats.duration = ctx.timing.ended - ctx.timing.received
        written = ctx.timing.first_event_written
        if written is not None and stats.ttft is not None:
            # The first event actually delivered can be later than the first one seen here
            # when a later plugin holds text back; the client's view is what counts.
            stats.ttft = max(stats.ttft, written - ctx.timing.received)
