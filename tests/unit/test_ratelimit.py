"""The rate-limit engine: one suite run against both backends (memory and a real Redis).

Time is a hand-driven fake clock (the Redis scripts take `now` as an argument, so it
drives them too). Nothing sleeps. The Redis backend runs against a throwaway
redis-server per test; if the binary is missing the Redis cases are skipped, unless the
environment variable CI is set, where they fail ("install redis-server").
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from gateway.testing.redis_server import RedisServer
from plugins.rate_limit import (
    Decision,
    Lease,
    Limits,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    Scope,
    key_scope,
    openai_reset,
    reservation,
    team_model_scope,
    team_scope,
)
from plugins.rate_limit.limiter import _key_name

START = datetime(2030, 1, 15, 12, 0, tzinfo=UTC).timestamp()


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.asynccontextmanager
async def running_redis() -> AsyncIterator[RedisServer]:
    """A throwaway redis-server; skip without the binary, fail if CI is set."""
    try:
        server = RedisServer()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"redis-server is required in CI: install redis-server ({exc})")
        pytest.skip(f"redis-server not installed ({exc})")
    async with server:
        yield server


@dataclass
class Backend:
    """A limiter under test with its clock; `make` builds another one on the same store."""

    limiter: RateLimiter
    clock: FakeClock
    name: str


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Each test runs once per backend, on a fresh store."""
    clock = FakeClock()
    if request.param == "memory":
        yield Backend(MemoryRateLimiter(clock, lease_ttl=600.0), clock, "memory")
        return
    async with running_redis() as server:
        limiter = RedisRateLimiter(server.url, timeout=2.0, lease_ttl=600.0, clock=clock)
        try:
            yield Backend(limiter, clock, "redis")
        finally:
            await limiter.close()


def team(**limits: int) -> Scope:
    return team_scope("ml", Limits(**limits))


def key(name: str = "ci", **limits: int) -> Scope:
    return key_scope("ml", name, Limits(**limits))


async def admit_many(b: Backend, scopes: list[Scope], n: int, tokens: int = 0) -> list[Decision]:
    return [await b.limiter.admit(scopes, tokens) for _ in range(n)]


def held(decision: Decision) -> Lease:
    """The lease of an admitted decision."""
    assert decision.allowed, decision
    assert decision.lease is not None
    return decision.lease


# --- requests per minute ---------------------------------------------------------------


async def test_burst_of_n_plus_one_lets_exactly_n_through(backend: Backend) -> None:
    decisions = await admit_many(backend, [team(requests_per_minute=10)], 11)
    assert [d.allowed for d in decisions] == [True] * 10 + [False]
    denied = decisions[-1]
    assert (denied.kind, denied.scope, denied.scope_name) == ("requests", "team", "team:ml")
    assert denied.limit == "requests_per_minute"
    assert denied.retry_after == pytest.approx(6.0)
    assert denied.lease is None


async def test_one_more_request_after_the_emission_interval(backend: Backend) -> None:
    scopes = [team(requests_per_minute=10)]
    await admit_many(backend, scopes, 10)
    backend.clock.advance(5.999)
    assert not (await backend.limiter.admit(scopes, 0)).allowed
    backend.clock.advance(0.001)  # 60 / 10 seconds after the burst
    assert (await backend.limiter.admit(scopes, 0)).allowed
    assert not (await backend.limiter.admit(scopes, 0)).allowed


async def test_gcra_is_exact_for_intervals_that_are_not_whole_microseconds(
    backend: Backend,
) -> None:
    scopes = [team(requests_per_minute=7)]  # T = 8.571428... s
    decisions = await admit_many(backend, scopes, 8)
    assert [d.allowed for d in decisions] == [True] * 7 + [False]
    assert decisions[-1].retry_after == pytest.approx(60 / 7, abs=1e-6)
    backend.clock.advance(60 / 7 - 1e-4)
    assert not (await backend.limiter.admit(scopes, 0)).allowed
    backend.clock.advance(2e-4)
    assert (await backend.limiter.admit(scopes, 0)).allowed
    backend.clock.advance(7 * 60 / 7 + 1e-3)  # idle long enough to refill completely
    decisions = await admit_many(backend, scopes, 8)
    assert [d.allowed for d in decisions] == [True] * 7 + [False]


# --- tokens per minute -----------------------------------------------------------------


async def test_tpm_reservation_and_refund_frees_capacity(backend: Backend) -> None:
    scopes = [team(tokens_per_minute=1000)]
    first = held(await backend.limiter.admit(scopes, 600))
    denied = await backend.limiter.admit(scopes, 600)
    assert (denied.allowed, denied.kind, denied.too_large) == (False, "tokens", False)
    assert denied.retry_after == pytest.approx(12.0)  # 200 tokens at 60 ms each
    await backend.limiter.finish(first, 200)  # used 200 of 600: 400 come back
    assert not (await backend.limiter.admit(scopes, 801)).allowed
    assert (await backend.limiter.admit(scopes, 800)).allowed  # 200 + 800 == 1000
    assert not (await backend.limiter.admit(scopes, 1)).allowed


async def test_refund_never_moves_capacity_past_full(backend: Backend) -> None:
    scopes = [team(tokens_per_minute=1000)]
    lease = held(await backend.limiter.admit(scopes, 500))
    backend.clock.advance(60)  # fully drained meanwhile
    await backend.limiter.finish(lease, 0)  # refund must not bank credit
    decisions = await admit_many(backend, scopes, 2, tokens=1000)
    assert [d.allowed for d in decisions] == [True, False]


async def test_tpm_charges_the_extra_and_never_denies_after_the_fact(backend: Backend) -> None:
    scopes = [team(tokens_per_minute=1000)]
    lease = held(await backend.limiter.admit(scopes, 100))
    await backend.limiter.finish(lease, 900)  # 800 more than reserved: charged
    assert (await backend.limiter.admit(scopes, 100)).allowed  # 900 + 100 == 1000
    assert not (await backend.limiter.admit(scopes, 1)).allowed
    backend.clock.advance(60)
    big = held(await backend.limiter.admit(scopes, 100))
    await backend.limiter.finish(big, 5000)  # far over the limit: accepted, then owed
    denied = await backend.limiter.admit(scopes, 1)
    assert denied.kind == "tokens"
    assert denied.retry_after == pytest.approx(4 * 60 + 0.06)
    assert denied.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_reservation_larger_than_the_whole_limit_is_denied_as_too_large(
    backend: Backend,
) -> None:
    denied = await backend.limiter.admit([team(tokens_per_minute=1000)], 1001)
    assert (denied.allowed, denied.kind, denied.too_large, denied.retry_after) == (
        False,
        "tokens",
        True,
        0.0,
    )
    denied = await backend.limiter.admit([key(tokens_per_day=500)], 501)
    assert (denied.kind, denied.scope, denied.too_large) == ("budget", "key", True)
    # nothing was consumed by either
    assert (await backend.limiter.admit([team(tokens_per_minute=1000)], 1000)).allowed


# --- concurrency -----------------------------------------------------------------------


async def test_concurrency_slots_and_release(backend: Backend) -> None:
    scopes = [team(concurrent_streams=2)]
    first, second = (held(d) for d in await admit_many(backend, scopes, 2))
    denied = await backend.limiter.admit(scopes, 0)
    assert (denied.allowed, denied.kind, denied.scope) == (False, "concurrency", "team")
    assert denied.retry_after > 0
    await backend.limiter.finish(first, 0)
    third = held(await backend.limiter.admit(scopes, 0))
    assert not (await backend.limiter.admit(scopes, 0)).allowed
    await backend.limiter.finish(second, 0)
    await backend.limiter.finish(third, 0)
    assert [d.allowed for d in await admit_many(backend, scopes, 3)] == [True, True, False]


async def test_finish_twice_does_not_release_or_refund_twice(backend: Backend) -> None:
    scopes = [team(concurrent_streams=2, tokens_per_minute=1000)]
    first = held(await backend.limiter.admit(scopes, 500))
    held(await backend.limiter.admit(scopes, 500))
    await backend.limiter.finish(first, 0)
    await backend.limiter.finish(first, 0)
    assert first.finished
    held(await backend.limiter.admit(scopes, 500))  # the one slot and 500 tokens freed
    denied = await backend.limiter.admit(scopes, 0)
    assert denied.kind == "concurrency"
    assert not (await backend.limiter.admit([team(tokens_per_minute=1000)], 1)).allowed


async def test_lease_expiry_reclaims_the_slots_of_a_crashed_holder(backend: Backend) -> None:
    scopes = [team(concurrent_streams=1)]
    held(await backend.limiter.admit(scopes, 0))  # its replica "crashes": never finished
    backend.clock.advance(599)
    assert (await backend.limiter.admit(scopes, 0)).kind == "concurrency"
    backend.clock.advance(1)  # lease_ttl = 600 s after admission
    assert (await backend.limiter.admit(scopes, 0)).allowed


async def test_debit_renews_the_lease_of_a_long_stream(backend: Backend) -> None:
    scopes = [team(concurrent_streams=1)]
    lease = held(await backend.limiter.admit(scopes, 100))
    for _ in range(4):  # 4 x 300 s = 20 minutes, well past lease_ttl
        backend.clock.advance(300)
        assert await backend.limiter.debit(lease, 10)
        assert (await backend.limiter.admit(scopes, 0)).kind == "concurrency"
    await backend.limiter.finish(lease, 40)
    assert (await backend.limiter.admit(scopes, 0)).allowed


# --- budgets ---------------------------------------------------------------------------


async def test_daily_budget_resets_at_utc_midnight(backend: Backend) -> None:
    backend.clock.now = datetime(2030, 1, 15, 23, 59, tzinfo=UTC).timestamp()
    scopes = [key(tokens_per_day=1000)]
    held(await backend.limiter.admit(scopes, 800))
    denied = await backend.limiter.admit(scopes, 300)
    assert (denied.kind, denied.scope, denied.limit) == ("budget", "key", "tokens_per_day")
    assert denied.retry_after == pytest.approx(60.0)
    backend.clock.advance(59.9)
    assert not (await backend.limiter.admit(scopes, 300)).allowed
    backend.clock.now = datetime(2030, 1, 16, tzinfo=UTC).timestamp()  # midnight UTC
    assert (await backend.limiter.admit(scopes, 300)).allowed
    assert not (await backend.limiter.admit(scopes, 701)).allowed


async def test_monthly_budget_resets_on_the_first_of_the_month(backend: Backend) -> None:
    backend.clock.now = datetime(2030, 12, 31, 12, 0, tzinfo=UTC).timestamp()
    scopes = [team(tokens_per_month=1000)]
    held(await backend.limiter.admit(scopes, 1000))
    denied = await backend.limiter.admit(scopes, 1)
    assert (denied.kind, denied.limit) == ("budget", "tokens_per_month")
    assert denied.retry_after == pytest.approx(12 * 3600.0)
    backend.clock.now = datetime(2031, 1, 1, tzinfo=UTC).timestamp()
    assert (await backend.limiter.admit(scopes, 1000)).allowed


async def test_budget_reconcile_refunds_and_charges(backend: Backend) -> None:
    scopes = [team(tokens_per_day=1000)]
    lease = held(await backend.limiter.admit(scopes, 900))
    await backend.limiter.finish(lease, 300)  # 600 back
    lease = held(await backend.limiter.admit(scopes, 700))  # 300 + 700
    assert not (await backend.limiter.admit(scopes, 1)).allowed
    await backend.limiter.finish(lease, 800)  # 100 over the reservation: 1100 used
    backend.clock.advance(3600)
    assert not (await backend.limiter.admit(scopes, 1)).allowed


async def test_debit_cuts_a_stream_when_a_hard_budget_is_exhausted(backend: Backend) -> None:
    scopes = [team(tokens_per_day=1000)]
    stream = held(await backend.limiter.admit(scopes, 500))
    assert await backend.limiter.debit(stream, 300)  # within the reservation
    assert await backend.limiter.debit(stream, 300)  # 100 past it: charged, 600 used
    other = held(await backend.limiter.admit(scopes, 400))  # 1000 used
    assert await backend.limiter.debit(stream, 0)  # exactly at the limit: go on
    assert not await backend.limiter.debit(stream, 50)  # 1050 > 1000: cut
    await backend.limiter.finish(stream, 650)  # everything already charged
    await backend.limiter.finish(other, 0)  # 400 back: 650 used
    assert (await backend.limiter.admit(scopes, 350)).allowed
    assert not (await backend.limiter.admit(scopes, 1)).allowed


# --- several scopes --------------------------------------------------------------------


async def test_admission_is_all_or_nothing_across_scopes(backend: Backend) -> None:
    tm = team(requests_per_minute=3, tokens_per_minute=1000, concurrent_streams=3)
    strict, loose = key("ci", requests_per_minute=1), key("web")
    held(await backend.limiter.admit([tm, strict], 100))
    for _ in range(5):  # the key denies: the team must not be charged anything
        denied = await backend.limiter.admit([tm, strict], 100)
        assert (denied.kind, denied.scope, denied.scope_name) == ("requests", "key", "key:ml/ci")
    decisions = await admit_many(backend, [tm, loose], 3, tokens=100)
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decisions[-1].scope == "team"
    assert decisions[1].headers["x-ratelimit-remaining-tokens"] == "700"


async def test_team_model_scope(backend: Backend) -> None:
    tm = team(requests_per_minute=100)
    gpt4o = team_model_scope("ml", "gpt-4o", Limits(requests_per_minute=2))
    mini = team_model_scope("ml", "gpt-4o-mini", Limits(requests_per_minute=2))
    decisions = await admit_many(backend, [tm, gpt4o], 3)
    assert [d.allowed for d in decisions] == [True, True, False]
    assert (decisions[-1].scope, decisions[-1].scope_name) == ("team_model", "team:ml|model:gpt-4o")
    assert (await backend.limiter.admit([tm, mini], 0)).allowed


async def test_headers_come_from_the_most_constraining_limits(backend: Backend) -> None:
    scopes = [
        team(requests_per_minute=100, tokens_per_minute=10_000),
        key(requests_per_minute=10, tokens_per_minute=100_000),
    ]
    decision = await backend.limiter.admit(scopes, 1000)
    assert decision.headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "6s",
        "x-ratelimit-limit-tokens": "10000",
        "x-ratelimit-remaining-tokens": "9000",
        "x-ratelimit-reset-tokens": "6s",
    }
    denied = await backend.limiter.admit(scopes, 9001)
    assert denied.kind == "tokens"
    assert denied.retry_after == pytest.approx(0.006)
    assert denied.headers["x-ratelimit-remaining-tokens"] == "9000"  # nothing consumed
    assert denied.headers["x-ratelimit-remaining-requests"] == "9"
    backend.clock.advance(0.5)
    decision = await backend.limiter.admit(scopes, 0)
    assert decision.headers["x-ratelimit-remaining-requests"] == "8"
    assert decision.headers["x-ratelimit-reset-requests"] == "11.5s"
    assert decision.headers["x-ratelimit-remaining-tokens"] == "9083"
    assert decision.headers["x-ratelimit-reset-tokens"] == "5.5s"


async def test_scopes_without_limits_and_duplicate_scopes(backend: Backend) -> None:
    free = await backend.limiter.admit([team()], 10_000)
    assert (free.allowed, free.headers) == (True, {})
    await backend.limiter.finish(held(free), 10)
    scope = team(requests_per_minute=2)
    assert (await backend.limiter.admit([scope, scope], 0)).allowed  # counted once
    assert (await backend.limiter.admit([scope], 0)).allowed
    assert not (await backend.limiter.admit([scope], 0)).allowed


async def test_odd_scope_names_are_kept_apart(backend: Backend) -> None:
    names = ["team:a b", "team:a%20b", "team:{a}", "team:" + "x" * 300, "team:" + "x" * 301]
    scopes = [Scope(n, Limits(requests_per_minute=1)) for n in names]
    for scope in scopes:
        assert (await backend.limiter.admit([scope], 0)).allowed
    for scope in scopes:
        assert not (await backend.limiter.admit([scope], 0)).allowed


# --- pure helpers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (-3.0, "0s"),
        (0.02, "20ms"),
        (0.0001, "1ms"),
        (0.999, "999ms"),
        (1.0, "1s"),
        (7.66, "7.66s"),
        (59.9999, "1m0s"),
        (360.0, "6m0s"),
        (179.56, "2m59.56s"),
        (3600.0, "1h0m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_openai_reset_format(seconds: float, text: str) -> None:
    assert openai_reset(seconds) == text


@pytest.mark.parametrize("name", ["team:a b", "team:{x}", "key:é", "team:a\nb", "k:" + "z" * 500])
def test_key_names_are_sanitised(name: str) -> None:
    encoded = _key_name(name)
    assert re.fullmatch(r"[A-Za-z0-9_.:/@|=+\-%~]{1,200}", encoded), encoded


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="requests_per_minute"):
        Limits(requests_per_minute=0)
    with pytest.raises(ValueError, match="tokens_per_day"):
        Limits(tokens_per_day=-5)


def test_reservation_uses_max_tokens_or_the_default() -> None:
    assert reservation(120, 300, 4096) == 420
    assert reservation(120, None, 4096) == 4216


async def test_negative_tokens_are_refused() -> None:
    with pytest.raises(ValueError, match="tokens"):
        await MemoryRateLimiter().admit([team(requests_per_minute=1)], -1)


async def test_memory_purges_stale_state() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock)
    for i in range(MemoryRateLimiter._PURGE_EVERY - 1):
        scope = team_scope(f"t{i}", Limits(requests_per_minute=5, tokens_per_day=10))
        await limiter.admit([scope], 1)
    clock.advance(2 * 86400)
    await limiter.admit([team_scope("last", Limits(requests_per_minute=5))], 0)
    assert len(limiter._tats) <= 1
    assert not limiter._budgets
