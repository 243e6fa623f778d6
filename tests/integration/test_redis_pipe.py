"""The rate limiter's own pipelined Redis connection, against a real redis-server.

Replies must reach the caller that sent the command, whatever happens to the callers
around it (cancelled, timed out, lost on the way); the URL's database and password are
used; URLs it does not serve stay with redis-py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gateway.testing.redis_server import RedisServer
from gateway.testing.slow_link import SlowLink
from plugins.rate_limit import Limits, RedisRateLimiter, team_scope
from plugins.rate_limit.redis_pipe import PipelinedRedis, ReplyError, connect_params
from tests.unit.test_ratelimit import FakeClock, running_redis

BOUND = 2.0


@pytest.fixture
async def server() -> AsyncIterator[RedisServer]:
    async with running_redis() as srv:
        yield srv


@pytest.fixture
async def admin(server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def test_only_plain_tcp_urls_get_the_pipelined_connection() -> None:
    assert connect_params("redis://127.0.0.1:6380/2") == {
        "host": "127.0.0.1",
        "port": 6380,
        "db": 2,
    }
    assert connect_params("redis://u:p@h:1/0") == {
        "username": "u",
        "password": "p",
        "host": "h",
        "port": 1,
        "db": 0,
    }
    for url in ("rediss://h:1/0", "unix:///tmp/redis.sock", "redis://h:1/0?socket_timeout=3"):
        assert connect_params(url) is None, url
        assert RedisRateLimiter(url)._pipe is None


async def test_concurrent_admissions_share_one_connection_and_get_their_own_replies(
    server: RedisServer, admin: Redis
) -> None:
    limiter = RedisRateLimiter(server.url, timeout=BOUND, clock=FakeClock())
    scope = team_scope("ml", Limits(concurrent_streams=20, requests_per_minute=1000))
    try:
        assert await limiter.start()
        before = len(await admin.client_list())
        decisions = await asyncio.gather(*(limiter.admit([scope], 0) for _ in range(50)))
        assert len(await admin.client_list()) == before  # no connection opened per call
        assert sum(d.allowed for d in decisions) == 20
        # every reply went to its own caller: each admitted one took its own request, the
        # refused ones (which take nothing) all see what the 20 left
        remaining = [int(d.headers["x-ratelimit-remaining-requests"]) for d in decisions]
        assert sorted(r for d, r in zip(decisions, remaining, strict=True) if d.allowed) == list(
            range(980, 1000)
        )
        assert {r for d, r in zip(decisions, remaining, strict=True) if not d.allowed} == {980}
        await asyncio.gather(*(limiter.finish(d.lease, 0) for d in decisions if d.lease))
        assert await admin.zcard("sluice:rl:s:team:ml:conc") == 0
    finally:
        await limiter.close()


def test_it_works_on_uvloop(server: RedisServer) -> None:
    """The gateway serves on uvloop, whose transports are not asyncio's classes."""
    import uvloop

    async def run() -> list[object]:
        pipe = PipelinedRedis(port=server.port)
        try:
            async with asyncio.timeout(BOUND):
                return list(await asyncio.gather(*(pipe.call("INCR", "u") for _ in range(5))))
        finally:
            await pipe.close()

    assert sorted(uvloop.run(run())) == [1, 2, 3, 4, 5]  # type: ignore[type-var]


async def test_a_cancelled_caller_does_not_shift_the_replies_of_the_next(
    server: RedisServer,
) -> None:
    pipe = PipelinedRedis(port=server.port)
    try:
        await pipe.call("SET", "k", "v")
        first = asyncio.ensure_future(pipe.call("DEBUG", "SLEEP", "0.05"))
        await asyncio.sleep(0)  # the command is queued
        first.cancel()
        async with asyncio.timeout(BOUND):
            assert await pipe.call("GET", "k") == b"v"
            assert await pipe.call("INCR", "n") == 1
    finally:
        await pipe.close()


async def test_after_a_lost_request_times_out_the_next_call_gets_its_own_reply(
    server: RedisServer,
) -> None:
    async with SlowLink(server.port) as link:
        pipe = PipelinedRedis(port=link.port)
        try:
            assert await pipe.call("PING") == b"PONG"
            link.mode = "lost"
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await pipe.call("INCR", "lost")
            pipe.abort()  # what the limiter does after a timeout
            link.mode = "pass"
            async with asyncio.timeout(BOUND):
                assert await pipe.call("INCR", "n") == 1
                assert await pipe.call("GET", "lost") is None
        finally:
            await pipe.close()


async def test_the_urls_database_and_password_are_used(server: RedisServer, admin: Redis) -> None:
    await admin.config_set("requirepass", "s3cret")  # the admin's connection stays in
    limiter = RedisRateLimiter(
        f"redis://:s3cret@127.0.0.1:{server.port}/3", timeout=BOUND, clock=FakeClock()
    )
    wrong = RedisRateLimiter(
        f"redis://:nope@127.0.0.1:{server.port}/3", timeout=BOUND, clock=FakeClock()
    )
    scope = team_scope("ml", Limits(concurrent_streams=5))
    try:
        decision = await limiter.admit([scope], 0)
        assert decision.allowed
        assert decision.lease is not None
        assert not decision.lease.degraded
        db3 = Redis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        try:
            assert await db3.zcard("sluice:rl:s:team:ml:conc") == 1
        finally:
            await db3.aclose()
        refused = await wrong.admit([scope], 0)  # fails open, counted, never hangs
        assert refused.lease is not None
        assert refused.lease.degraded
        assert wrong.failures == 1
    finally:
        await limiter.close()
        await wrong.close()


async def test_an_error_reply_is_raised_to_its_caller_only(server: RedisServer) -> None:
    pipe = PipelinedRedis(port=server.port)
    try:
        replies: list[object] = await asyncio.gather(
            pipe.call("INCR", "a", "b"), pipe.call("ECHO", "x"), return_exceptions=True
        )
        bad, good = replies
        assert isinstance(bad, ReplyError)
        assert "wrong number of arguments" in str(bad)
        assert good == b"x"
    finally:
        await pipe.close()
