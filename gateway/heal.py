"""Stream healing: a stream that breaks mid-answer is continued by a deployment, into the
same client stream (opt-in per route, `heal:`; see docs/streaming.md).

The relay (`gateway.stream.StreamRelay`) calls `StreamHealer.resume` with the failure that
would end the stream. When the failure is one a continuation can mend and what the client
got can be continued (`gateway.heal_lanes`), the healer picks a deployment (another one
first, else the same after a backoff), sends the original request plus the text so far as
the start of the assistant's reply (`Upstream.continuation`), reads its first events within
`max_gap_seconds`, and hands the relay the new call; the chain's state carries on (no
second `on_request`, one `on_end`). A heal that fails leaves the relay to end the stream
with the usual final error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gateway.balancer import Slot, backoff_delay
from gateway.config import HealConfig, ServerConfig
from gateway.context import LOCAL_COUNT, Endpoint, Outcome, RequestContext, StateKey, Usage
from gateway.errors import GatewayError
from gateway.heal_lanes import (
    AnthropicTranscript,
    OpenAITranscript,
    SeamObserver,
    Spent,
    Transcript,
)
from gateway.protocols import ANTHROPIC, OPENAI
from gateway.routing import Target, UpstreamHealth
from gateway.sse import SSEEvent
from gateway.stream import StreamFailed
from gateway.upstreams.base import Batch, Upstream, UpstreamCall
from gateway.watchdog import Watchdog

if TYPE_CHECKING:
    from gateway.stream import StreamRelay

__all__ = ["HEALED", "HEAL_HEADER", "HealRecord", "StreamHealer", "transcript_for"]

log = logging.getLogger("sluice.heal")

HEAL_HEADER = "X-Sluice-Heal"
"""Sent as `enabled` on streams that may heal; the seam is an SSE comment `: sluice-healed`."""

# StreamFailed kinds a continuation can mend (a drain, a plugin's reject, the client
# leaving and a total timeout are not among them).
_MENDABLE = frozenset({"broken", "in_band", "truncated", "malformed", "timeout"})
_MENDABLE_TIMEOUTS = frozenset({"idle", "first_byte"})


@dataclass(slots=True)
class HealRecord:
    """What healing did to one stream (the access log's `healed`, `heal_gap_ms`)."""

    heals: int = 0  # continuations that took over the stream
    gap_seconds: float = 0.0  # from the breaks to the continuations' first events, summed
    failed: int = 0  # continuations that could not be opened or broke in turn


HEALED: StateKey[HealRecord] = StateKey("healed")


def transcript_for(ctx: RequestContext) -> Transcript | None:
    """A transcript when `ctx` is a stream its route heals and its lane and request allow."""
    route, body = ctx.route, ctx.body
    if route is None or route.heal is None or not ctx.stream or ctx.endpoint is not Endpoint.CHAT:
        return None
    if ctx.client_format == OPENAI and ctx.wire == OPENAI:
        if body.get("n") not in (None, 1) or body.get("logprobs") or body.get("top_logprobs"):
            return None
        return OpenAITranscript()
    if ctx.client_format == ANTHROPIC and ctx.wire == ANTHROPIC:
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") == "enabled":
            return None  # a prefill cannot follow thinking blocks
        return AnthropicTranscript()
    return None  # translated lanes: not yet


Shape = Callable[[dict[str, Any]], dict[str, Any]]
Send = Callable[[Upstream, Shape], Awaitable[UpstreamCall]]
"""The proxy's way to send one attempt: its outgoing body (through `shape`) and headers."""


@dataclass(slots=True)
class _Leg:
    """One continuation's hold on its upstream, released when the stream ends."""

    health: UpstreamHealth
    slot: Slot | None
    call: UpstreamCall | None = None
    watchdog: Watchdog | None = None


class HealMetrics(Protocol):
    """What the healer reports (GatewayMetrics)."""

    def upstream_error(self, upstream: str | None, kind: str) -> None: ...

    def stream_heal(self, route: str, result: str, gap_seconds: float | None) -> None: ...


@dataclass
class StreamHealer:
    """Heals one stream: at most `config.max_attempts` continuations."""

    ctx: RequestContext
    config: HealConfig
    server: ServerConfig
    transcript: Transcript
    targets: Sequence[Target]
    health: Mapping[str, UpstreamHealth]
    adapter: Callable[[str], Upstream]
    send: Send
    acquire: Callable[[UpstreamHealth], Awaitable[Slot | None]]
    metrics: HealMetrics
    record: HealRecord = field(default_factory=HealRecord)
    _spent: Spent = field(default_factory=Spent)
    _legs: list[_Leg] = field(default_factory=list)

    def delivered(self, events: list[SSEEvent]) -> None:
        """Events that left the chain for the client."""
        self.transcript.delivered(events)

    async def resume(self, relay: StreamRelay, failed: StreamFailed) -> bool:
        """Continue the stream after `failed`; True if the relay now reads a continuation."""
        ctx = self.ctx
        broken = ctx.upstream_name or ""
        mendable = self._mendable(relay, failed)
        if mendable or (self.record.heals and failed.kind in _MENDABLE):
            # the broken upstream's failure; a continuation that broke in turn counts
            # against its own even when no heal is left (the proxy counts no healed stream)
            self._count_failure(broken)
        if not mendable:
            return False
        self.metrics.upstream_error(broken, failed.kind)
        relay.call.abort()
        relay.watchdog.cancel()
        self._settle(relay)
        began = time.perf_counter()
        while self.record.heals + self.record.failed < self.config.max_attempts:
            try:
                async with asyncio.timeout(self.config.max_gap_seconds):
                    if await self._continue(relay, broken):
                        gap = time.perf_counter() - began
                        self.record.heals += 1
                        self.record.gap_seconds += gap
                        ctx.set(HEALED, self.record)
                        await relay.seam_comment(
                            f" sluice-healed attempt={self.record.heals + 1} "
                            f"gap_ms={round(gap * 1000)}"
                        )
                        return True
                self.record.failed += 1  # no deployment can continue it
                ctx.set(HEALED, self.record)
                return False
            except (TimeoutError, GatewayError, StreamFailed) as err:
                log.warning("heal failed (request %s): %s", ctx.request_id, err)
                self._count_failure(ctx.upstream_name or "")
            self.record.failed += 1
            ctx.set(HEALED, self.record)
        return False

    def _mendable(self, relay: StreamRelay, failed: StreamFailed) -> bool:
        if failed.kind not in _MENDABLE or not self.transcript.healable:
            return False
        if failed.kind == "timeout" and relay.watchdog.fired not in _MENDABLE_TIMEOUTS:
            return False
        return self.record.heals + self.record.failed < self.config.max_attempts

    def _count_failure(self, upstream: str) -> None:
        health = self.health.get(upstream)
        if health is not None:
            health.failures += 1
            health.breaker.record_failure()

    def _settle(self, relay: StreamRelay) -> None:
        """What the broken attempt cost: its upstream's report, else the local count."""
        ctx = self.ctx
        relay.observer.finish(ctx)
        usage, local = ctx.usage, ctx.get(LOCAL_COUNT)
        if usage.source == "upstream":
            self._spent.prompt += usage.prompt_tokens or 0
            self._spent.completion += usage.completion_tokens or 0
        elif local is not None:
            self._spent.prompt += local.prompt_tokens
            self._spent.completion += local.completion_tokens - self._spent.completion
        ctx.usage = Usage()

    def _choose(self, broken: str) -> list[Target]:
        others = [t for t in self.targets if t.upstream != broken]
        same = [t for t in self.targets if t.upstream == broken][:1]
        return [*others, *same]

    async def _continue(self, relay: StreamRelay, broken: str) -> bool:
        """Open a continuation on the first deployment that takes one; False if none does."""
        ctx, text = self.ctx, self.transcript.text
        for target in self._choose(broken):
            upstream = self.adapter(target.upstream)
            health = self.health[target.upstream]
            probe = upstream.continuation(dict(ctx.body), text)
            if probe is None or not health.breaker.allow():
                continue
            if target.upstream == broken:
                await asyncio.sleep(backoff_delay(self.record.failed))
            ctx.upstream_name, ctx.upstream_model = target.upstream, target.model
            await self._take(relay, target.upstream, upstream, health, probe.withheld)
            return True
        return False

    async def _take(
        self,
        relay: StreamRelay,
        name: str,
        upstream: Upstream,
        health: UpstreamHealth,
        withheld: str,
    ) -> None:
        """Send the continuation to `upstream` and hand the relay its first events."""
        text = self.transcript.text
        seam = self.transcript.seam(self._spent, withheld)
        leg = _Leg(health, await self.acquire(health))
        self._legs.append(leg)
        health.outstanding += 1
        leg.call = call = await self.send(upstream, lambda body: _shape(upstream, body, text))
        loop = asyncio.get_running_loop()
        leg.watchdog = watchdog = Watchdog(loop, upstream.timeouts, loop.time())
        watchdog.attach(call)
        decoder, observer = upstream.stream_parts(self.ctx, self.server)
        relay.restart(call, decoder, SeamObserver(observer, seam), watchdog, seam.rewrite)
        relay.upstream_failed = lambda kind: self.metrics.upstream_error(name, kind)
        first = await relay.first_batch()
        if first.error is not None and not first.has_data:
            raise first.error
        relay.set_first(Batch(seam.rewrite(first.events), first.terminal, first.error))

    def close(self, ctx: RequestContext) -> None:
        """The stream ended: release continuations, sum usage, record the outcome."""
        for leg in self._legs:
            if leg.call is not None:
                leg.call.abort()
            if leg.watchdog is not None:
                leg.watchdog.cancel()
            leg.health.outstanding -= 1
            if leg.slot is not None:
                leg.slot.release()
        if self.record.heals == 0 and self.record.failed == 0:
            return
        if ctx.usage.source == "upstream":
            usage = ctx.usage
            usage.prompt_tokens = (usage.prompt_tokens or 0) + self._spent.prompt
            usage.completion_tokens = (usage.completion_tokens or 0) + self._spent.completion
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        route = ctx.route.name if ctx.route is not None else ""
        ok = ctx.outcome not in (Outcome.UPSTREAM_ERROR, Outcome.TIMEOUT, Outcome.ERROR)
        if self.record.heals and ok:
            health = self.health.get(ctx.upstream_name or "")
            if health is not None:
                health.successes += 1
                health.breaker.record_success()
        gap = self.record.gap_seconds if self.record.heals else None
        self.metrics.stream_heal(route, "ok" if ok and self.record.heals else "failed", gap)


def _shape(upstream: Upstream, body: dict[str, Any], text: str) -> dict[str, Any]:
    continuation = upstream.continuation(body, text)
    assert continuation is not None  # probed before sending
    return continuation.body
