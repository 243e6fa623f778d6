"""The rate_limit plugin on its Redis backend at default settings, in running gateways:
slots given back when a drain cuts streams, two freshly started replicas under a burst,
streamed tokens debited while an answer runs (an upstream that ignores `max_tokens`).

Each test gets its own redis-server (never the shared one on 6379). Synchronisation is by
events only (gated upstream scripts, the tracker plugin, the stream's own debit task).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.context import RequestContext
from gateway.testing.fake_upstream import openai_stream
from gateway.testing.harness import run_gateway
from gateway.testing.redis_server import RedisServer
from gateway.testing.slow_link import SlowLink
from plugins.rate_limit import _HELD, RateLimitOptions, RedisRateLimiter
from tests.integration._support import BOUND, DONE, chat_body, gated_script
from tests.integration.test_rate_limit_plugin import (
    ML_KEY,
    HeldUpstream,
    bearer,
    gateway_config,
    make_tracker,
    ml_team,
    open_stream,
    post,
    redis_limiter,
)
from tests.unit.test_ratelimit import running_redis

CONC_KEY = "sluice:rl:s:team:ml:conc"


@pytest.fixture
async def upstream() -> AsyncIterator[HeldUpstream]:
    fake = HeldUpstream()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with running_redis() as server:
        yield server


@pytest.fixture
async def admin(redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def defaults(redis: RedisServer) -> dict[str, Any]:
    """rate_limit options: the Redis backend, every other option at its default."""
    return {"backend": "redis", "redis_url": redis.url}


async def test_streams_cut_at_the_drain_deadline_give_their_slots_back(
    upstream: HeldUpstream, http: aiohttp.ClientSession, redis: RedisServer, admin: Redis
) -> None:
    """A drain cuts three streams while Redis drops what is sent to it: the releases are
    retried, and shutting down waits for them, so no slot outlives the gateway."""
    gates = []
    for _ in range(3):
        script, (gate,) = gated_script(openai_stream(["a", "b"]), 2)
        upstream.queue(script)
        gates.append(gate)
    registry, log = make_tracker()
    responses: list[aiohttp.ClientResponse] = []
    async with SlowLink(redis.port) as link:
        options = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{link.port}/0"}
        config = gateway_config(upstream, ml_team({"concurrent_streams": 3}), options=options)
        try:
            async with run_gateway(config, registry=registry) as gw:
                for _ in range(3):
                    resp, _first = await open_stream(http, gw, bearer(ML_KEY), chat_body())
                    responses.append(resp)
                assert await admin.zcard(CONC_KEY) == 3
                assert gw.state.proxy is not None
                link.mode = "lost"  # a Redis hiccup during the rolling deploy
                async with asyncio.timeout(BOUND):
                    assert await gw.state.proxy.drain(0.0) == 3
                    await log.wait_for(lambda: len(log.ends) == 3)
                assert await admin.zcard(CONC_KEY) == 3  # the first releases were lost
                link.mode = "pass"
        finally:
            link.mode = "pass"
            for gate in gates:
                gate.set()
            for resp in responses:
                resp.close()
    assert await admin.zcard(CONC_KEY) == 0
    assert not [k async for k in admin.scan_iter(match="sluice:rl:lease:*")]


async def test_two_fresh_replicas_under_a_burst_enforce_the_limit_with_headers(
    upstream: HeldUpstream, http: aiohttp.ClientSession, redis: RedisServer, admin: Redis
) -> None:
    """Ready means connected: the scripts are loaded before the first request, which then
    is one EVALSHA; 25 requests at once against 20/minute over two replicas: exactly 20
    pass, 5 are refused, and every one of them carries the x-ratelimit headers."""
    registry, _log = make_tracker()
    options = defaults(redis)
    config = gateway_config(upstream, ml_team({"requests_per_minute": 20}), options=options)
    async with (
        run_gateway(config, registry=registry) as one,
        run_gateway(config, registry=registry) as two,
    ):
        for gw in (one, two):
            assert gw.state.ready
            limiter = redis_limiter(gw)
            scripts = [limiter._admit.sha, limiter._debit.sha, limiter._finish.sha]
            assert await admin.script_exists(*scripts) == [True, True, True]
        clients = await admin.client_list()
        # both replicas opened their (pipelined) connection, and the admin its own
        assert len(clients) >= 2 + 1
        await admin.config_resetstat()
        replies = await asyncio.gather(
            *(post(http, (one, two)[i % 2], bearer(ML_KEY), chat_body()) for i in range(25))
        )
        stats = await admin.info("commandstats")
    assert sorted(r.status for r in replies) == [200] * 20 + [429] * 5
    for reply in replies:
        assert reply.limits("requests") is not None, reply.headers
    assert "cmdstat_script|load" not in stats
    assert int(stats["cmdstat_evalsha"]["calls"]) >= 25


async def test_streamed_tokens_past_the_reservation_count_on_the_other_replica(
    upstream: HeldUpstream, http: aiohttp.ClientSession, redis: RedisServer, admin: Redis
) -> None:
    """An upstream that ignores max_tokens: while its answer still streams through replica
    one, the tokens it used beyond its reservation are already charged, so replica two
    refuses a request that no longer fits the tokens-per-minute limit."""
    words = ["word " * 1000, "more " * 1000]  # ~1,000 tokens each, far past max_tokens=10
    script, (gate,) = gated_script(openai_stream(words), 2)
    upstream.queue(script)
    registry, log = make_tracker()
    options = {**defaults(redis), "debit_every_seconds": 0}
    team = ml_team({"tokens_per_minute": 2000})
    config = gateway_config(upstream, team, options=options)
    async with (
        run_gateway(config, registry=registry) as one,
        run_gateway(config, registry=registry) as two,
    ):
        resp, _first = await open_stream(http, one, bearer(ML_KEY), chat_body(max_tokens=10))
        try:
            async with asyncio.timeout(BOUND):  # the first word event passed the plugins
                await resp.content.readuntil(b"\n\n")
            (ctx,) = log.requests
            await debit_landed(ctx)
            # ~1,000 tokens of 2,000 used: a request reserving 1,000 more does not fit
            refused = await post(http, two, bearer(ML_KEY), chat_body(max_tokens=1000))
            gate.set()
            async with asyncio.timeout(BOUND):
                rest = await resp.read()
        finally:
            gate.set()
            resp.close()
    assert rest.endswith(DONE)
    assert refused.status == 429, refused.body
    assert refused.error()["type"] == "tokens"


async def debit_landed(ctx: RequestContext) -> None:
    """Wait for the stream's debit in flight (the plugin starts at most one at a time)."""
    held = ctx.get(_HELD)
    assert held is not None
    pending = held.pending
    assert pending is not None, "no debit was started while the answer streamed"
    async with asyncio.timeout(BOUND):
        assert await pending


def test_the_default_redis_timeout_leaves_room_on_a_loaded_machine() -> None:
    defaults = RedisRateLimiter.__init__.__kwdefaults__
    assert defaults is not None
    assert defaults["timeout"] >= 0.25
    assert RateLimitOptions().timeout_ms >= 250
