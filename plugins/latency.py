"""Latency meter: time to first token, inter-token gaps, tokens/s and the gateway's own time.

Its figures are published under `LATENCY` (all of them) and `gateway.context.STREAM_LATENCY`
(what the core's time-to-first-token metrics read); it declares the inter-token latency
histogram `sluice_inter_token_latency_seconds` (by route), filled once per request.

Put it last in the chain: it timestamps events as they leave the chain, right before they
are written, so a plugin that holds text back (a content filter) delays what it measures
exactly as it delays the client. Events that leave together (one upstream read, written in
one go) share one timestamp: the gap between them is 0, which is what the client sees.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Final

from gateway.context import STREAM_LATENCY, RequestContext, StateKey
from gateway.deltas import event_texts, text_delta
from gateway.plugin import BucketCounts, Plugin, PluginMetrics
from gateway.sse import SSEEvent

# Upper bounds (seconds) of the buckets `LatencyStats.gap_buckets` counts gaps into; the
# gateway's inter-token latency histogram uses the same bounds (one bisect per event here,
# merged into the histogram once per request: nothing per event touches the metrics).
GAP_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


def _empty_buckets() -> list[int]:
    return [0] * (len(GAP_BUCKETS) + 1)


@dataclass(slots=True)
class LatencyStats:
    """Per-request stream latency figures in seconds; complete once `on_end` ran."""

    ttft: float | None = None  # request received -> first event carrying generated text
    events: int = 0  # data events after the first token
    gap_count: int = 0
    gap_total: float = 0.0
    gap_max: float = 0.0
    # gap counts per GAP_BUCKETS bucket (not cumulative; the last one is above 5 s)
    gap_buckets: list[int] = field(default_factory=_empty_buckets)
    duration: float | None = None  # request received -> request ended
    time_per_output_token: float | None = None
    tokens_per_second: float | None = None
    overhead: float = 0.0  # the gateway's own time (ctx.overhead_seconds; docs/metrics.md)
    overhead_per_event: float | None = None
    _first: float | None = None
    _last: float | None = None

    @property
    def gap_mean(self) -> float | None:
        """Mean time between two consecutive events after the first token."""
        return self.gap_total / self.gap_count if self.gap_count else None


LATENCY: StateKey[LatencyStats] = StateKey("latency")
_MERGED: StateKey[LatencyStats] = StateKey("latency.merged")  # into the histogram already


class LatencyMeter(Plugin):
    """Records `LatencyStats` in the request context under `LATENCY`."""

    name = "latency"
    _itl: BucketCounts | None = None  # set by declare_metrics (in a gateway, or a test kit)

    def declare_metrics(self, metrics: PluginMetrics) -> None:
        self._itl = metrics.bucket_counts(
            "sluice_inter_token_latency_seconds",
            "Time between two consecutive streamed events after the first token "
            "(measured by the latency plugin as events leave the chain).",
            ["model"],
            buckets=GAP_BUCKETS,
        )

    async def on_request(self, ctx: RequestContext) -> None:
        stats = LatencyStats()
        ctx.set(LATENCY, stats)
        ctx.set(STREAM_LATENCY, stats)

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        return self.on_events(ctx, [event])

    def on_events(self, ctx: RequestContext, events: list[SSEEvent]) -> list[SSEEvent] | None:
        """One timestamp per batch: its events leave the chain, and are written, together."""
        stats = ctx.get(LATENCY)
        if stats is None:
            return None
        data = len(events)
        for event in events:
            if event.data_bytes is None:  # a keep-alive comment
                data -= 1
        now = time.perf_counter()
        if stats._last is None:
            data = self._first_token(ctx, stats, events, data, now)
        if not data:
            return None
        gap = now - stats._last  # type: ignore[operator]  # set by the first token
        stats.gap_count += data
        stats.gap_total += gap
        if gap > stats.gap_max:
            stats.gap_max = gap
        buckets = stats.gap_buckets
        buckets[bisect_left(GAP_BUCKETS, gap)] += 1
        buckets[0] += data - 1  # the others of the batch: 0 s after it
        stats._last = now
        stats.events += data
        return None

    @staticmethod
    def _first_token(
        ctx: RequestContext, stats: LatencyStats, events: list[SSEEvent], data: int, now: float
    ) -> int:
        """Look for the first token (role-only chunks are none); the data events after it."""
        for event in events:
            if event.data_bytes is not None:
                data -= 1
                if text_delta(ctx, event) is not None or event_texts(ctx, event):
                    stats.ttft = now - ctx.timing.received
                    stats._first = stats._last = now
                    stats.events += 1
                    return data
        return 0

    async def on_end(self, ctx: RequestContext) -> None:
        stats = ctx.get(LATENCY)
        if stats is None:
            return
        if ctx.timing.ended is not None:
            stats.duration = ctx.timing.ended - ctx.timing.received
        stats.overhead = ctx.overhead_seconds
        if ctx.events_in:
            stats.overhead_per_event = ctx.overhead_seconds / ctx.events_in
        tokens = ctx.usage.completion_tokens or stats.events
        if stats._first is not None and stats._last is not None and tokens > 1:
            span = stats._last - stats._first
            stats.time_per_output_token = span / (tokens - 1)
            if span > 0:
                stats.tokens_per_second = (tokens - 1) / span
        itl = self._itl
        # Once per request, if the plugin is in the chain twice.
        if itl is not None and ctx.stream and stats.gap_count and ctx.get(_MERGED) is not stats:
            ctx.set(_MERGED, stats)
            itl.merge(ctx, stats.gap_buckets, stats.gap_total)
