"""The rate_limit plugin in a running gateway, over loopback HTTP (fake upstream -> gateway ->
aiohttp client): RPM bursts and OpenAI's headers, token reservations that hold for streams,
concurrency slots released on every ending, one global limit across two gateways sharing a
real redis-server, Redis outages, per-key and per-model scopes, fair share at a shared
deployment, and `auth: none`.

Synchronisation is by events only: a tracker plugin placed after rate_limit records
`on_request` and `on_end` (so once it saw a request end, rate_limit's own `on_end` ran),
and gated upstream scripts hold a stream open until the test releases it. Every wait is
bounded. Redis cases get their own redis-server (skipped without the binary, failed when
CI is set), never the shared one on 6379.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, ClassVar

import aiohttp
import orjson
import pytest

from gateway.auth import hash_key
from gateway.context import Outcome, RequestContext
from gateway.plugin import Plugin
from gateway.testing.fake_upstream import (
    Script,
    json_script,
    openai_completion,
    openai_stream,
)
from gateway.testing.harness import RunningGateway, run_gateway
from gateway.testing.redis_server import RedisServer
from plugins.rate_limit import MemoryRateLimiter, RateLimit, RedisRateLimiter
from plugins.token_count import TOKENS, TokenCounter
from tests.integration._support import (
    BOUND,
    CHAT,
    DONE,
    GatedScript,
    GatedUpstream,
    chat_body,
    config_for,
    final_error,
    gated_script,
    json_error,
)
from tests.unit.test_ratelimit import FakeClock, running_redis

ML_KEY = "sk-sluice-ml-ratelimit-key-000001"
ML_OTHER_KEY = "sk-sluice-ml-ratelimit-key-000002"
OPS_KEY = "sk-sluice-ops-ratelimit-key-00001"
OPS_OTHER_KEY = "sk-sluice-ops-ratelimit-key-00002"
TEAM_A_KEY = "sk-sluice-team-a-fairshare-00001"
TEAM_B_KEY = "sk-sluice-team-b-fairshare-00001"

RATELIMIT_HEADERS = ("limit", "remaining", "reset")
# openai_reset's format: Go durations at millisecond precision ("20ms", "7.66s", "1m0s").
RESET_FORMAT = re.compile(r"^(\d+ms|(\d+h)?(\d+m)?\d+(\.\d{1,3})?s)$")
# token_count estimates every model here with its heuristic: no tiktoken files needed.
TOKEN_COUNT = {"name": "token_count", "options": {"default_encoding": None}}


# ----- a plugin that records requests and endings ---------------------------------------------


@dataclass
class TrackLog:
    """Contexts seen by `on_request` (admitted by rate_limit) and by `on_end`, in order."""

    requests: list[RequestContext] = field(default_factory=list)
    ends: list[RequestContext] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def note(self, where: list[RequestContext], ctx: RequestContext) -> None:
        async with self.changed:
            where.append(ctx)
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], within: float = BOUND) -> None:
        """Block until `predicate()` holds (checked whenever the tracker records something)."""
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(predicate)

    async def wait_ended(self, ctx: RequestContext) -> None:
        """Block until `ctx`'s request ran its `on_end` hooks (rate_limit's included)."""
        await self.wait_for(lambda: any(seen is ctx for seen in self.ends))


class Tracker(Plugin):
    """Placed after rate_limit; each test binds a fresh subclass to its own log."""

    name = "tracker"
    log: ClassVar[TrackLog]

    async def on_request(self, ctx: RequestContext) -> None:
        await self.log.note(self.log.requests, ctx)

    async def on_end(self, ctx: RequestContext) -> None:
        await self.log.note(self.log.ends, ctx)


def make_tracker() -> tuple[dict[str, type[Any]], TrackLog]:
    """The plugin registry for these tests, with a Tracker bound to a fresh log."""
    record = TrackLog()

    class BoundTracker(Tracker):
        log = record

    registry: dict[str, type[Any]] = {
        "token_count": TokenCounter,
        "rate_limit": RateLimit,
        "tracker": BoundTracker,
    }
    return registry, record


# GatedUpstream honours `then="reset"` for gated scripts too (the connection is aborted).
HeldUpstream = GatedUpstream


@pytest.fixture
async def upstream() -> AsyncIterator[HeldUpstream]:
    """A fake upstream whose gated scripts hold chunks until the test releases them."""
    fake = HeldUpstream()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """rate_limit options for each backend: memory, or its own redis-server."""
    if request.param == "memory":
        yield {}
        return
    async with running_redis() as server:
        yield {"backend": "redis", "redis_url": server.url, "timeout_ms": 2000}


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    """A throwaway redis-server (skipped without the binary unless CI is set)."""
    async with running_redis() as server:
        yield server


# ----- config and requests --------------------------------------------------------------------


def key(name: str, secret: str, limits: Mapping[str, int] | None = None) -> dict[str, Any]:
    """One key of a team, by its hash."""
    entry: dict[str, Any] = {"name": name, "sha256": hash_key(secret)}
    if limits is not None:
        entry["limits"] = dict(limits)
    return entry


def ml_team(limits: Mapping[str, int], **extra: Any) -> dict[str, Any]:
    """Team `ml` with `limits` and the one key ML_KEY (no limits of its own)."""
    return {"ml": {"limits": dict(limits), "keys": [key("ci", ML_KEY)], **extra}}


def gateway_config(
    fake: GatedUpstream,
    teams: Mapping[str, Any] | None,
    *,
    options: Mapping[str, Any] | None = None,
    **upstream: Any,
) -> dict[str, Any]:
    """Model `m` on the fake; chain token_count -> rate_limit -> tracker; `teams` if given."""
    plugins = [TOKEN_COUNT, {"name": "rate_limit", "options": dict(options or {})}]
    config = config_for(fake, plugins=[*plugins, {"name": "tracker"}], **upstream)
    if teams is not None:
        config["teams"] = dict(teams)
    return config


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@dataclass
class Reply:
    """A whole response: status, headers (lower-cased names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        """The OpenAI-shaped `error` object of the body."""
        return json_error(self.body)

    def limits(self, kind: str) -> tuple[int, int, str] | None:
        """(limit, remaining, reset) of `x-ratelimit-*-{kind}`, or None if all are absent."""
        names = [f"x-ratelimit-{what}-{kind}" for what in RATELIMIT_HEADERS]
        present = [name in self.headers for name in names]
        if not any(present):
            return None
        assert all(present), (kind, self.headers)
        limit, remaining, reset = (self.headers[name] for name in names)
        assert RESET_FORMAT.match(reset), reset
        return int(limit), int(remaining), reset

    def retry_after(self) -> int:
        value = int(self.headers["retry-after"])
        assert value >= 1, self.headers
        return value


def _headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {name.lower(): value for name, value in resp.headers.items()}


async def post(
    http: aiohttp.ClientSession,
    gw: RunningGateway,
    headers: Mapping[str, str],
    body: Mapping[str, Any],
    within: float = BOUND,
) -> Reply:
    """POST a chat request and read the whole response."""
    async with (
        asyncio.timeout(within),
        http.post(gw.v1 + CHAT, json=dict(body), headers=dict(headers)) as resp,
    ):
        return Reply(resp.status, _headers(resp), await resp.read())


async def open_stream(
    http: aiohttp.ClientSession,
    gw: RunningGateway,
    headers: Mapping[str, str],
    body: Mapping[str, Any],
) -> tuple[aiohttp.ClientResponse, Reply]:
    """Start a stream and read up to its first event; the caller reads on or closes it."""
    async with asyncio.timeout(BOUND):
        resp = await http.post(gw.v1 + CHAT, json=dict(body), headers=dict(headers))
        try:
            assert resp.status == 200, await resp.read()
            first = await resp.content.readuntil(b"\n\n")
        except BaseException:
            resp.close()
            raise
    return resp, Reply(resp.status, _headers(resp), first)


def ask(content: str, **extra: Any) -> dict[str, Any]:
    """A streamed chat request whose single user message is `content`."""
    return chat_body(messages=[{"role": "user", "content": content}], **extra)


def rate_limit_plugin(gw: RunningGateway) -> RateLimit:
    """The gateway's rate_limit plugin instance (one per gateway, shared by every route)."""
    found = {id(e.plugin): e.plugin for e in gw.state.default_chain.entries}
    plugins = [p for p in found.values() if isinstance(p, RateLimit)]
    assert len(plugins) == 1
    return plugins[0]


def redis_limiter(gw: RunningGateway) -> RedisRateLimiter:
    """The Redis limiter behind the gateway's rate_limit plugin."""
    limiter = rate_limit_plugin(gw).limiter
    assert isinstance(limiter, RedisRateLimiter)
    return limiter


def assert_refused(reply: Reply, kind: str, scope: str | None = None) -> dict[str, Any]:
    """A 429 rate_limit_exceeded of `kind` (naming `scope` if given), with Retry-After."""
    assert reply.status == 429, (reply.status, reply.body)
    error = reply.error()
    assert error["code"] == "rate_limit_exceeded", error
    assert error["type"] == kind, error
    if scope is not None:
        assert scope in error["message"], error
    reply.retry_after()
    return error


# ----- 1. a burst against requests per minute -------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "tpm"),
    [(False, None), (True, None), (False, 100_000), (True, 100_000)],
    ids=["unary", "stream", "unary-tpm", "stream-tpm"],
)
async def test_a_burst_of_n_plus_one_lets_exactly_n_through_with_openai_headers(
    upstream: HeldUpstream, http: aiohttp.ClientSession, stream: bool, tpm: int | None
) -> None:
    n = 3
    limits = {"requests_per_minute": n, **({"tokens_per_minute": tpm} if tpm else {})}
    registry, _log = make_tracker()
    if not stream:
        upstream.queue(*(json_script(openai_completion("ok")) for _ in range(n)))
    async with run_gateway(gateway_config(upstream, ml_team(limits)), registry=registry) as gw:
        replies = await asyncio.gather(
            *(post(http, gw, bearer(ML_KEY), chat_body(stream=stream)) for _ in range(n + 1))
        )
    admitted = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status != 200]
    assert len(admitted) == n, [(r.status, r.body) for r in replies]
    assert len(upstream.exchanges) == n
    (denied,) = refused
    error = assert_refused(denied, "requests", "team:ml")
    assert "requests per minute" in error["message"]
    assert 1 <= denied.retry_after() <= 60

    for reply in admitted:
        if stream:
            assert reply.body.endswith(DONE)
        else:
            assert orjson.loads(reply.body)["choices"][0]["message"]["content"] == "ok"
    # Every response carries the headers, the 200s too; remaining falls one per admission.
    requests = [r.limits("requests") for r in admitted]
    assert all(r is not None and r[0] == n for r in requests), requests
    by_admission = sorted(admitted, key=lambda r: -_remaining(r, "requests"))
    assert [_remaining(r, "requests") for r in by_admission] == list(range(n - 1, -1, -1))
    assert denied.limits("requests") is not None
    assert _remaining(denied, "requests") == 0
    if tpm is None:
        assert all(r.limits("tokens") is None for r in replies)
    else:
        tokens = [_remaining(r, "tokens") for r in by_admission]
        assert tokens[0] < tpm - 1024  # default_max_tokens is reserved
        assert all(a > b for a, b in pairwise(tokens)), tokens
        assert all(_limit(r, "tokens") == tpm for r in replies)


def _remaining(reply: Reply, kind: str) -> int:
    values = reply.limits(kind)
    assert values is not None, (kind, reply.headers)
    return values[1]


def _limit(reply: Reply, kind: str) -> int:
    values = reply.limits(kind)
    assert values is not None, (kind, reply.headers)
    return values[0]


async def test_rate_limit_headers_ride_on_upstream_errors_too(
    upstream: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    failing = json_script({"error": {"message": "boom", "type": "server_error"}}, 500)
    upstream.queue(failing)
    registry, _log = make_tracker()
    config = gateway_config(upstream, ml_team({"requests_per_minute": 5}))
    async with run_gateway(config, registry=registry) as gw:
        reply = await post(http, gw, bearer(ML_KEY), chat_body())
    assert reply.status == 502, reply.body
    assert reply.limits("requests") is not None
    assert _remaining(reply, "requests") == 4


# ----- 2. token limits hold for streams ---------------------------------------------------------


async def test_tokens_are_reserved_at_admission_and_corrected_after_the_stream(
    upstream: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    tpm = 1000
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    script, (gate,) = gated_script(openai_stream(["a", "b"], usage=usage), 2)
    upstream.queue(script)
    registry, log = make_tracker()
    config = gateway_config(upstream, ml_team({"tokens_per_minute": tpm}), include_usage=True)
    async with run_gateway(config, registry=registry) as gw:
        resp, first = await open_stream(http, gw, bearer(ML_KEY), chat_body(max_tokens=700))
        try:
            (held,) = log.requests
            counted = held.get(TOKENS)
            assert counted is not None
            prompt = counted.prompt_tokens
            assert prompt > 0
            # The reservation is the prompt plus max_tokens, taken at admission.
            assert _limit(first, "tokens") == tpm
            assert _remaining(first, "tokens") == tpm - prompt - 700
            # Another 700 does not fit beside what the open stream reserved.
            refused = await post(http, gw, bearer(ML_KEY), chat_body(max_tokens=700))
            error = assert_refused(refused, "tokens", "team:ml")
            assert "tokens per minute" in error["message"]
            assert _remaining(refused, "tokens") < prompt + 700
            assert len(upstream.exchanges) == 1
            gate.set()
            async with asyncio.timeout(BOUND):
                rest = await resp.read()
        finally:
            resp.close()
        await log.wait_ended(held)
        assert (held.usage.source, held.usage.total_tokens) == ("upstream", 7)
        # Only the 7 tokens really used stay charged: the next 700 fits again.
        again = await post(http, gw, bearer(ML_KEY), chat_body(max_tokens=700))
    assert (first.body + rest).endswith(DONE)
    assert b'"usage"' not in first.body + rest  # asked by the gateway, not by the client
    exchange = upstream.exchanges[0]
    assert exchange.body["stream_options"] == {"include_usage": True}
    assert again.status == 200, again.body
    assert again.body.endswith(DONE)
    assert _remaining(again, "tokens") >= tpm - 7 - (prompt + 700)


async def test_usage_beyond_the_reservation_is_charged_after_the_stream(
    upstream: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    tpm = 1000
    usage = {"prompt_tokens": 5, "completion_tokens": 985, "total_tokens": 990}
    upstream.queue(Script(openai_stream(["long"], usage=usage)))
    registry, log = make_tracker()
    config = gateway_config(upstream, ml_team({"tokens_per_minute": tpm}), include_usage=True)
    async with run_gateway(config, registry=registry) as gw:
        first = await post(http, gw, bearer(ML_KEY), chat_body(max_tokens=50))
        await log.wait_ended(log.requests[0])
        refused = await post(http, gw, bearer(ML_KEY), chat_body(max_tokens=100))
    assert first.status == 200, first.body
    assert_refused(refused, "tokens", "team:ml")
    assert _remaining(refused, "tokens") < 100  # 990 of 1000 were used
    assert len(upstream.exchanges) == 1


async def test_a_request_without_max_tokens_reserves_default_max_tokens(
    upstream: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    tpm = 1000
    teams = {
        "ml": {"limits": {"tokens_per_minute": tpm}, "keys": [key("ci", ML_KEY)]},
        "ops": {"limits": {"tokens_per_minute": tpm}, "keys": [key("bot", OPS_KEY)]},
    }
    registry, log = make_tracker()
    config = gateway_config(upstream, teams, options={"default_max_tokens": 300})
    async with run_gateway(config, registry=registry) as gw:
        implicit = await post(http, gw, bearer(ML_KEY), chat_body())
        explicit = await post(http, gw, bearer(OPS_KEY), chat_body(max_tokens=50))
        too_big = await post(http, gw, bearer(OPS_KEY), chat_body(max_tokens=tpm))
    prompts = {ctx.identity.team: ctx.get(TOKENS) for ctx in log.requests}
    assert set(prompts) == {"ml", "ops"}
    ml, ops = prompts["ml"], prompts["ops"]
    assert ml is not None
    assert ops is not None
    assert implicit.status == explicit.status == 200
    # A fresh bucket: remaining is exactly the limit minus the reservation.
    assert _remaining(implicit, "tokens") == tpm - ml.prompt_tokens - 300
    assert _remaining(explicit, "tokens") == tpm - ops.prompt_tokens - 50
    # More than the whole limit can never fit: refused without advising a retry.
    assert too_big.status == 429
    error = too_big.error()
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "tokens")
    assert "retry-after" not in too_big.headers


# ----- 3. concurrent streams: the slot comes back on every ending ------------------------------

# How the held stream ends: its outcome, and the code of the final error event the client got.
ENDINGS: dict[str, tuple[Outcome, str | None]] = {
    "completed": (Outcome.COMPLETED, None),
    "client_disconnect": (Outcome.CLIENT_DISCONNECTED, None),
    "upstream_truncated": (Outcome.UPSTREAM_ERROR, "upstream_truncated"),
    "upstream_reset": (Outcome.UPSTREAM_ERROR, "upstream_error"),
    "idle_timeout": (Outcome.TIMEOUT, "upstream_idle_timeout"),
}


def _held_script(ending: str) -> tuple[GatedScript, asyncio.Event]:
    """Role and one token, then held at chunk 2; what follows depends on `ending`."""
    if ending in ("upstream_truncated", "upstream_reset"):
        chunks = openai_stream(["one", "two"], done=False)[:3]  # no finish, no [DONE]
    else:
        chunks = openai_stream(["one", "two"])
    then = "reset" if ending == "upstream_reset" else "eof"
    script, (gate,) = gated_script(chunks, 2, then=then)
    return script, gate


async def _end_stream(ending: str, resp: aiohttp.ClientResponse, gate: asyncio.Event) -> bytes:
    """End a held stream the given way; what the client read after its first event."""
    if ending == "client_disconnect":
        resp.close()
        return b""
    if ending != "idle_timeout":
        gate.set()
    async with asyncio.timeout(BOUND):
        return await resp.read()


@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_a_stream_slot_is_released_on_every_ending(
    upstream: HeldUpstream, http: aiohttp.ClientSession, backend: dict[str, Any], ending: str
) -> None:
    script, gate = _held_script(ending)
    upstream.queue(script)
    registry, log = make_tracker()
    limits = {"concurrent_streams": 1, "tokens_per_minute": 1000}
    timeouts = {"timeouts": {"idle": 0.3}} if ending == "idle_timeout" else {}
    config = gateway_config(upstream, ml_team(limits), options=backend, **timeouts)
    async with run_gateway(config, registry=registry) as gw:
        resp, first = await open_stream(http, gw, bearer(ML_KEY), chat_body(max_tokens=700))
        try:
            (held,) = log.requests
            # A small request fits the tokens left, but not beside the open stream.
            refused = await post(http, gw, bearer(ML_KEY), chat_body(max_tokens=10))
            error = assert_refused(refused, "concurrency", "team:ml")
            assert "concurrent streams" in error["message"]
            assert refused.retry_after() == 1
            rest = await _end_stream(ending, resp, gate)
        finally:
            gate.set()
            resp.close()
        await log.wait_ended(held)
        # Slot and the unused 700-token reservation are both back: another 700 fits.
        after = await post(http, gw, bearer(ML_KEY), chat_body(max_tokens=700))
    outcome, code = ENDINGS[ending]
    assert held.outcome is outcome
    received = first.body + rest
    if ending == "completed":
        assert received.endswith(DONE)
    elif code is not None:
        assert final_error(received)["code"] == code
    assert after.status == 200, (after.status, after.body)
    assert after.body.endswith(DONE)
    assert len(upstream.exchanges) == 2


async def test_a_stream_longer_than_the_lease_ttl_keeps_its_slot(
    upstream: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    """Concurrency slots are leases that expire (for crashed replicas); a live stream that
    keeps sending events must keep its slot, however long it runs."""
    script, gates = gated_script(openai_stream(["t"] * 4), 2, 3, 4)
    upstream.queue(script)
    registry, _log = make_tracker()
    config = gateway_config(upstream, ml_team({"concurrent_streams": 1}))
    async with run_gateway(config, registry=registry) as gw:
        limiter = rate_limit_plugin(gw).limiter
        assert isinstance(limiter, MemoryRateLimiter)
        clock = FakeClock(time.time())
        limiter.clock = clock
        resp, _first = await open_stream(http, gw, bearer(ML_KEY), chat_body())
        try:
            # Events keep flowing, one every 40% of the lease's TTL (simulated time).
            for gate in gates[:2]:
                clock.advance(limiter.lease_ttl * 0.4)
                gate.set()
                async with asyncio.timeout(BOUND):
                    await resp.content.readuntil(b"\n\n")
            clock.advance(limiter.lease_ttl * 0.4)  # 120% of the TTL since admission
            second = await post(http, gw, bearer(ML_KEY), chat_body())
            gates[2].set()
            async with asyncio.timeout(BOUND):
                rest = await resp.read()
        finally:
            for gate in gates:
                gate.set()
            resp.close()
    assert rest.endswith(DONE)
    assert_refused(second, "concurrency", "team:ml")


# ----- 4. two gateways, one Redis, one limit ----------------------------------------------------


async def test_two_gateways_sharing_redis_enforce_one_global_limit(
    upstream: HeldUpstream, http: aiohttp.ClientSession, redis: RedisServer
) -> None:
    n = 4
    options = {"backend": "redis", "redis_url": redis.url, "timeout_ms": 2000}
    config = gateway_config(upstream, ml_team({"requests_per_minute": n}), options=options)
    registry, _log = make_tracker()
    async with (
        run_gateway(config, registry=registry) as one,
        run_gateway(config, registry=registry) as two,
    ):
        replies = [await post(http, gw, bearer(ML_KEY), chat_body()) for gw in [one, two] * n]
    assert [r.status for r in replies] == [200] * n + [429] * n
    assert [_remaining(r, "requests") for r in replies[:n]] == list(range(n - 1, -1, -1))
    for reply in replies[n:]:
        assert_refused(reply, "requests", "team:ml")
    assert len(upstream.exchanges) == n


async def test_a_stream_slot_held_through_one_gateway_counts_on_the_other(
    upstream: HeldUpstream, http: aiohttp.ClientSession, redis: RedisServer
) -> None:
    script, (gate,) = gated_script(openai_stream(["held"]), 2)
    upstream.queue(script)
    options = {"backend": "redis", "redis_url": redis.url, "timeout_ms": 2000}
    config = gateway_config(upstream, ml_team({"concurrent_streams": 1}), options=options)
    registry, log = make_tracker()
    async with (
        run_gateway(config, registry=registry) as one,
        run_gateway(config, registry=registry) as two,
    ):
        resp, _first = await open_stream(http, one, bearer(ML_KEY), chat_body())
        try:
            (held,) = log.requests
            refused = await post(http, two, bearer(ML_KEY), chat_body())
            gate.set()
            async with asyncio.timeout(BOUND):
                await resp.read()
        finally:
            gate.set()
            resp.close()
        await log.wait_ended(held)
        after = await post(http, two, bearer(ML_KEY), chat_body())
    assert_refused(refused, "concurrency", "team:ml")
    assert after.status == 200, after.body


# ----- 5. Redis outages ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_stopped_mid_test_fails_open_or_closed_then_limits_again(
    upstream: HeldUpstream, http: aiohttp.ClientSession, redis: RedisServer, mode: str
) -> None:
    n = 3
    options = {
        "backend": "redis",
        "redis_url": redis.url,
        "timeout_ms": 1000,
        "on_backend_error": mode,
    }
    config = gateway_config(upstream, ml_team({"requests_per_minute": n}), options=options)
    registry, _log = make_tracker()
    async with run_gateway(config, registry=registry) as gw:
        before = await post(http, gw, bearer(ML_KEY), chat_body())
        await redis.stop()
        # More than the limit allows: with Redis down nothing is counted.
        outage = [await post(http, gw, bearer(ML_KEY), chat_body(), 2.0) for _ in range(n + 1)]
        failures = redis_limiter(gw).failures
        await redis.start()  # empty: the limit starts afresh
        back = [await post(http, gw, bearer(ML_KEY), chat_body()) for _ in range(n + 1)]
    assert before.status == 200
    assert _remaining(before, "requests") == n - 1
    assert failures >= n + 1
    for reply in outage:
        assert reply.limits("requests") is None
        if mode == "open":
            assert reply.status == 200, reply.body
            assert reply.body.endswith(DONE)
        else:
            assert reply.status == 503, reply.body
            error = reply.error()
            assert error["code"] == "rate_limit_backend_unavailable", error
            assert reply.headers["retry-after"] == "1"
    assert [r.status for r in back] == [200] * n + [429]
    assert_refused(back[-1], "requests", "team:ml")


async def test_a_hung_redis_fails_closed_within_the_timeout(
    upstream: HeldUpstream, http: aiohttp.ClientSession, redis: RedisServer
) -> None:
    options = {
        "backend": "redis",
        "redis_url": redis.url,
        "timeout_ms": 200,
        "on_backend_error": "closed",
    }
    config = gateway_config(upstream, ml_team({"requests_per_minute": 100}), options=options)
    registry, _log = make_tracker()
    async with run_gateway(config, registry=registry) as gw:
        limiter = redis_limiter(gw)
        assert limiter.timeout == 0.2
        limiter.timeout = 2.0  # the warm-up (loading the script) must not fail on a busy machine
        before = await post(http, gw, bearer(ML_KEY), chat_body())
        limiter.timeout = 0.2
        redis.pause()  # a hung server: it accepts the connection, never answers
        try:
            during = await post(http, gw, bearer(ML_KEY), chat_body(), 2.0)
        finally:
            redis.resume()
        limiter.timeout = 2.0
        after = await post(http, gw, bearer(ML_KEY), chat_body())
    assert before.status == 200
    assert during.status == 503, during.body
    assert during.error()["code"] == "rate_limit_backend_unavailable"
    assert after.status == 200, after.body
    assert after.limits("requests") is not None


# ----- 6. per-key and per-model scopes ----------------------------------------------------------


def _scoped_config(upstream: HeldUpstream, model_limits_key: str) -> dict[str, Any]:
    teams = {
        "ml": {
            "limits": {"requests_per_minute": 10},
            "model_limits": {model_limits_key: {"requests_per_minute": 1}},
            "keys": [
                key("capped", ML_KEY, {"requests_per_minute": 2}),
                key("free", ML_OTHER_KEY),
            ],
        },
        "ops": {
            "limits": {"requests_per_minute": 2},
            "keys": [key("bot", OPS_KEY), key("bot2", OPS_OTHER_KEY)],
        },
    }
    config = gateway_config(upstream, teams)
    config["routes"].append(
        {"model": "m2", "aliases": ["m2-alias"], "upstream": "fake", "retries": 0}
    )
    return config


async def test_key_team_and_team_model_limits_are_enforced_separately(
    upstream: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    registry, _log = make_tracker()
    capped, free = bearer(ML_KEY), bearer(ML_OTHER_KEY)
    async with run_gateway(_scoped_config(upstream, "m2"), registry=registry) as gw:

        async def chat(headers: Mapping[str, str], model: str = "m") -> Reply:
            return await post(http, gw, headers, chat_body(model=model))

        key_limited = [await chat(capped) for _ in range(3)]
        free_on_m = await chat(free)
        model_limited = [await chat(free, "m2"), await chat(free, "m2-alias")]
        free_on_m_again = await chat(free)
        ops = [
            await chat(bearer(OPS_KEY)),
            await chat({"x-api-key": OPS_OTHER_KEY}),
            await chat(bearer(OPS_KEY)),
        ]
    # The key's own limit (2), well below its team's (10).
    assert [r.status for r in key_limited] == [200, 200, 429]
    assert_refused(key_limited[2], "requests", "key:ml/capped")
    assert (_limit(key_limited[1], "requests"), _remaining(key_limited[1], "requests")) == (2, 0)
    # Another key of the team is not held back by that key's limit; the team's counts.
    assert free_on_m.status == 200
    assert _limit(free_on_m, "requests") == 10
    assert _remaining(free_on_m, "requests") == 7
    # Team + route: one request per minute on m2, whatever name (route or alias) is used.
    assert [r.status for r in model_limited] == [200, 429]
    assert_refused(model_limited[1], "requests", "team:ml|model:m2")
    assert free_on_m_again.status == 200
    # A key without limits under a limited team: the team's limit, shared by its keys.
    assert [r.status for r in ops] == [200, 200, 429]
    assert_refused(ops[2], "requests", "team:ops")
    assert _limit(ops[0], "requests") == 2


async def test_model_limits_keyed_by_a_route_alias_apply_to_that_route(
    upstream: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    """`TeamConfig.model_limits` is documented as "per route name or alias"."""
    registry, _log = make_tracker()
    async with run_gateway(_scoped_config(upstream, "m2-alias"), registry=registry) as gw:
        replies = [
            await post(http, gw, bearer(ML_OTHER_KEY), chat_body(model=model))
            for model in ("m2-alias", "m2-alias", "m2")
        ]
    assert [r.status for r in replies] == [200, 429, 429]


# ----- 7. fair share at a shared deployment -----------------------------------------------------


async def test_a_team_flooding_the_queue_does_not_starve_another_team(
    upstream: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    generous = {"requests_per_minute": 1000, "concurrent_streams": 50}
    teams = {
        "a": {"weight": 1, "limits": generous, "keys": [key("a", TEAM_A_KEY)]},
        "b": {"weight": 1, "limits": generous, "keys": [key("b", TEAM_B_KEY)]},
    }
    script, (gate,) = gated_script(openai_stream(["held"]), 2)
    upstream.queue(script)
    registry, log = make_tracker()
    config = gateway_config(upstream, teams, max_concurrent=1, max_queue=100)
    pending: list[asyncio.Task[Reply]] = []
    async with run_gateway(config, registry=registry) as gw:
        queue = gw.state.health["fake"].gate
        assert queue is not None
        resp, _first = await open_stream(http, gw, bearer(TEAM_A_KEY), ask("A-held"))
        try:
            for i in range(8):
                body = ask(f"A{i}")
                pending.append(asyncio.create_task(post(http, gw, bearer(TEAM_A_KEY), body)))
            # The tracker runs last in on_request: the queue is joined right after it.
            await log.wait_for(lambda: len(log.requests) == 9)
            assert (queue.in_use, queue.waiting) == (1, 8)
            pending.append(asyncio.create_task(post(http, gw, bearer(TEAM_B_KEY), ask("B"))))
            await log.wait_for(lambda: len(log.requests) == 10)
            assert queue.waiting == 9
            gate.set()
            async with asyncio.timeout(BOUND):
                await resp.read()
                replies = await asyncio.gather(*pending)
        finally:
            gate.set()
            resp.close()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    assert [r.status for r in replies] == [200] * 9
    order = [e.body["messages"][0]["content"] for e in upstream.exchanges]
    assert order[0] == "A-held"
    assert sorted(order[1:]) == sorted([f"A{i}" for i in range(8)] + ["B"])
    assert "B" in order[1:3], order  # within the next two grants, not after A's eight


# ----- 8. auth: none ---------------------------------------------------------------------------


async def test_without_keys_nothing_is_limited_and_no_headers_are_added(
    upstream: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    # Teams with limits but no keys: `auth` stays `none`, so no request has a principal.
    teams = {"ml": {"limits": {"requests_per_minute": 1, "concurrent_streams": 1}}}
    script, (gate,) = gated_script(openai_stream(["held"]), 2)
    upstream.queue(script, *(json_script(openai_completion("ok")) for _ in range(2)))
    registry, log = make_tracker()
    config = gateway_config(upstream, teams)
    async with run_gateway(config, registry=registry) as gw:
        assert gw.state.keys is None
        resp, first = await open_stream(http, gw, {}, chat_body())
        try:
            replies = [await post(http, gw, {}, chat_body(stream=False)) for _ in range(2)]
            replies += [await post(http, gw, {}, chat_body()) for _ in range(2)]
            gate.set()
            async with asyncio.timeout(BOUND):
                await resp.read()
        finally:
            gate.set()
            resp.close()
        await log.wait_for(lambda: len(log.ends) == 5)
    assert [r.status for r in replies] == [200] * 4
    for reply in [first, *replies]:
        assert not [h for h in reply.headers if h.startswith("x-ratelimit-")], reply.headers
        assert "retry-after" not in reply.headers
    assert {ctx.identity.team for ctx in log.ends} == {"anonymous"}


# ----- hard budgets -------------------------------------------------------------------------


async def test_hard_budget_cuts_a_running_stream_with_a_final_event(
    upstream: HeldUpstream, http: aiohttp.ClientSession
) -> None:
    """The daily budget admits the reservation, then runs out while the answer streams: the
    stream ends with one final error event (budget_exhausted), well before its 40 tokens."""
    tokens = [f" t{i}" for i in range(40)]
    chunks = openai_stream(tokens)
    script, gates = gated_script(chunks, *range(2, len(chunks)))
    upstream.queue(script)
    options = {"hard_budget": True, "debit_every_tokens": 1, "debit_every_seconds": 0}
    config = gateway_config(upstream, ml_team({"tokens_per_day": 40}), options=options)
    registry, _log = make_tracker()
    body = chat_body(max_tokens=2)
    received = b""
    async with run_gateway(config, registry=registry) as gw:
        resp, first = await open_stream(http, gw, bearer(ML_KEY), body)
        try:
            assert first.status == 200
            received = first.body
            for gate in gates:
                gate.set()
                async with asyncio.timeout(BOUND):
                    event = await resp.content.readuntil(b"\n\n")
                received += event
                if b'"error"' in event or event == DONE:
                    break
        finally:
            for gate in gates:
                gate.set()
            resp.close()
    assert not received.endswith(DONE)
    assert final_error(received)["code"] == "budget_exhausted"
    assert 0 < received.count(b'"content":" t') < len(tokens)
