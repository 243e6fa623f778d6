"""A client that hangs up cancels the upstream at once; `on_end` sees each request end once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from gateway.context import Outcome, RequestContext
from gateway.plugin import Plugin, Reject
from gateway.testing.fake_upstream import (
    FakeUpstream,
    Script,
    json_script,
    openai_completion,
    openai_stream,
)
from gateway.testing.harness import run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
    GatedUpstream,
    RawClient,
    chat_body,
    config_for,
    final_error,
    gated_script,
    json_error,
    make_probe,
)

PROBE = [{"name": "probe"}]
# How fast the gateway must close the upstream after the client left.
CANCEL_WITHIN = 0.1


async def test_raw_client_hangup_closes_the_upstream_at_once(fake: FakeUpstream) -> None:
    probe, log = make_probe()
    events = openai_stream(["one", " two"], done=False)
    fake.queue(Script(events, then="hang"))
    async with run_gateway(config_for(fake, plugins=PROBE), registry={"probe": probe}) as gw:
        client = await RawClient.connect(gw.url)
        try:
            async with asyncio.timeout(BOUND):
                await client.post_json("/v1" + CHAT, chat_body())
                head = await client.read_head()
                assert head.status == 200
                received = bytearray()
                await client.read_until(received, b"\n\n")
            assert bytes(received).startswith(events[0])
            (exchange,) = fake.exchanges
            closed = client.abort()
            async with asyncio.timeout(BOUND):
                await exchange.finished.wait()
                await log.wait_ends(1)
        finally:
            await client.close()
    assert exchange.closed_by_peer
    assert exchange.closed_at is not None
    assert exchange.closed_at - closed < CANCEL_WITHIN
    assert log.outcomes == [Outcome.CLIENT_DISCONNECTED]


async def test_aiohttp_client_close_cancels_the_upstream(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    probe, log = make_probe()
    fake.queue(Script(openai_stream(["a"] * 5, done=False), then="hang"))
    async with run_gateway(config_for(fake, plugins=PROBE), registry={"probe": probe}) as gw:
        async with asyncio.timeout(BOUND):
            resp = await http.post(gw.v1 + CHAT, json=chat_body())
            first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"data: ")
        (exchange,) = fake.exchanges
        closed = time.perf_counter()
        resp.close()
        async with asyncio.timeout(BOUND):
            await exchange.finished.wait()
            await log.wait_ends(1)
    assert exchange.closed_by_peer
    assert exchange.closed_at is not None
    assert exchange.closed_at - closed < CANCEL_WITHIN
    assert log.outcomes == [Outcome.CLIENT_DISCONNECTED]


async def test_hangup_during_header_hold_cancels_the_upstream(gated: GatedUpstream) -> None:
    """The client leaves while the gateway still waits for the first event."""
    probe, log = make_probe()
    script, (first,) = gated_script(openai_stream(["late"]), 0)
    gated.queue(script)
    config = config_for(gated, plugins=PROBE)
    async with run_gateway(config, registry={"probe": probe}) as gw:
        client = await RawClient.connect(gw.url)
        try:
            await client.post_json("/v1" + CHAT, chat_body())
            (exchange,) = await gated.wait_for_requests(1)
            closed = client.abort()
            async with asyncio.timeout(BOUND):
                await exchange.finished.wait()
                await log.wait_ends(1)
        finally:
            await client.close()
    assert not first.is_set()
    assert exchange.closed_by_peer
    assert exchange.closed_at is not None
    assert exchange.closed_at - closed < CANCEL_WITHIN
    assert exchange.chunks_written == 0
    assert log.outcomes == [Outcome.CLIENT_DISCONNECTED]


# ----- every way a request ends is reported once ----------------------------------------------


class RejectAll(Plugin):
    name = "reject_all"

    async def on_request(self, ctx: RequestContext) -> None:
        raise Reject(429, "Team budget exhausted.", code="budget_exceeded")


async def _run_one(
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    body: dict[str, Any],
    *,
    plugins: list[dict[str, Any]] | None = None,
    registry: dict[str, type[Any]] | None = None,
    **upstream: Any,
) -> tuple[int, bytes, list[Outcome | None], list[RequestContext]]:
    probe, log = make_probe()
    config = config_for(fake, plugins=[*PROBE, *(plugins or [])], **upstream)
    async with run_gateway(config, registry={"probe": probe, **(registry or {})}) as gw:
        async with asyncio.timeout(BOUND), http.post(gw.v1 + CHAT, json=body) as resp:
            raw = await resp.read()
        await log.wait_ends(1)
    # The gateway is shut down: nothing can add a second `on_end` any more.
    return resp.status, raw, log.outcomes, log.contexts


async def test_outcome_completed_stream(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    status, raw, outcomes, (ctx,) = await _run_one(fake, http, chat_body())
    assert status == 200
    assert raw.endswith(b"data: [DONE]\n\n")
    assert outcomes == [Outcome.COMPLETED]
    assert ctx.events_out == len(openai_stream(["Hello", " world"]))


async def test_outcome_completed_non_stream(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(json_script(openai_completion("fine")))
    status, _, outcomes, (ctx,) = await _run_one(fake, http, chat_body(stream=False))
    assert status == 200
    assert outcomes == [Outcome.COMPLETED]
    assert ctx.usage.total_tokens == 7


async def test_outcome_upstream_error_on_truncation(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script(openai_stream(["cut"], done=False)))
    status, raw, outcomes, (ctx,) = await _run_one(fake, http, chat_body())
    assert status == 200
    assert final_error(raw)["code"] == "upstream_truncated"
    assert outcomes == [Outcome.UPSTREAM_ERROR]
    assert ctx.error is not None
    assert ctx.error.code == "upstream_truncated"


async def test_outcome_upstream_error_on_4xx(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(json_script({"error": {"message": "bad"}}, status=400))
    status, _, outcomes, _ = await _run_one(fake, http, chat_body())
    assert status == 400
    assert outcomes == [Outcome.UPSTREAM_ERROR]


async def test_outcome_timeout_on_idle(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    fake.queue(Script(openai_stream(["slow"], done=False)[:2], then="hang"))
    status, raw, outcomes, _ = await _run_one(
        fake, http, chat_body(), timeouts={"idle": 0.2, "first_byte": 0.3}
    )
    assert status == 200
    assert final_error(raw)["code"] == "upstream_idle_timeout"
    assert outcomes == [Outcome.TIMEOUT]


async def test_outcome_rejected_by_plugin(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    status, raw, outcomes, _ = await _run_one(
        fake,
        http,
        chat_body(),
        plugins=[{"name": "reject_all"}],
        registry={"reject_all": RejectAll},
    )
    assert status == 429
    error = json_error(raw)
    assert error["message"] == "Team budget exhausted."
    assert error["code"] == "budget_exceeded"
    assert outcomes == [Outcome.REJECTED]
    assert fake.exchanges == [], "a rejected request never reaches the upstream"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"model": "m", "messages": []}, id="invalid-body"),
        pytest.param(chat_body(model="no-such-model"), id="unknown-model"),
    ],
)
async def test_outcome_rejected_for_client_errors(
    fake: FakeUpstream, http: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    status, _, outcomes, _ = await _run_one(fake, http, body)
    assert 400 <= status < 500
    assert outcomes == [Outcome.REJECTED]
    assert fake.exchanges == []
