"""Routing and resilience over loopback: weights, aliases, prefixes, failover, health, queues."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.context import Outcome
from gateway.testing.fake_upstream import FakeUpstream, Script, json_script, openai_stream
from gateway.testing.harness import run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
    DONE,
    GatedUpstream,
    chat_body,
    chat_contents,
    closed_port,
    final_error,
    gated_script,
    make_probe,
)

ADMIN_KEY = "admin-secret-for-tests"


def _upstream(fake: FakeUpstream, **extra: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": fake.base_url, "include_usage": False, **extra}


def _error_json(status: int) -> Script:
    return json_script({"error": {"message": f"boom {status}", "type": "server_error"}}, status)


@pytest.fixture
async def second() -> AsyncIterator[FakeUpstream]:
    """Another fake upstream, for routes with two deployments."""
    async with FakeUpstream() as upstream:
        yield upstream


async def _chat(http: aiohttp.ClientSession, url: str, **body: Any) -> tuple[int, bytes]:
    async with asyncio.timeout(BOUND), http.post(url + CHAT, json=chat_body(**body)) as resp:
        return resp.status, await resp.read()


async def test_failover_to_the_next_deployment_when_one_cannot_be_reached(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    probe, log = make_probe()
    config = {
        "upstreams": {
            "down": {"kind": "openai", "base_url": f"http://127.0.0.1:{closed_port()}/v1"},
            "up": _upstream(fake),
        },
        "routes": [
            {
                "model": "m",
                "strategy": "least_outstanding",
                "deployments": [
                    {"upstream": "down", "upstream_model": "a", "weight": 5},
                    {"upstream": "up", "upstream_model": "b"},
                ],
                "retries": 1,
            }
        ],
        "plugins": [{"name": "probe"}],
    }
    async with run_gateway(config, registry={"probe": probe}) as gw:
        # least_outstanding with a tie picks the heavier deployment first: the dead one.
        status, raw = await _chat(http, gw.v1)
        (ctx,) = await log.wait_ends(1)
    assert status == 200
    assert raw.endswith(DONE)
    assert [e.body["model"] for e in fake.exchanges] == ["b"]
    assert (ctx.upstream_name, ctx.upstream_model, ctx.retries) == ("up", "b", 1)
    assert ctx.outcome is Outcome.COMPLETED


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_retry_on_5xx_and_429_before_the_first_byte(
    fake: FakeUpstream, http: aiohttp.ClientSession, status: int
) -> None:
    fake.queue(_error_json(status), Script(openai_stream(["ok"])))
    config = {
        "upstreams": {"fake": _upstream(fake)},
        "routes": [{"model": "m", "upstream": "fake", "retries": 1}],
    }
    async with run_gateway(config) as gw:
        got, raw = await _chat(http, gw.v1)
    assert got == 200
    assert chat_contents(raw) == ["ok"]
    assert len(fake.exchanges) == 2


async def test_a_4xx_is_not_retried(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    fake.queue(json_script({"error": {"message": "bad field", "type": "invalid"}}, 400))
    config = {
        "upstreams": {"fake": _upstream(fake)},
        "routes": [{"model": "m", "upstream": "fake", "retries": 2}],
    }
    async with run_gateway(config) as gw:
        status, _ = await _chat(http, gw.v1)
    assert status == 400
    assert len(fake.exchanges) == 1


async def test_retries_exhausted_return_the_last_error_with_retry_after(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    limited = json_script({"error": {"message": "slow down", "type": "rate_limit"}}, 429)
    limited.headers = {"Retry-After": "0"}
    fake.queue(limited, limited)
    config = {
        "upstreams": {"fake": _upstream(fake)},
        "routes": [{"model": "m", "upstream": "fake", "retries": 1}],
    }
    async with (
        run_gateway(config) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body()) as resp,
    ):
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "0"
        assert (await resp.json())["error"]["message"] == "slow down"
    assert len(fake.exchanges) == 2


async def test_never_retried_after_the_first_byte_reached_the_client(
    gated: GatedUpstream, second: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """The first deployment streams a token, then breaks: the client gets that token and a
    final error event; the second deployment is never asked (no duplicated tokens)."""
    script, _gates = gated_script(openai_stream(["one", "two"])[:2], then="reset")
    gated.queue(script)
    config = {
        "upstreams": {"first": _upstream(gated), "second": _upstream(second)},
        "routes": [
            {
                "model": "m",
                "deployments": [{"upstream": "first", "weight": 100}, {"upstream": "second"}],
                "retries": 3,
            }
        ],
    }
    async with run_gateway(config) as gw:
        status, raw = await _chat(http, gw.v1)
    assert status == 200
    assert b'"content":"one"' in raw
    assert b'"content":"two"' not in raw
    assert final_error(raw)["code"] in ("upstream_error", "upstream_truncated")
    assert second.exchanges == []


async def test_weighted_round_robin_splits_by_weight(
    fake: FakeUpstream, second: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config = {
        "upstreams": {"heavy": _upstream(fake), "light": _upstream(second)},
        "routes": [
            {
                "model": "m",
                "deployments": [
                    {"upstream": "heavy", "weight": 3},
                    {"upstream": "light", "weight": 1},
                ],
            }
        ],
    }
    async with run_gateway(config) as gw:
        for _ in range(8):
            status, _raw = await _chat(http, gw.v1)
            assert status == 200
    assert (len(fake.exchanges), len(second.exchanges)) == (6, 2)


async def test_aliases_and_prefix_routes(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    config = {
        "upstreams": {"fake": _upstream(fake)},
        "routes": [
            {"model": "m", "aliases": ["m-latest"], "upstream": "fake", "upstream_model": "real"},
            {"model_prefix": "openai/", "upstream": "fake"},
        ],
    }
    async with run_gateway(config) as gw:
        assert (await _chat(http, gw.v1, model="m-latest"))[0] == 200
        assert (await _chat(http, gw.v1, model="openai/gpt-x"))[0] == 200
        assert (await _chat(http, gw.v1, model="openai/"))[0] == 404
        async with http.get(gw.v1 + "/models") as resp:
            listed = [m["id"] for m in (await resp.json())["data"]]
    assert [e.body["model"] for e in fake.exchanges] == ["real", "gpt-x"]
    assert listed == ["m", "m-latest"]


async def test_failing_upstream_is_ejected_and_shown_in_admin(
    fake: FakeUpstream, second: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.default = _error_json(500)
    config = {
        "server": {"admin_key": ADMIN_KEY},
        "upstreams": {
            "flaky": _upstream(fake, failure_threshold=2, cooldown_seconds=600),
            "steady": _upstream(second),
        },
        "routes": [
            {"model": "flaky-only", "upstream": "flaky", "retries": 0},
            {
                "model": "m",
                "deployments": [{"upstream": "flaky", "weight": 100}, {"upstream": "steady"}],
                "retries": 1,
            },
        ],
    }
    async with run_gateway(config) as gw:
        for _ in range(2):
            assert (await _chat(http, gw.v1, model="flaky-only"))[0] == 502
        async with http.get(gw.url + "/admin/upstreams") as resp:
            assert resp.status == 401
        auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with http.get(gw.url + "/admin/upstreams", headers=auth) as resp:
            upstreams = (await resp.json())["upstreams"]
        before = len(fake.exchanges)
        status, _ = await _chat(http, gw.v1)
    assert upstreams["flaky"]["breaker"]["state"] == "open"
    assert upstreams["steady"]["breaker"]["state"] == "closed"
    assert ADMIN_KEY not in str(upstreams)
    # The ejected deployment is skipped although its weight makes it the first pick.
    assert status == 200
    assert len(fake.exchanges) == before
    assert len(second.exchanges) == 1


async def test_full_queue_answers_429_with_retry_after(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    """max_concurrent 1 and no queue: while one stream runs, the next request gets 429."""
    script, (gate,) = gated_script(openai_stream(["held"]), 1)
    gated.queue(script)
    config = {
        "upstreams": {"gpu": _upstream(gated, max_concurrent=1, max_queue=0)},
        "routes": [{"model": "m", "upstream": "gpu", "retries": 0}],
    }
    async with run_gateway(config) as gw:
        async with http.post(gw.v1 + CHAT, json=chat_body()) as running:
            assert running.status == 200
            async with asyncio.timeout(BOUND):
                await running.content.readuntil(b"\n\n")  # the first event: the slot is taken
            async with http.post(gw.v1 + CHAT, json=chat_body()) as refused:
                assert refused.status == 429
                assert int(refused.headers["Retry-After"]) >= 1
                assert (await refused.json())["error"]["code"] == "upstream_queue_full"
            gate.set()
            async with asyncio.timeout(BOUND):
                assert (await running.read()).endswith(DONE)
        # The slot came back: the next request is served.
        status, _ = await _chat(http, gw.v1)
    assert status == 200
    assert len(gated.exchanges) == 2
