"""The replay cache through running gateways: fake upstreams that count requests, the
official SDKs, real sockets, a real redis-server for the shared store.

The first deterministic request goes upstream and its answer is kept; the same request
again is streamed from the cache (the upstream sees one request) with the same bytes,
except the usage event marked `"x_sluice": {"usage_source": "cache"}`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.auth import hash_key
from gateway.context import Outcome, RequestContext
from gateway.plugin import EndStream, Plugin
from gateway.pricing import cost_of
from gateway.replay.cache import ReplayCache
from gateway.replay.state import REPLAY
from gateway.replay.store import MemoryStore
from gateway.sse import SSEEvent
from gateway.testing.fake_upstream import (
    FakeUpstream,
    Script,
    json_script,
    openai_completion,
    openai_stream,
)
from gateway.testing.harness import RunningGateway, run_gateway
from plugins.access_log import AccessLog
from tests.integration._support import (
    BOUND,
    CHAT,
    ProbeLog,
    chat_body,
    config_for,
    event_json,
    final_error,
    make_probe,
    split_events,
)
from tests.integration.test_metrics import _scrape
from tests.unit.test_ratelimit import running_redis

USAGE = {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}
TOKENS = ["Hel", "lo ", "w\u00f6rld \U0001f30d"]
ML_KEY = "sk-sluice-ml-team-key-0123456789"
OPS_KEY = "sk-sluice-ops-team-key-abcdefghij"
MARK = {"usage_source": "cache"}


def cold(**extra: Any) -> dict[str, Any]:
    """A deterministic streamed chat request (temperature 0) asking for usage."""
    return chat_body(temperature=0, stream_options={"include_usage": True}, **extra)


def streams(n: int = 8) -> list[Script]:
    return [Script(openai_stream(TOKENS, usage=USAGE)) for _ in range(n)]


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


def replay_config(
    fake: FakeUpstream,
    replay: Any = True,
    *,
    plugins: list[dict[str, Any]] | None = None,
    block: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, type[Any]], ProbeLog]:
    """Route `m` with `replay`, priced, with a probe recording every request's end."""
    probe, ends = make_probe()
    chain = [*(plugins or []), {"name": "probe"}]
    config = config_for(fake, plugins=chain, route={"replay": replay})
    config["pricing"] = {"models": {"gpt-test": {"input": 100, "output": 1000}}}
    if block is not None:
        config["replay"] = dict(block)
    return config, {"probe": probe, "access_log": AccessLog}, ends


async def post(
    http: aiohttp.ClientSession,
    gw: RunningGateway,
    body: Mapping[str, Any],
    **headers: str,
) -> tuple[int, Mapping[str, str], bytes]:
    async with asyncio.timeout(BOUND), http.post(gw.v1 + CHAT, json=body, headers=headers) as resp:
        return resp.status, resp.headers, await resp.read()


def unmarked(raw: bytes) -> list[Any]:
    """Each event's JSON (or its bytes) with the cache mark taken off."""
    out: list[Any] = []
    for event in split_events(raw):
        try:
            obj = event_json(event)
        except ValueError:
            out.append(event)
            continue
        if isinstance(obj, dict) and obj.get("x_sluice") == MARK:
            obj = {k: v for k, v in obj.items() if k != "x_sluice"}
        out.append(obj)
    return out


def marked_events(raw: bytes) -> list[Any]:
    return [
        obj
        for event in split_events(raw)
        if event.startswith(b"data: {")
        and isinstance(obj := event_json(event), dict)
        and obj.get("x_sluice") == MARK
    ]


# ----- hit and miss -------------------------------------------------------------------------


async def test_second_identical_stream_is_served_from_the_cache(
    fake: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    access = {"name": "access_log", "options": {"stream": str(log_path)}}
    config, registry, ends = replay_config(fake, plugins=[access])
    fake.queue(*streams())
    async with run_gateway(config, registry=registry) as gw:
        status1, head1, first = await post(http, gw, cold())
        status2, head2, second = await post(http, gw, cold())
        contexts = await ends.wait_ends(2)
        scrape = await _scrape(http, gw.url)
    assert (status1, status2) == (200, 200)
    assert len(fake.exchanges) == 1
    assert (head1["X-Sluice-Cache"], head2["X-Sluice-Cache"]) == ("miss", "hit")
    assert head1["X-Request-Id"] != head2["X-Request-Id"]
    assert unmarked(second) == unmarked(first)
    assert marked_events(first) == []
    (usage_chunk,) = marked_events(second)
    assert usage_chunk["usage"] == USAGE  # the answer's own numbers, marked as cached
    miss, hit = contexts
    assert (miss.get(REPLAY), hit.get(REPLAY)) == ("miss", "hit")
    assert hit.outcome is Outcome.COMPLETED
    assert hit.upstream_name is None
    assert (hit.usage.source, hit.usage.prompt_tokens, hit.usage.completion_tokens) == (
        "cache",
        0,
        0,
    )
    miss_cost, hit_cost = cost_of(miss), cost_of(hit)
    assert miss_cost is not None
    assert miss_cost.amount > 0
    assert hit_cost is not None
    assert hit_cost.amount == 0
    lines = [orjson.loads(line) for line in log_path.read_text().splitlines()]
    assert [(line["cache"], line["usage_source"], line["cost"]) for line in lines] == [
        ("miss", "upstream", 0.012),
        ("hit", "cache", 0.0),
    ]
    assert lines[1]["upstream"] is None
    assert lines[1]["ttft_ms"] is not None
    for result, count in (("miss", 1), ("store", 1), ("hit", 1), ("bypass", 0), ("skip", 0)):
        assert scrape.get("sluice_replay_cache_total", route="m", result=result) == count


async def test_second_identical_unary_request_is_served_from_the_cache(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config, registry, ends = replay_config(fake)
    fake.queue(json_script(openai_completion("Hi there")))
    body = chat_body(stream=False, temperature=0)
    async with run_gateway(config, registry=registry) as gw:
        _, head1, first = await post(http, gw, body)
        _, head2, second = await post(http, gw, body)
        await ends.wait_ends(2)
    assert len(fake.exchanges) == 1
    assert (head1["X-Sluice-Cache"], head2["X-Sluice-Cache"]) == ("miss", "hit")
    assert head2["Content-Type"].startswith("application/json")
    replayed = orjson.loads(second)
    assert replayed.pop("x_sluice") == MARK
    assert replayed == orjson.loads(first)


async def test_stream_and_unary_are_kept_apart(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config, registry, _ = replay_config(fake)
    fake.queue(Script(openai_stream(TOKENS)), json_script(openai_completion("Hi")))
    async with run_gateway(config, registry=registry) as gw:
        await post(http, gw, chat_body(temperature=0))
        _, head, body = await post(http, gw, chat_body(stream=False, temperature=0))
    assert head["X-Sluice-Cache"] == "miss"
    assert orjson.loads(body)["choices"][0]["message"]["content"] == "Hi"
    assert len(fake.exchanges) == 2


# ----- what is cacheable ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampling", "cached"),
    [
        ({"temperature": 0.7}, False),
        ({}, False),  # OpenAI's default temperature is 1
        ({"temperature": 0.7, "seed": 42}, True),
        ({"temperature": 0.0}, True),
        ({"temperature": 0.7, "seed": 42, "n": 2}, False),
    ],
)
async def test_only_deterministic_requests_are_cached(
    fake: FakeUpstream, http: aiohttp.ClientSession, sampling: dict[str, Any], cached: bool
) -> None:
    config, registry, _ = replay_config(fake)
    fake.queue(*streams())
    body = chat_body(**sampling)
    async with run_gateway(config, registry=registry) as gw:
        await post(http, gw, body)
        _, head, _ = await post(http, gw, body)
        scrape = await _scrape(http, gw.url)
    assert len(fake.exchanges) == (1 if cached else 2)
    assert head.get("X-Sluice-Cache") == ("hit" if cached else None)
    assert scrape.get("sluice_replay_cache_total", result="skip") == (0 if cached else 2)


async def test_a_route_without_replay_never_caches(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config, registry, _ = replay_config(fake, replay=False)
    fake.queue(*streams())
    async with run_gateway(config, registry=registry) as gw:
        await post(http, gw, cold())
        _, head, _ = await post(http, gw, cold())
    assert len(fake.exchanges) == 2
    assert "X-Sluice-Cache" not in head


async def test_a_different_request_is_a_miss(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config, registry, _ = replay_config(fake)
    fake.queue(*streams())
    async with run_gateway(config, registry=registry) as gw:
        await post(http, gw, cold())
        await post(http, gw, cold(max_tokens=5))
        await post(http, gw, cold(messages=[{"role": "user", "content": "other"}]))
        await post(http, gw, chat_body(temperature=0))  # no include_usage: other bytes
    assert len(fake.exchanges) == 4


# ----- Cache-Control --------------------------------------------------------------------------


async def test_no_cache_bypasses_and_refreshes_no_store_keeps_nothing(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config, registry, _ = replay_config(fake)
    fake.queue(*streams())
    async with run_gateway(config, registry=registry) as gw:
        _, head, _ = await post(http, gw, cold(), **{"Cache-Control": "no-store"})
        assert head["X-Sluice-Cache"] == "bypass"
        _, head, _ = await post(http, gw, cold())
        assert head["X-Sluice-Cache"] == "miss"  # no-store kept nothing
        _, head, _ = await post(http, gw, cold(), **{"Cache-Control": "max-age=0, no-cache"})
        assert head["X-Sluice-Cache"] == "bypass"
        _, head, _ = await post(http, gw, cold())
        assert head["X-Sluice-Cache"] == "hit"
        scrape = await _scrape(http, gw.url)
    assert len(fake.exchanges) == 3
    assert scrape.get("sluice_replay_cache_total", result="bypass") == 2
    assert scrape.get("sluice_replay_cache_total", result="store") == 2


# ----- what is never kept -----------------------------------------------------------------------


async def test_a_cut_stream_is_not_kept(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    config, registry, ends = replay_config(fake)
    whole = openai_stream(TOKENS, usage=USAGE)
    fake.queue(Script(whole[:3], then="reset"), *streams())
    async with run_gateway(config, registry=registry) as gw:
        _, _, cut = await post(http, gw, cold())
        assert final_error(cut)["type"]
        _, head, _ = await post(http, gw, cold())
        (broken, _) = await ends.wait_ends(2)
    assert head["X-Sluice-Cache"] == "miss"
    assert broken.outcome is Outcome.UPSTREAM_ERROR
    assert len(fake.exchanges) == 2


async def test_an_in_band_error_is_not_kept(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config, registry, _ = replay_config(fake)
    whole = openai_stream(TOKENS)
    error = b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
    fake.queue(Script([*whole[:3], error]), *streams())
    async with run_gateway(config, registry=registry) as gw:
        await post(http, gw, cold())
        _, head, _ = await post(http, gw, cold())
    assert head["X-Sluice-Cache"] == "miss"
    assert len(fake.exchanges) == 2


class StopAtFirst(Plugin):
    """Ends every stream at its first event, as a content filter's stop does."""

    name = "stop_at_first"

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        raise EndStream([event])


async def test_a_stream_a_plugin_ended_is_not_kept(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config, registry, _ = replay_config(fake, plugins=[{"name": "stop_at_first"}])
    registry["stop_at_first"] = StopAtFirst
    fake.queue(*streams())
    async with run_gateway(config, registry=registry) as gw:
        await post(http, gw, cold())
        _, head, _ = await post(http, gw, cold())
    assert head["X-Sluice-Cache"] == "miss"
    assert len(fake.exchanges) == 2


async def test_an_answer_over_the_size_bound_is_not_kept(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config, registry, _ = replay_config(fake, {"max_entry_bytes": 256})
    fake.queue(*streams())
    async with run_gateway(config, registry=registry) as gw:
        _, _, first = await post(http, gw, cold())
        _, head, second = await post(http, gw, cold())
        scrape = await _scrape(http, gw.url)
    assert len(first) > 256
    assert second == first
    assert head["X-Sluice-Cache"] == "miss"
    assert scrape.get("sluice_replay_cache_total", result="skip") == 2


async def test_the_memory_bound_evicts_the_least_recently_used(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config, registry, _ = replay_config(fake, block={"max_entries": 2})
    fake.queue(*streams())
    a, b, c = (cold(max_tokens=n) for n in (1, 2, 3))
    async with run_gateway(config, registry=registry) as gw:
        for body in (a, b, a, c):  # a used again, so b is the least recent when c comes
            await post(http, gw, body)
        assert len(fake.exchanges) == 3
        _, head_a, _ = await post(http, gw, a)
        _, head_b, _ = await post(http, gw, b)
        assert gw.state.proxy is not None
        cache = gw.state.proxy.replay
        assert isinstance(cache, ReplayCache)
        assert isinstance(cache.store, MemoryStore)
        assert len(cache.store) == 2
    assert (head_a["X-Sluice-Cache"], head_b["X-Sluice-Cache"]) == ("hit", "miss")
    assert len(fake.exchanges) == 4


# ----- teams -------------------------------------------------------------------------------------


def _teams(config: dict[str, Any]) -> dict[str, Any]:
    config["teams"] = {
        "ml": {"keys": [{"name": "ci", "sha256": hash_key(ML_KEY)}]},
        "ops": {"keys": [{"name": "bot", "sha256": hash_key(OPS_KEY)}]},
    }
    return config


@pytest.mark.parametrize("shared", [False, True])
async def test_answers_stay_within_a_team_unless_shared(
    fake: FakeUpstream, http: aiohttp.ClientSession, shared: bool
) -> None:
    config, registry, _ = replay_config(fake, {"shared": shared})
    fake.queue(*streams())
    async with run_gateway(_teams(config), registry=registry) as gw:
        await post(http, gw, cold(), Authorization=f"Bearer {ML_KEY}")
        _, head, _ = await post(http, gw, cold(), Authorization=f"Bearer {OPS_KEY}")
        _, again, _ = await post(http, gw, cold(), Authorization=f"Bearer {ML_KEY}")
    assert head["X-Sluice-Cache"] == ("hit" if shared else "miss")
    assert again["X-Sluice-Cache"] == "hit"
    assert len(fake.exchanges) == (1 if shared else 2)


# ----- pacing and Redis ----------------------------------------------------------------------


async def test_original_pacing_replays_the_recorded_gaps_in_order(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config, registry, _ = replay_config(fake, {"pacing": "original"})
    chunks = openai_stream(TOKENS, usage=USAGE)
    fake.queue(Script(chunks, delays=[0.0] + [0.04] * (len(chunks) - 1)))
    async with run_gateway(config, registry=registry) as gw:
        _, _, first = await post(http, gw, cold())
        assert gw.state.proxy is not None
        assert gw.state.proxy.replay is not None
        store = gw.state.proxy.replay.store
        assert isinstance(store, MemoryStore)
        ((entry, _),) = store._entries.values()
        offsets = [event.offset for event in entry.events]
        started = time.perf_counter()
        _, head, second = await post(http, gw, cold())
        took = time.perf_counter() - started
    assert head["X-Sluice-Cache"] == "hit"
    assert offsets == sorted(offsets)
    assert offsets[-1] > 0
    # A lower bound only: every recorded gap (each under the 2 s cap) was slept again.
    assert took >= 0.9 * offsets[-1]
    assert unmarked(second) == unmarked(first)


async def test_two_gateways_share_answers_through_redis(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(*streams(1), json_script(openai_completion("Hi")))
    async with running_redis() as redis:
        block = {"redis_url": redis.url}
        config, registry, _ = replay_config(fake, block=block)
        async with (
            run_gateway(config, registry=registry) as one,
            run_gateway(config, registry=registry) as two,
        ):
            _, head1, first = await post(http, one, cold())
            _, head2, second = await post(http, two, cold())
            _, head3, _ = await post(http, two, chat_body(stream=False, temperature=0))
            _, head4, _ = await post(http, one, chat_body(stream=False, temperature=0))
    assert (head1["X-Sluice-Cache"], head2["X-Sluice-Cache"]) == ("miss", "hit")
    assert (head3["X-Sluice-Cache"], head4["X-Sluice-Cache"]) == ("miss", "hit")
    assert unmarked(second) == unmarked(first)
    assert len(fake.exchanges) == 2


async def test_a_redis_outage_is_a_miss_not_an_error(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(*streams())
    async with running_redis() as redis:
        config, registry, _ = replay_config(fake, block={"redis_url": redis.url})
        async with run_gateway(config, registry=registry) as gw:
            await redis.stop()
            status, head, raw = await post(http, gw, cold())
            status2, head2, _ = await post(http, gw, cold())
    assert (status, status2) == (200, 200)
    assert (head["X-Sluice-Cache"], head2["X-Sluice-Cache"]) == ("miss", "miss")
    assert b"[DONE]" in raw


async def test_a_websocket_request_is_replayed_too(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config, registry, _ = replay_config(fake)
    fake.queue(*streams())
    runs: list[list[dict[str, Any]]] = []
    async with (
        run_gateway(config, registry=registry) as gw,
        asyncio.timeout(BOUND),
        http.ws_connect(gw.url + "/v1/ws") as ws,
    ):
        for rid in ("a", "b"):
            await ws.send_json({"type": "request", "id": rid, "body": cold()})
            messages: list[dict[str, Any]] = []
            while not messages or messages[-1]["type"] not in ("done", "error"):
                messages.append(orjson.loads((await ws.receive()).data))
            runs.append(messages)
    first, second = runs
    assert first[0]["headers"]["X-Sluice-Cache"] == "miss"
    assert second[0]["headers"]["X-Sluice-Cache"] == "hit"
    chunks = [[m["data"] for m in run if m["type"] == "chunk"] for run in runs]
    assert chunks[1][-1].pop("x_sluice") == MARK  # the usage chunk
    assert chunks[1] == chunks[0]
    assert len(fake.exchanges) == 1
