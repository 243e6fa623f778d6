"""Retries that neither multiply nor hide, over loopback: the gateway's attempts, the SDKs'
own retries on top (real openai and anthropic clients), the breaker, queues, Retry-After.

Every fake upstream counts the requests it got; nothing here waits on a clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from gateway.testing.fake_upstream import FakeUpstream, Script, json_script, openai_stream
from gateway.testing.harness import run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
    DONE,
    GatedUpstream,
    chat_body,
    chat_contents,
    gated_script,
)

ADMIN_KEY = "admin-secret-for-retry-tests"
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def _upstream(fake: FakeUpstream, **extra: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": fake.base_url, "include_usage": False, **extra}


def _single(
    fake: FakeUpstream, route: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """Model `m` on one deployment, with the route's default `retries`."""
    return {
        "server": {"admin_key": ADMIN_KEY},
        "upstreams": {"only": _upstream(fake, **extra)},
        "routes": [{"model": "m", "upstream": "only", **(route or {})}],
    }


def _error(status: int, retry_after: str | None = None) -> Script:
    script = json_script({"error": {"message": f"boom {status}", "type": "server_error"}}, status)
    if retry_after is not None:
        script.headers = {"Retry-After": retry_after}
    return script


@pytest.fixture
async def second() -> AsyncIterator[FakeUpstream]:
    """Another fake upstream, for routes with two deployments."""
    async with FakeUpstream() as upstream:
        yield upstream


async def _post(
    http: aiohttp.ClientSession, url: str, **body: Any
) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(BOUND), http.post(url + CHAT, json=chat_body(**body)) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def _admin(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with asyncio.timeout(BOUND), http.get(url + "/admin/upstreams", headers=auth) as resp:
        upstreams: dict[str, Any] = (await resp.json())["upstreams"]
    return upstreams


# ----- the SDKs' retries on top of the gateway's ------------------------------------------


async def test_openai_sdk_makes_only_the_gateways_attempts_against_a_429(
    fake: FakeUpstream,
) -> None:
    """The SDK with its default max_retries=2 over the default `retries: 2`: 3 upstream
    requests (1 + the gateway's 2), not 3 x 3 = 9; the SDK is told not to retry."""
    fake.default = _error(429)
    async with run_gateway(_single(fake)) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="x", timeout=10.0)
        assert sdk.max_retries == 2
        try:
            with pytest.raises(openai.RateLimitError) as raised:
                await sdk.chat.completions.create(model="m", messages=MESSAGES)
        finally:
            await sdk.close()
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert len(fake.exchanges) == 3


async def test_anthropic_sdk_makes_only_the_gateways_attempts_against_a_503(
    fake: FakeUpstream,
) -> None:
    fake.default = _error(503)
    async with run_gateway(_single(fake)) as gw:
        sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", timeout=10.0)
        assert sdk.max_retries == 2
        try:
            with pytest.raises(anthropic.APIStatusError) as raised:
                await sdk.messages.create(
                    model="m", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
                )
        finally:
            await sdk.close()
    assert raised.value.status_code == 502
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert len(fake.exchanges) == 3


async def test_an_error_the_gateway_did_not_retry_leaves_the_sdk_default(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """With `retries: 0` the client's own retries are the only ones: no x-should-retry."""
    fake.queue(_error(500))
    async with run_gateway(_single(fake, route={"retries": 0})) as gw:
        status, headers, _ = await _post(http, gw.v1)
    assert status == 502
    assert "x-should-retry" not in headers
    assert len(fake.exchanges) == 1


async def test_a_refused_credential_is_not_retried_by_anyone(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.default = json_script({"error": {"message": "bad key", "type": "auth"}}, 401)
    async with run_gateway(_single(fake)) as gw:
        status, headers, raw = await _post(http, gw.v1)
    assert status == 502
    assert b"upstream_auth_error" in raw
    assert headers["x-should-retry"] == "false"
    assert len(fake.exchanges) == 1


# ----- what cannot succeed within the request -----------------------------------------------


async def test_a_long_retry_after_from_the_only_deployment_is_passed_on_at_once(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """Waiting 30 s is the client's business: one upstream request, its Retry-After, and
    the SDK left to honour it."""
    fake.default = _error(429, retry_after="30")
    async with run_gateway(_single(fake)) as gw:
        status, headers, _ = await _post(http, gw.v1)
    assert status == 429
    assert headers["Retry-After"] == "30"
    assert "x-should-retry" not in headers
    assert len(fake.exchanges) == 1


async def test_an_upstream_503_retry_after_is_passed_on(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.default = _error(503, retry_after="7")
    async with run_gateway(_single(fake)) as gw:
        status, headers, raw = await _post(http, gw.v1)
    assert status == 502
    assert headers["Retry-After"] == "7"
    assert b"boom 503" in raw
    assert len(fake.exchanges) == 1


async def test_a_short_retry_after_is_waited_for_on_the_same_deployment(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(_error(429, retry_after="0"), _error(503, retry_after="0"))
    async with run_gateway(_single(fake)) as gw:
        status, headers, raw = await _post(http, gw.v1)
    assert status == 200
    assert chat_contents(raw) == ["Hello", " world"]
    assert "x-should-retry" not in headers
    assert len(fake.exchanges) == 3


async def test_a_retry_goes_to_another_deployment_and_not_back_to_a_long_retry_after(
    fake: FakeUpstream, second: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """`first` (picked first) says come back in 30 s: the retries go to `second` only."""
    fake.default = _error(429, retry_after="30")
    second.default = _error(502)
    config = {
        "upstreams": {"first": _upstream(fake), "second": _upstream(second)},
        "routes": [
            {
                "model": "m",
                "deployments": [{"upstream": "first", "weight": 100}, {"upstream": "second"}],
            }
        ],
    }
    async with run_gateway(config) as gw:
        status, headers, _ = await _post(http, gw.v1)
    assert (len(fake.exchanges), len(second.exchanges)) == (1, 2)
    assert status == 502
    assert headers["x-should-retry"] == "false"


async def test_a_full_queue_on_the_only_deployment_answers_429_at_once(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    """No internal retries of a full queue: one rejection, `429 upstream_queue_full`."""
    script, (gate,) = gated_script(openai_stream(["held"]), 1)
    gated.queue(script)
    config = _single(gated, max_concurrent=1, max_queue=0)
    async with run_gateway(config) as gw, http.post(gw.v1 + CHAT, json=chat_body()) as running:
        assert running.status == 200
        async with asyncio.timeout(BOUND):
            await running.content.readuntil(b"\n\n")  # the first event: the slot is taken
        status, headers, raw = await _post(http, gw.v1)
        queue = (await _admin(http, gw.url))["only"]["queue"]
        gate.set()
        async with asyncio.timeout(BOUND):
            assert (await running.read()).endswith(DONE)
    assert status == 429
    assert b"upstream_queue_full" in raw
    assert int(headers["Retry-After"]) >= 1
    assert "x-should-retry" not in headers
    assert queue["rejected_full"] == 1
    assert len(gated.exchanges) == 1


async def test_a_full_queue_fails_over_to_another_deployment(
    gated: GatedUpstream, second: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    script, (gate,) = gated_script(openai_stream(["held"]), 1)
    gated.queue(script)
    config = {
        "server": {"admin_key": ADMIN_KEY},
        "upstreams": {
            "gpu": _upstream(gated, max_concurrent=1, max_queue=0),
            "spare": _upstream(second),
        },
        "routes": [
            {"model": "held", "upstream": "gpu"},
            {
                "model": "m",
                "deployments": [{"upstream": "gpu", "weight": 100}, {"upstream": "spare"}],
            },
        ],
    }
    held = chat_body(model="held")
    async with run_gateway(config) as gw, http.post(gw.v1 + CHAT, json=held) as running:
        async with asyncio.timeout(BOUND):
            await running.content.readuntil(b"\n\n")  # the first event: gpu's slot is taken
        status, _, raw = await _post(http, gw.v1)
        queue = (await _admin(http, gw.url))["gpu"]["queue"]
        gate.set()
        async with asyncio.timeout(BOUND):
            await running.read()
    assert status == 200
    assert chat_contents(raw) == ["Hello", " world"]
    assert queue["rejected_full"] == 1
    assert (len(gated.exchanges), len(second.exchanges)) == (1, 1)


# ----- the breaker ---------------------------------------------------------------------------


async def test_a_dead_single_upstream_counts_one_breaker_failure_per_request(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """failure_threshold 3: it takes three failed client requests to eject it, not one of
    three attempts; the third stops at its first failure (the ejection); then the breaker's
    503 says when to come back."""
    fake.default = _error(500)
    config = _single(fake, failure_threshold=3, cooldown_seconds=600)
    async with run_gateway(config) as gw:
        failed = [await _post(http, gw.v1) for _ in range(3)]
        breaker = (await _admin(http, gw.url))["only"]["breaker"]
        status, headers, raw = await _post(http, gw.v1)
    assert [(s, h.get("x-should-retry")) for s, h, _ in failed] == [
        (502, "false"),
        (502, "false"),
        (502, None),
    ]
    assert len(fake.exchanges) == 3 + 3 + 1  # and the fourth request never reached it
    assert (breaker["state"], breaker["consecutive_failures"]) == ("open", 3)
    assert status == 503
    assert b"upstream_unavailable" in raw
    assert 590 <= int(headers["Retry-After"]) <= 600
    assert "x-should-retry" not in headers
