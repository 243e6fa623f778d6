"""The Redis rate limiter against a real redis-server: replicas, round trips, TTLs, outages.

Each test gets its own throwaway redis-server (never the shared one on 6379). Time is a
fake clock passed to the scripts; outages are a stopped server (connections refused) or a
paused one (SIGSTOP: connects, never answers). Every wait is bounded by `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from gateway.testing.redis_server import RedisServer
from gateway.testing.slow_link import SlowLink
from plugins.rate_limit import (
    Decision,
    Lease,
    Limits,
    MemoryRateLimiter,
    RedisRateLimiter,
    Scope,
    key_scope,
    team_model_scope,
    team_scope,
)
from tests.unit.test_ratelimit import FakeClock, running_redis

BOUND = 1.0  # no call may take longer than this, whatever Redis does
LOGGER = "sluice.ratelimit"


@pytest.fixture
async def server() -> AsyncIterator[RedisServer]:
    """A throwaway redis-server (skipped without the binary unless CI is set)."""
    async with running_redis() as srv:
        yield srv


@pytest.fixture
async def admin(server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client for inspecting the server."""
    client = Redis.from_url(server.url, decode_responses=True)
    await client.ping()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def replicas(server: RedisServer, clock: FakeClock) -> AsyncIterator[list[RedisRateLimiter]]:
    """Two limiters on the same Redis, as two gateway replicas would be."""
    limiters = [RedisRateLimiter(server.url, timeout=2.0, clock=clock) for _ in range(2)]
    try:
        yield limiters
    finally:
        for limiter in limiters:
            await limiter.close()


def held(decision: Decision) -> Lease:
    assert decision.allowed, decision
    assert decision.lease is not None
    return decision.lease


def log_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and text in r.getMessage()]


async def server_calls(admin: Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT, as the server counts them.

    Commands run inside scripts are counted too, so only the top-level ones matter here.
    """
    stats: dict[str, Any] = await admin.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return {k: v for k, v in calls.items() if k in ("evalsha", "eval", "script|load")}


def record_commands(monkeypatch: pytest.MonkeyPatch, limiter: RedisRateLimiter) -> list[str]:
    """Record every command the limiter sends (one entry per round trip)."""
    sent: list[str] = []
    client: Any = limiter._pipe if limiter._pipe is not None else limiter._redis
    name = "call" if limiter._pipe is not None else "execute_command"
    original = cast(Callable[..., Awaitable[Any]], getattr(client, name))

    async def execute_command(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]).lower())
        return await original(*args, **options)

    monkeypatch.setattr(client, name, execute_command)
    return sent


def is_failing(limiter: RedisRateLimiter) -> bool:
    """`limiter.failing`, read through a call so mypy does not narrow it across asserts."""
    return limiter.failing


# --- one global limit across replicas --------------------------------------------------


async def test_two_replicas_enforce_one_global_limit(
    replicas: list[RedisRateLimiter], clock: FakeClock
) -> None:
    scopes = [team_scope("ml", Limits(requests_per_minute=10))]
    a, b = replicas
    async with asyncio.timeout(10):
        decisions = await asyncio.gather(
            *(a.admit(scopes, 0) for _ in range(6)), *(b.admit(scopes, 0) for _ in range(5))
        )
    assert sum(d.allowed for d in decisions) == 10
    denied = [d for d in decisions if not d.allowed]
    assert [(d.kind, d.scope) for d in denied] == [("requests", "team")]
    clock.advance(6.0)
    assert (await b.admit(scopes, 0)).allowed
    assert not (await a.admit(scopes, 0)).allowed


async def test_a_slot_taken_on_one_replica_is_released_by_finish_on_any(
    replicas: list[RedisRateLimiter],
) -> None:
    a, b = replicas
    scopes = [key_scope("ml", "ci", Limits(concurrent_streams=1, tokens_per_minute=1000))]
    lease = held(await a.admit(scopes, 1000))
    assert (await b.admit(scopes, 0)).kind == "concurrency"
    await b.finish(lease, 100)  # the lease object is all a replica needs
    assert (await b.admit(scopes, 900)).allowed


# --- one round trip --------------------------------------------------------------------


async def test_one_evalsha_per_admit_and_per_finish(
    replicas: list[RedisRateLimiter], admin: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = replicas[0]
    scopes = [
        team_scope("ml", Limits(requests_per_minute=1000, tokens_per_minute=100_000)),
        key_scope("ml", "ci", Limits(concurrent_streams=50, tokens_per_day=10**6)),
        team_model_scope("ml", "gpt-4o", Limits(tokens_per_month=10**7)),
    ]
    await limiter.finish(held(await limiter.admit(scopes, 10)), 5)  # loads the scripts
    await admin.config_resetstat()
    sent = record_commands(monkeypatch, limiter)
    leases = [held(await limiter.admit(scopes, 100)) for _ in range(5)]
    assert sent == ["evalsha"] * 5
    assert await server_calls(admin) == {"evalsha": 5}
    for lease in leases:
        await limiter.finish(lease, 50)
        await limiter.finish(lease, 50)  # idempotent, and without a round trip
    assert sent == ["evalsha"] * 10
    assert await server_calls(admin) == {"evalsha": 10}
    await limiter.admit([team_scope("free", Limits())], 100)  # no limits: no round trip
    assert len(sent) == 10


async def test_debit_goes_to_redis_only_when_it_has_to(
    replicas: list[RedisRateLimiter], clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = replicas[0]
    no_budget = held(await limiter.admit([team_scope("a", Limits(concurrent_streams=5))], 100))
    budget = held(await limiter.admit([team_scope("b", Limits(tokens_per_day=10_000))], 100))
    sent = record_commands(monkeypatch, limiter)
    assert await limiter.debit(no_budget, 50)  # within the reservation, renewal not due
    assert sent == []
    assert await limiter.debit(budget, 50)  # a hard budget is checked
    assert sent == ["evalsha", "script load", "evalsha"]  # the debit script was new
    assert await limiter.debit(no_budget, 60)  # 10 past the reservation: charged
    assert len(sent) == 4
    clock.advance(limiter.lease_ttl / 3)
    assert await limiter.debit(no_budget, 0)  # renewal due
    assert len(sent) == 5
    assert await limiter.debit(no_budget, 0)
    assert len(sent) == 5


# --- keys ------------------------------------------------------------------------------


async def test_every_key_has_a_ttl(replicas: list[RedisRateLimiter], admin: Redis) -> None:
    limiter = replicas[0]
    everything = Limits(
        requests_per_minute=10,
        tokens_per_minute=1000,
        concurrent_streams=2,
        tokens_per_day=10_000,
        tokens_per_month=100_000,
    )
    scopes = [team_scope("ml", everything), Scope("key:odd name {x}", everything)]
    lease = held(await limiter.admit(scopes, 100))
    assert await limiter.debit(lease, 150)
    keys = sorted([k async for k in admin.scan_iter(match="sluice:rl:*")])
    assert len(keys) == 2 * 5 + 1  # five limits per scope, and the lease marker
    for k in keys:
        assert re.fullmatch(r"sluice:rl:[A-Za-z0-9_.:/@|=+\-%~]+", k), k
        assert await admin.pttl(k) > 0, k
    assert "sluice:rl:s:key:odd%20name%20%7Bx%7D:rpm" in keys
    await limiter.finish(lease, 120)
    for k in [k async for k in admin.scan_iter(match="sluice:rl:*")]:
        assert await admin.pttl(k) > 0, k
    assert not [k async for k in admin.scan_iter(match="sluice:rl:lease:*")]


async def test_prefix_separates_tenants_of_one_redis(server: RedisServer, clock: FakeClock) -> None:
    scopes = [team_scope("ml", Limits(requests_per_minute=1))]
    one = RedisRateLimiter(server.url, prefix="one:", timeout=2.0, clock=clock)
    two = RedisRateLimiter(server.url, prefix="two:", timeout=2.0, clock=clock)
    try:
        assert (await one.admit(scopes, 0)).allowed
        assert (await two.admit(scopes, 0)).allowed
        assert not (await one.admit(scopes, 0)).allowed
    finally:
        await one.close()
        await two.close()


# --- outages ---------------------------------------------------------------------------


async def test_fail_open_when_redis_is_down_then_recover(
    server: RedisServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    limiter = RedisRateLimiter(server.url, timeout=0.2, fail_open=True, clock=clock)
    scopes = [team_scope("ml", Limits(requests_per_minute=2, tokens_per_minute=1000))]
    try:
        held(await limiter.admit(scopes, 100))
        await server.stop()
        async with asyncio.timeout(BOUND):
            outage = [await limiter.admit(scopes, 100) for _ in range(3)]
        assert all(d.allowed and d.lease is not None and d.lease.degraded for d in outage)
        assert outage[0].headers == {}
        assert (limiter.failures, limiter.failing) == (3, True)
        async with asyncio.timeout(BOUND):
            await limiter.finish(held(outage[0]), 100)  # never raises
        assert limiter.failures == 4
        assert len(log_lines(caplog, "failing open")) == 1

        await server.start()  # empty: the scripts are gone too (NOSCRIPT is handled)
        async with asyncio.timeout(BOUND):
            back = [await limiter.admit(scopes, 100) for _ in range(3)]
        assert [d.allowed for d in back] == [True, True, False]
        assert not any(d.lease.degraded for d in back if d.lease is not None)
        assert (limiter.failures, limiter.failing) == (4, False)
        assert len(log_lines(caplog, "recovered")) == 1
        assert len(log_lines(caplog, "failing open")) == 1
    finally:
        await limiter.close()


async def test_fail_closed_denies_with_kind_backend(
    server: RedisServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    limiter = RedisRateLimiter(server.url, timeout=0.2, fail_open=False, clock=clock)
    scopes = [team_scope("ml", Limits(requests_per_minute=100))]
    try:
        assert (await limiter.admit(scopes, 0)).allowed
        await server.stop()
        async with asyncio.timeout(BOUND):
            denied = [await limiter.admit(scopes, 0) for _ in range(2)]
        for d in denied:
            assert (d.allowed, d.kind, d.lease) == (False, "backend", None)
            assert d.retry_after > 0
        assert limiter.failures == 2
        assert len(log_lines(caplog, "failing closed")) == 1
        await server.start()
        assert (await limiter.admit(scopes, 0)).allowed
        assert len(log_lines(caplog, "recovered")) == 1
    finally:
        await limiter.close()


@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_hung_redis_costs_at_most_the_timeout(
    server: RedisServer, clock: FakeClock, caplog: pytest.LogCaptureFixture, fail_open: bool
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    limiter = RedisRateLimiter(server.url, timeout=0.05, fail_open=fail_open, clock=clock)
    scopes = [team_scope("ml", Limits(requests_per_minute=100, concurrent_streams=5))]
    try:
        lease = held(await limiter.admit(scopes, 0))
        server.pause()
        try:
            async with asyncio.timeout(BOUND):
                decision = await limiter.admit(scopes, 0)
                await limiter.finish(lease, 10)
            assert is_failing(limiter)
            # the admission and the release; failing closed, also the release of the
            # slot the timed-out admission may have taken (retried in the background)
            assert limiter.failures >= 2
        finally:
            server.resume()
        limiter.timeout = 2.0  # a loaded test machine must not fail the recovery
        assert decision.allowed is fail_open
        assert decision.kind == (None if fail_open else "backend")
        async with asyncio.timeout(BOUND):
            assert (await limiter.admit(scopes, 0)).allowed
        assert not is_failing(limiter)
        assert len(log_lines(caplog, "recovered")) == 1
    finally:
        await limiter.close()


async def test_degraded_lease_is_accounted_once_redis_is_back(
    server: RedisServer, clock: FakeClock
) -> None:
    limiter = RedisRateLimiter(server.url, timeout=0.2, fail_open=True, clock=clock)
    scopes = [team_scope("ml", Limits(tokens_per_minute=1000, tokens_per_day=5000))]
    try:
        await server.stop()
        lease = held(await limiter.admit(scopes, 500))
        assert lease.degraded
        await server.start()
        await limiter.finish(lease, 300)  # admission never landed: charge all 300 used
        decision = await limiter.admit(scopes, 100)
        assert decision.headers["x-ratelimit-remaining-tokens"] == "600"
    finally:
        await limiter.close()


# --- the two backends agree ------------------------------------------------------------


async def test_memory_and_redis_make_the_same_decisions(
    server: RedisServer,
) -> None:
    """A seeded random workload through both backends, compared decision by decision."""
    scopes = [
        team_scope(
            "ml", Limits(requests_per_minute=20, tokens_per_minute=3000, tokens_per_day=4000)
        ),
        key_scope("ml", "ci", Limits(requests_per_minute=7, concurrent_streams=3)),
        team_model_scope("ml", "gpt-4o", Limits(tokens_per_minute=1700, tokens_per_month=6000)),
    ]
    seen: Counter[str | None] = Counter()
    for seed in range(8):
        rng = random.Random(seed)
        clock = FakeClock(FakeClock().now + seed * 86_400 + 86_000)  # some runs cross midnight
        memory = MemoryRateLimiter(clock, lease_ttl=30.0)
        redis = RedisRateLimiter(
            server.url, prefix=f"diff{seed}:", timeout=2.0, lease_ttl=30.0, clock=clock
        )
        open_leases: list[tuple[Lease, Lease]] = []
        try:
            for step in range(60):
                op = rng.random()
                if op < 0.5:
                    chosen = rng.sample(scopes, rng.randint(1, 3))
                    tokens = rng.choice([0, 1, 50, 333, 1000, 1800])
                    m, r = await memory.admit(chosen, tokens), await redis.admit(chosen, tokens)
                    assert _summary(m) == _summary(r), (seed, step)
                    seen["too large" if m.too_large else m.kind] += 1
                    if m.lease is not None and r.lease is not None:
                        open_leases.append((m.lease, r.lease))
                elif op < 0.75 and open_leases:
                    ml, rl = open_leases.pop(rng.randrange(len(open_leases)))
                    actual = rng.choice([0, 10, ml.reserved_tokens, ml.reserved_tokens + 700])
                    await memory.finish(ml, actual)
                    await redis.finish(rl, actual)
                elif op < 0.85 and open_leases:
                    ml, rl = rng.choice(open_leases)
                    n = rng.choice([1, 100, 900])
                    go_on = await memory.debit(ml, n)
                    assert go_on == await redis.debit(rl, n), (seed, step)
                    seen["debit ok" if go_on else "debit cut"] += 1
                else:
                    clock.advance(rng.choice([0.001, 0.5, 3.0, 17.0, 45.0]))
        finally:
            await redis.close()
    # the workload did reach every outcome
    outcomes = {None, "requests", "tokens", "concurrency", "budget", "too large"}
    assert set(seen) == outcomes | {"debit ok", "debit cut"}, seen


def _summary(d: Decision) -> tuple[object, ...]:
    return (d.allowed, d.kind, d.scope_name, d.too_large, round(d.retry_after, 6), d.headers)


# --- slots are released on every ending, whatever Redis does ---------------------------


@pytest.fixture
async def link(server: RedisServer) -> AsyncIterator[SlowLink]:
    """A relay to the server whose replies can come late, or whose requests get lost."""
    async with SlowLink(server.port) as relay:
        yield relay


def conc_key(scope: Scope) -> str:
    return f"sluice:rl:s:{scope.name}:conc"


@pytest.mark.parametrize("fail_open", [True, False])
async def test_an_admission_that_timed_out_after_redis_took_the_slot_gives_it_back(
    link: SlowLink, admin: Redis, clock: FakeClock, fail_open: bool
) -> None:
    limiter = RedisRateLimiter(
        f"redis://127.0.0.1:{link.port}/0", timeout=0.2, fail_open=fail_open, clock=clock
    )
    scope = team_scope("ml", Limits(concurrent_streams=5, tokens_per_minute=1000))
    try:
        await limiter.finish(held(await limiter.admit([scope], 10)), 10)  # scripts loaded
        link.mode = "late"  # the script runs in Redis; its answer comes after the timeout
        async with asyncio.timeout(BOUND):
            decision = await limiter.admit([scope], 500)
        assert decision.allowed is fail_open
        link.mode = "pass"
        assert await admin.zcard(conc_key(scope)) == 1  # Redis did take the slot
        if decision.lease is not None:
            assert decision.lease.degraded
            await limiter.finish(decision.lease, 0)
    finally:
        link.mode = "pass"
        await limiter.close()  # waits for releases still being retried
    assert await admin.zcard(conc_key(scope)) == 0
    check = RedisRateLimiter(f"redis://127.0.0.1:{link.port}/0", timeout=2.0, clock=clock)
    try:  # the 500 tokens reserved by the lost admission are back too
        after = await check.admit([scope], 0)
        assert after.headers["x-ratelimit-remaining-tokens"] == "990"
    finally:
        await check.close()


async def test_a_release_lost_on_the_way_is_retried_until_it_lands(
    link: SlowLink, admin: Redis, clock: FakeClock
) -> None:
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{link.port}/0", timeout=0.2, clock=clock)
    scope = team_scope("ml", Limits(concurrent_streams=5, tokens_per_minute=1000))
    try:
        lease = held(await limiter.admit([scope], 500))
        link.mode = "lost"
        async with asyncio.timeout(BOUND):
            await limiter.finish(lease, 100)  # bounded: the caller waits for one attempt
        assert await admin.zcard(conc_key(scope)) == 1
        link.mode = "pass"
    finally:
        link.mode = "pass"
        await limiter.close()
    assert await admin.zcard(conc_key(scope)) == 0
    assert not [k async for k in admin.scan_iter(match="sluice:rl:lease:*")]


async def test_a_release_retried_after_it_did_land_is_not_counted_twice(
    link: SlowLink, admin: Redis, clock: FakeClock
) -> None:
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{link.port}/0", timeout=0.2, clock=clock)
    scope = team_scope("ml", Limits(concurrent_streams=5, tokens_per_minute=1000))
    try:
        lease = held(await limiter.admit([scope], 500))
        link.mode = "late"  # the release runs, its answer is late: it is retried
        async with asyncio.timeout(BOUND):
            await limiter.finish(lease, 100)
        link.mode = "pass"
    finally:
        link.mode = "pass"
        await limiter.close()
    assert await admin.zcard(conc_key(scope)) == 0
    check = RedisRateLimiter(f"redis://127.0.0.1:{link.port}/0", timeout=2.0, clock=clock)
    try:  # 100 used, refunded once (not 400 twice)
        after = await check.admit([scope], 0)
        assert after.headers["x-ratelimit-remaining-tokens"] == "900"
    finally:
        await check.close()


async def test_an_admission_cancelled_in_flight_gives_its_slot_back(
    link: SlowLink, admin: Redis, clock: FakeClock
) -> None:
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{link.port}/0", timeout=5.0, clock=clock)
    scope = team_scope("ml", Limits(concurrent_streams=5))
    try:
        await limiter.finish(held(await limiter.admit([scope], 0)), 0)
        link.mode = "late"
        link.forwarded.clear()
        admission = asyncio.create_task(limiter.admit([scope], 0))
        async with asyncio.timeout(BOUND):  # the script is in Redis: it takes the slot
            await link.forwarded.wait()
        admission.cancel()  # the client hung up while its request was being admitted
        with pytest.raises(asyncio.CancelledError):
            await admission
        link.mode = "pass"
    finally:
        link.mode = "pass"
        await limiter.close()
    assert await admin.zcard(conc_key(scope)) == 0
