"""What requests cost, through running gateways (fake upstream reporting usage -> gateway ->
aiohttp client): budgets in currency on the memory and Redis backends (refused once the
day's budget is spent, the unused reservation refunded, one budget shared by two
gateways), and the cost in the access log line and in `sluice_cost_total`.

Prices are chosen so that micro-units are easy to read: `gpt-test` costs 100 micro-units
per input token, 10 per cached input token and 1000 per output token; the fake answers
every request with 20 prompt and 10 completion tokens (12 000 micro-units, 0.012 USD).
Unary requests are used where counters are read: their `on_end` (reconciliation) runs
before the response is sent. Redis cases get their own redis-server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.testing.fake_upstream import (
    FakeUpstream,
    json_script,
    openai_completion,
    openai_stream,
)
from gateway.testing.harness import RunningGateway, run_gateway
from gateway.testing.redis_server import RedisServer
from plugins.access_log import AccessLog
from plugins.rate_limit import MemoryRateLimiter, RateLimit, RedisRateLimiter
from tests.integration._support import (
    BOUND,
    DONE,
    GatedUpstream,
    chat_body,
    config_for,
    final_error,
    gated_script,
)
from tests.integration.test_metrics import _scrape
from tests.integration.test_rate_limit_plugin import (
    ML_KEY,
    Reply,
    bearer,
    key,
    open_stream,
    post,
    rate_limit_plugin,
)
from tests.unit.test_ratelimit import running_redis

PRICES = {"gpt-test": {"input": 100, "cached_input": 10, "output": 1000}}
USAGE = {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}
COST = 12_000  # micro-units: 20 * 100 + 10 * 1000
REGISTRY: dict[str, type[Any]] = {"rate_limit": RateLimit, "access_log": AccessLog}


def answer(usage: Mapping[str, Any] = USAGE) -> dict[str, Any]:
    """A chat completion reporting `usage`."""
    return {**openai_completion("ok"), "usage": dict(usage)}


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream(json_script(answer()))
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
    async with running_redis() as server:
        yield server


def priced_config(
    fake: FakeUpstream,
    limits: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    plugins: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Model `m` (sent upstream as `gpt-test`) priced by PRICES; team `ml` with `limits`."""
    chain = plugins or [{"name": "rate_limit", "options": dict(options or {})}]
    config = config_for(fake, plugins=chain)
    config["pricing"] = {"currency": "USD", "models": PRICES}
    config["teams"] = {"ml": {"limits": dict(limits or {}), "keys": [key("ci", ML_KEY)]}}
    return config


def ask(max_tokens: int) -> dict[str, Any]:
    return chat_body(stream=False, max_tokens=max_tokens)


async def used_micros(gw: RunningGateway) -> int:
    """What team ml's cost budget of today holds, read from the limiter's store."""
    limiter = rate_limit_plugin(gw).limiter
    day = f"{dt.datetime.now(dt.UTC):%Y%m%d}"
    name = f"s:team:ml|cost:bd:{day}"
    if isinstance(limiter, MemoryRateLimiter):
        entry = limiter._budgets.get(name)
        return entry[0] if entry is not None else 0
    assert isinstance(limiter, RedisRateLimiter)
    raw = await limiter._redis.get(limiter.prefix + name)
    return int(raw) if raw is not None else 0


def assert_cost_refused(reply: Reply, scope: str) -> dict[str, Any]:
    assert reply.status == 429, (reply.status, reply.body)
    error = reply.error()
    assert error["code"] == "cost_budget_exceeded", error
    assert error["type"] == "cost_budget", error
    assert scope in error["message"], error
    return error


# ----- budgets --------------------------------------------------------------------------------


async def test_the_days_cost_budget_refuses_once_spent(
    upstream: FakeUpstream, http: aiohttp.ClientSession, backend: dict[str, Any]
) -> None:
    """0.05 USD a day: each request reserves about 10 800 and costs 12 000 micro-units, so
    four pass (48 000) and the fifth, which might cost 10 800 more, is refused until
    midnight UTC, without reaching the upstream."""
    config = priced_config(upstream, {"cost_per_day": "0.05"}, backend)
    async with run_gateway(config, registry=REGISTRY) as gw:
        replies = [await post(http, gw, bearer(ML_KEY), ask(10)) for _ in range(5)]
        used = await used_micros(gw)
        scrape = await _scrape(http, gw.url)
    assert [r.status for r in replies] == [200, 200, 200, 200, 429]
    assert scrape.get("sluice_rate_limit_rejections_total", team="ml", kind="cost_budget") == 1
    assert scrape.get("sluice_cost_total", team="ml", model="m") == pytest.approx(0.048, abs=1e-12)
    error = assert_cost_refused(replies[-1], "team:ml")
    assert "cost_per_day" in error["message"]
    assert "0.05 USD per UTC day" in error["message"]
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime(now.year, now.month, now.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
    assert 1 <= replies[-1].retry_after() <= int((midnight - now).total_seconds()) + 2
    assert len(upstream.exchanges) == 4
    assert used == 4 * COST


async def test_reconciliation_refunds_what_was_reserved_but_not_used(
    upstream: FakeUpstream, http: aiohttp.ClientSession, backend: dict[str, Any]
) -> None:
    """1 USD a day; max_tokens 900 reserves about 0.90 USD, so two such requests fit only
    because each gives back all but the 0.012 it cost."""
    config = priced_config(upstream, {"cost_per_day": 1}, backend)
    async with run_gateway(config, registry=REGISTRY) as gw:
        first = await post(http, gw, bearer(ML_KEY), ask(900))
        assert await used_micros(gw) == COST
        second = await post(http, gw, bearer(ML_KEY), ask(900))
        used = await used_micros(gw)
        too_big = await post(http, gw, bearer(ML_KEY), ask(2000))  # 2 USD: never fits
    assert (first.status, second.status) == (200, 200)
    assert used == 2 * COST
    error = assert_cost_refused(too_big, "team:ml")
    assert "more than the whole cost_per_day budget" in error["message"]
    assert "retry-after" not in too_big.headers


async def test_a_request_refused_by_a_token_limit_gives_its_cost_reservation_back(
    upstream: FakeUpstream, http: aiohttp.ClientSession, backend: dict[str, Any]
) -> None:
    limits = {"cost_per_day": 1, "requests_per_minute": 1}
    config = priced_config(upstream, limits, backend)
    async with run_gateway(config, registry=REGISTRY) as gw:
        assert (await post(http, gw, bearer(ML_KEY), ask(10))).status == 200
        refused = await post(http, gw, bearer(ML_KEY), ask(10))
        used = await used_micros(gw)
    assert refused.status == 429
    assert refused.error()["code"] == "rate_limit_exceeded"
    assert used == COST  # the refused request's reservation went back


async def test_two_gateways_share_one_cost_budget_through_redis(
    upstream: FakeUpstream, http: aiohttp.ClientSession, redis: RedisServer
) -> None:
    options = {"backend": "redis", "redis_url": redis.url, "timeout_ms": 2000}
    config = priced_config(upstream, {"cost_per_day": "0.05"}, options)
    async with (
        run_gateway(config, registry=REGISTRY) as one,
        run_gateway(config, registry=REGISTRY) as two,
    ):
        replies = [await post(http, (one, two)[i % 2], bearer(ML_KEY), ask(10)) for i in range(5)]
        used = await used_micros(two)
    assert [r.status for r in replies] == [200, 200, 200, 200, 429]
    assert_cost_refused(replies[-1], "team:ml")
    assert used == 4 * COST


async def test_a_keys_monthly_cost_budget_names_the_key(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config = priced_config(upstream)
    config["teams"]["ml"]["keys"][0]["limits"] = {"cost_per_month": "0.02"}
    async with run_gateway(config, registry=REGISTRY) as gw:
        replies = [await post(http, gw, bearer(ML_KEY), ask(5)) for _ in range(3)]
    # each reserves 5 800 and costs 12 000: 0 + 5 800 and 12 000 + 5 800 fit in 20 000
    assert [r.status for r in replies] == [200, 200, 429]
    error = assert_cost_refused(replies[2], "key:ml/ci")
    assert "cost_per_month" in error["message"]


# ----- the access log and /metrics ------------------------------------------------------------


async def test_the_access_log_and_metrics_carry_each_requests_cost(
    upstream: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Cached prompt tokens are priced at the cached price; an unknown model costs 0."""
    log_path = tmp_path / "access.log"
    plugins = [{"name": "access_log", "options": {"stream": str(log_path)}}]
    config = priced_config(upstream, plugins=plugins)
    del config["teams"]
    config["routes"].append({"model": "free", "upstream": "fake", "upstream_model": "llama"})
    cached = {**USAGE, "prompt_tokens_details": {"cached_tokens": 15}}
    upstream.queue(json_script(answer(cached)), json_script(answer()), json_script(answer()))
    async with run_gateway(config, registry=REGISTRY) as gw:
        for model in ("m", "m", "free"):
            reply = await post(http, gw, {}, chat_body(stream=False, model=model))
            assert reply.status == 200, reply.body
        scrape = await _scrape(http, gw.url)
    lines = [orjson.loads(line) for line in log_path.read_text().splitlines()]
    costs = [(line["route"], line["cost"], line["currency"]) for line in lines]
    # 5 fresh at 100 + 15 cached at 10 + 10 out at 1000 = 10 650 micro-units
    assert costs == [("m", 0.01065, "USD"), ("m", 0.012, "USD"), ("free", 0.0, "USD")]
    assert scrape.get("sluice_cost_total", team="anonymous", model="m") == pytest.approx(
        0.02265, abs=1e-12
    )
    assert scrape.get("sluice_cost_total", model="free") == 0


async def test_hard_budget_cuts_a_stream_whose_cost_outruns_the_budget(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    """An upstream that ignores max_tokens: past its reservation, the stream's cost is
    debited as it runs, and once the day's 0.01 USD is spent the stream ends with one final
    error event (budget_exhausted, type cost_budget), well before its 40 tokens."""
    tokens = [f" t{i}" for i in range(40)]
    chunks = openai_stream(tokens)
    script, gates = gated_script(chunks, *range(2, len(chunks)))
    gated.queue(script)
    options = {"hard_budget": True, "debit_every_tokens": 1, "debit_every_seconds": 0}
    config = priced_config(gated, {"cost_per_day": "0.01"}, options)
    received = b""
    async with run_gateway(config, registry=REGISTRY) as gw:
        resp, first = await open_stream(http, gw, bearer(ML_KEY), chat_body(max_tokens=2))
        try:
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
    error = final_error(received)
    assert (error["code"], error["type"]) == ("budget_exhausted", "cost_budget")
    assert 0 < received.count(b'"content":" t') < len(tokens)
