"""Rate limits per team, per key and per team+model: requests, tokens, streams, budgets.

Token limits hold for streams: at admission the request reserves its prompt tokens (from
`token_count` when it runs earlier in the chain, else an estimate) plus `max_tokens` (or
`default_max_tokens`); at the end the reservation is reconciled with what was really used
(the upstream's usage, else the local count) and the rest released, on every ending. While
a stream runs, the tokens it used beyond its reservation are debited (in batches of at
least `debit_every_tokens` and `debit_every_seconds`, at most one in flight, never awaited
on the per-event path), so other replicas' admissions see them even when an upstream
ignores `max_tokens`. With `hard_budget`, a stream whose daily/monthly budget runs out is
cut with a final error event. Limits come from the authenticated key's team and key
(`auth: keys`); with `auth: none` nothing is limited. Budgets in currency
(`cost_per_day`, `cost_per_month`) are reserved, debited and reconciled the same way in
micro-units of the pricing currency (see `plugins.rate_limit.cost_budget`).

Backends: `memory` for one replica, `redis` to share limits across replicas (one atomic
Lua script per check). See `plugins.rate_limit.limiter` for the algorithms (GCRA for per-minute
limits, calendar windows for budgets, leased slots for concurrency).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import PRINCIPAL, Principal
from gateway.config import RouteConfig
from gateway.context import LOCAL_COUNT, RequestContext, StateKey
from gateway.plugin import ConfigError, Instrument, Plugin, PluginMetrics, Reject
from gateway.pricing import PRICING, Pricing
from gateway.sse import SSEEvent
from gateway.teams import LimitsConfig
from plugins.rate_limit.cost_budget import (
    CostHold,
    actual_micros,
    cost_scopes_for,
    exhausted_error,
    refusal,
    reserve,
)
from plugins.rate_limit.limiter import (
    Decision,
    Lease,
    Limits,
    RateLimiter,
    Scope,
    key_scope,
    openai_reset,
    reservation,
    team_model_scope,
    team_scope,
)
from plugins.rate_limit.memory import MemoryRateLimiter
from plugins.rate_limit.redis_backend import DEFAULT_TIMEOUT, RedisRateLimiter

__all__ = [
    "Decision",
    "Lease",
    "Limits",
    "MemoryRateLimiter",
    "RateLimit",
    "RateLimitOptions",
    "RateLimiter",
    "RedisRateLimiter",
    "Scope",
    "key_scope",
    "openai_reset",
    "reservation",
    "scopes_for",
    "team_model_scope",
    "team_scope",
]

log = logging.getLogger("sluice.plugins.rate_limit")


class RateLimitOptions(BaseModel):
    """Options of the `rate_limit` plugin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = Field(None, description="redis://host:6379/0 (backend: redis)")
    on_backend_error: Literal["open", "closed"] = Field(
        "open", description="Redis down or slow: admit (open) or refuse with 503 (closed)"
    )
    timeout_ms: float = Field(
        DEFAULT_TIMEOUT * 1000, gt=0, description="longest wait for Redis per check"
    )
    default_max_tokens: int = Field(
        1024, ge=1, description="completion tokens reserved when a request sets no max_tokens"
    )
    hard_budget: bool = Field(False, description="cut streams whose token budget runs out")
    debit_every_tokens: int = Field(
        256, ge=1, description="tokens a stream uses between two debits, at least"
    )
    debit_every_seconds: float = Field(
        0.25, ge=0, description="seconds between two debits of a stream, at least"
    )


@dataclass
class _Held:
    lease: Lease
    prompt_estimate: int
    debited: int = 0  # tokens already passed to debit()
    renewed_at: float = 0.0  # limiter time of the last debit (which renews the lease)
    pending: asyncio.Task[bool] | None = None
    cost: CostHold | None = None  # the cost budgets' lease (see gateway.cost_budget)


_HELD: StateKey[_Held] = StateKey("rate_limit.lease")
_COUNTED: StateKey[Reject] = StateKey("rate_limit.counted")  # refusal in the metric already
_CODES: Final = frozenset(
    {
        "rate_limit_exceeded",
        "budget_exhausted",
        "cost_budget_exceeded",
        "rate_limit_backend_unavailable",
    }
)
_METRIC_KINDS: Final = ("requests", "tokens", "concurrency", "budget", "cost_budget", "backend")
_KINDS = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "concurrency": "concurrent streams",
    "budget": "token budget",
}


def _limits(config: LimitsConfig | None) -> Limits | None:
    if config is None:
        return None
    limits = Limits(
        requests_per_minute=config.requests_per_minute,
        tokens_per_minute=config.tokens_per_minute,
        concurrent_streams=config.concurrent_streams,
        tokens_per_day=config.tokens_per_day,
        tokens_per_month=config.tokens_per_month,
    )
    return limits if limits != Limits() else None


def scopes_for(principal: Principal, route: RouteConfig | None) -> list[Scope]:
    """The scopes a request of `principal` on `route` is checked against.

    `model_limits` may name the route or one of its aliases; either way the bucket is the
    route's, so an alias cannot get around a limit set on the route's name.
    """
    scopes: list[Scope] = []
    if (team := _limits(principal.team_limits)) is not None:
        scopes.append(team_scope(principal.team, team))
    if (key := _limits(principal.key_limits)) is not None:
        scopes.append(key_scope(principal.team, principal.key_id.split("/", 1)[-1], key))
    if route is not None:
        for name in (route.name, *route.aliases):
            model = _limits(principal.model_limits.get(name))
            if model is not None:
                scopes.append(team_model_scope(principal.team, route.name, model))
                break
    return scopes


def _prompt_estimate(ctx: RequestContext) -> int:
    counted = ctx.get(LOCAL_COUNT)  # token_count's, when it runs earlier in the chain
    if counted is not None:
        return counted.prompt_tokens
    body = ctx.body.get("messages") or ctx.body.get("prompt") or ctx.body.get("input") or ""
    return max(1, len(orjson.dumps(body)) // 4)


def _max_tokens(ctx: RequestContext) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = ctx.body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _refusal(decision: Decision) -> Reject:
    if decision.kind == "backend":
        return Reject(
            503,
            "Rate limits cannot be checked right now; retry shortly.",
            code="rate_limit_backend_unavailable",
            type="server_error",
            headers={"Retry-After": "1"},
        )
    what = _KINDS.get(decision.kind or "", "rate limit")
    scope = decision.scope_name or decision.scope or "this key"
    if decision.too_large:
        return Reject(
            429,
            f"This request needs more tokens than the {what} limit of {scope} allows in "
            "total; lower max_tokens or the prompt.",
            code="rate_limit_exceeded",
            type="tokens",
            headers=decision.headers,
        )
    seconds = max(1, math.ceil(decision.retry_after))
    return Reject(
        429,
        f"Rate limit reached for {scope} on {what}; retry in {seconds} s.",
        code="rate_limit_exceeded",
        type=decision.kind or "requests",
        headers={**decision.headers, "Retry-After": str(seconds)},
    )


class RateLimit(Plugin[RateLimitOptions]):
    """Enforces the authenticated key's team, key and team+model limits."""

    name = "rate_limit"
    _refused: Instrument[Counter] | None = None  # set by declare_metrics

    def __init__(self, options: RateLimitOptions) -> None:
        super().__init__(options)
        self.settings = options
        self.limiter: RateLimiter
        if options.backend == "redis":
            if not options.redis_url:
                raise ConfigError("options.redis_url: required with backend: redis")
            self.limiter = RedisRateLimiter(
                options.redis_url,
                timeout=options.timeout_ms / 1000,
                fail_open=options.on_backend_error == "open",
            )
        else:
            self.limiter = MemoryRateLimiter()
        # Renew well before a lease expires: a third of its time to live.
        self._renew_every = float(getattr(self.limiter, "lease_ttl", 600.0)) / 3
        # How long after a debit or renewal nothing can be due: `on_event` looks no further.
        self._quiet = min(options.debit_every_seconds, self._renew_every)
        self._ending: set[asyncio.Task[None]] = set()  # finishes the plugin waits for

    def declare_metrics(self, metrics: PluginMetrics) -> None:
        self._refused = metrics.counter(
            "sluice_rate_limit_rejections",
            "Requests and streams refused or cut by the rate_limit plugin, by limit kind.",
            ["team", "kind"],
            values={"kind": _METRIC_KINDS},
        )
        metrics.read_counter(
            "sluice_rate_limit_backend_failures",
            "Rate-limit backend (Redis) calls that failed or timed out.",
            lambda: self.limiter.failures,
        )

    def _count_refusal(self, ctx: RequestContext) -> None:
        err = ctx.error
        if not isinstance(err, Reject) or err.code not in _CODES or self._refused is None:
            return
        if ctx.get(_COUNTED) is err:  # once, if two rate_limit plugins saw the request
            return
        ctx.set(_COUNTED, err)
        kind = "backend" if err.code == "rate_limit_backend_unavailable" else err.type
        self._refused.labels(ctx, kind=kind).inc()

    async def start(self) -> None:
        """Connect to the backend before the gateway says it is ready."""
        starter = getattr(self.limiter, "start", None)
        if starter is not None:
            await starter()

    async def on_request(self, ctx: RequestContext) -> None:
        principal = ctx.get(PRINCIPAL)
        if principal is None:
            return
        scopes = scopes_for(principal, ctx.route)
        pricing = ctx.get(PRICING)
        cost_scopes = cost_scopes_for(principal, ctx.route) if pricing is not None else []
        if not scopes and not cost_scopes:
            return
        prompt = _prompt_estimate(ctx)
        tokens = reservation(prompt, _max_tokens(ctx), self.settings.default_max_tokens)
        cost = None
        if cost_scopes and pricing is not None:
            cost = await self._admit_cost(ctx, pricing, cost_scopes, prompt, tokens - prompt)
        try:
            decision = await self.limiter.admit(scopes, tokens)
        except BaseException:
            if cost is not None:
                self._finish_later(self.limiter.finish(cost.lease, 0))
            raise
        ctx.response_headers.update(decision.headers)
        if not decision.allowed or decision.lease is None:
            if cost is not None:  # refused by a token limit: the cost reservation goes back
                self._finish_later(self.limiter.finish(cost.lease, 0))
            raise _refusal(decision)
        ctx.set(_HELD, _Held(decision.lease, prompt, renewed_at=self._now(), cost=cost))

    async def _admit_cost(
        self,
        ctx: RequestContext,
        pricing: Pricing,
        scopes: list[Scope],
        prompt: int,
        completion: int,
    ) -> CostHold:
        """Reserve the request's most expensive outcome against its cost budgets."""
        micros, price = reserve(pricing, ctx, prompt, completion)
        decision = await self.limiter.admit(scopes, micros)
        if not decision.allowed or decision.lease is None:
            raise refusal(decision, scopes, pricing.currency)
        return CostHold(decision.lease, price, prompt)

    def _finish_later(self, finishing: Coroutine[Any, Any, None]) -> None:
        """Run a finish in a task the plugin holds (`close` waits for it)."""
        task = asyncio.get_running_loop().create_task(finishing)
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        held = ctx.get(_HELD)
        if held is None:
            return None
        pending = held.pending
        if pending is not None:
            if not pending.done():
                return None  # at most one debit in flight per stream
            held.pending = None
            if self.settings.hard_budget and _exhausted(pending):
                if held.cost is not None and held.cost.exhausted:
                    raise exhausted_error()
                raise Reject(
                    429,
                    "The token budget ran out during this answer.",
                    code="budget_exhausted",
                    type="budget",
                )
        now = self._now()
        since = now - held.renewed_at
        if since < self._quiet:
            return None  # the hot path: neither a debit nor a renewal can be due yet
        # Debits count the whole request (prompt + completion so far) against its reservation.
        used = held.prompt_estimate + (ctx.usage.completion_tokens or _streamed(ctx))
        if (
            used - held.debited >= self.settings.debit_every_tokens
            and since >= self.settings.debit_every_seconds
        ):
            amount, held.debited = used - held.debited, used
            self._debit(held, amount, now)
        elif since >= self._renew_every:
            self._debit(held, 0, now)  # a long stream's slot is renewed before it expires
        return None

    def _debit(self, held: _Held, amount: int, now: float) -> None:
        """Start one debit (it also renews the lease), held by the stream until its end."""
        held.renewed_at = now
        held.pending = asyncio.get_running_loop().create_task(
            self.limiter.debit(held.lease, amount)
            if held.cost is None
            else self._debit_both(held, amount)
        )

    async def _debit_both(self, held: _Held, amount: int) -> bool:
        """Debit the token lease, then the cost lease once its reservation is passed."""
        ok = await self.limiter.debit(held.lease, amount) if held.lease.checks else True
        cost = held.cost
        assert cost is not None
        excess = cost.excess(held.debited)
        if excess and not await self.limiter.debit(cost.lease, excess):
            cost.exhausted = True
            ok = False
        return ok

    async def on_end(self, ctx: RequestContext) -> None:
        self._count_refusal(ctx)
        held = ctx.get(_HELD)
        if held is None:
            return
        usage = ctx.usage
        if usage.total_tokens is not None:
            actual = usage.total_tokens
        else:
            actual = (usage.prompt_tokens or held.prompt_estimate) + (usage.completion_tokens or 0)
        # In a task of its own: a request cancelled now (a shutdown) still gives its slot
        # back, and `close` waits for it.
        pricing = ctx.get(PRICING)
        cost = None
        if held.cost is not None and pricing is not None:
            cost = actual_micros(pricing, ctx, held.cost)
        task = asyncio.get_running_loop().create_task(self._finish(held, actual, cost))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)
        await asyncio.shield(task)

    async def _finish(self, held: _Held, actual: int, cost: int | None = None) -> None:
        if held.pending is not None:
            # Let an in-flight debit land first (bounded by the backend's timeout): cancelling
            # a script that already ran would charge its tokens twice at reconciliation.
            with contextlib.suppress(Exception):
                await held.pending
        await self.limiter.finish(held.lease, actual)
        if held.cost is not None:
            await self.limiter.finish(held.cost.lease, cost or 0)

    def _now(self) -> float:
        """The limiter's clock (leases expire by it)."""
        clock: Callable[[], float] = getattr(self.limiter, "clock", time.time)
        return clock()

    async def close(self) -> None:
        """Finish what is still ending, then release the backend (called at shutdown)."""
        if self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)
        await self.limiter.close()


def _exhausted(debit: asyncio.Task[bool]) -> bool:
    """Whether a finished debit said a budget ran out (a failed one never cuts a stream)."""
    return not debit.cancelled() and debit.exception() is None and not debit.result()


def _streamed(ctx: RequestContext) -> int:
    counted = ctx.get(LOCAL_COUNT)
    return counted.completion_tokens if counted is not None else ctx.events_out
