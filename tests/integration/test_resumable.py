"""Resumable streams: drop the client, come back with Last-Event-ID, lose and repeat nothing."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from gateway.context import Outcome
from gateway.testing.fake_upstream import Script, openai_stream
from gateway.testing.harness import run_gateway
from gateway.testing.redis_server import RedisServer
from gateway.testing.slow_link import SlowLink
from tests.integration._support import (
    BOUND,
    CHAT,
    DONE,
    GatedUpstream,
    chat_body,
    config_for,
    gated_script,
    make_probe,
)
from tests.unit.test_ratelimit import running_redis

RESUMABLE = {"X-Sluice-Resumable": "1"}
TOKENS = [f" t{i}" for i in range(12)]
KEPT = 5  # events the first client reads before it drops: role + 4 tokens
PROBE = [{"name": "probe"}]


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with running_redis() as server:
        yield server


def _events(raw: bytes) -> list[tuple[str | None, bytes]]:
    """(id, data) of every event in an SSE body."""
    out: list[tuple[str | None, bytes]] = []
    for block in raw.split(b"\n\n"):
        if not block.strip():
            continue
        event_id, data = None, b""
        for line in block.split(b"\n"):
            if line.startswith(b"id: "):
                event_id = line[4:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        out.append((event_id, data))
    return out


def _text(events: list[tuple[str | None, bytes]]) -> str:
    text = ""
    for _id, data in events:
        if data.startswith(b"{"):
            for choice in orjson.loads(data).get("choices", []):
                text += choice["delta"].get("content") or ""
    return text


async def _read_events(resp: aiohttp.ClientResponse, count: int) -> bytes:
    """The first `count` events of a streamed response."""
    got = b""
    async with asyncio.timeout(BOUND):
        while got.count(b"\n\n") < count:
            got += await resp.content.readuntil(b"\n\n")
    return got


async def _drop_after_k(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[str, bytes]:
    """Start a resumable stream, read KEPT events, hang up; (stream id, what was read)."""
    resp = await http.post(url + CHAT, json=chat_body(), headers={**RESUMABLE, **(headers or {})})
    assert resp.status == 200
    stream_id = resp.headers["X-Sluice-Stream-Id"]
    first = await _read_events(resp, KEPT)
    resp.close()
    return stream_id, first


def _held_stream(gated: GatedUpstream) -> list[asyncio.Event]:
    """Queue a stream that holds after KEPT events; the gate releases the rest."""
    script, gates = gated_script(openai_stream(TOKENS), KEPT)
    gated.queue(script)
    return gates


async def test_resume_after_a_drop_gives_exactly_the_uninterrupted_stream(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    gated.queue(Script(openai_stream(TOKENS)))
    (gate,) = _held_stream(gated)
    async with run_gateway(config_for(gated)) as gw:
        whole = await (await http.post(gw.v1 + CHAT, json=chat_body(), headers=RESUMABLE)).read()
        stream_id, first = await _drop_after_k(http, gw.v1)
        first_events = _events(first)
        last_id = first_events[-1][0]
        assert last_id == f"{stream_id}.{KEPT}"
        resumed = await http.get(
            f"{gw.v1}/streams/{stream_id}", headers={"Last-Event-ID": str(last_id)}
        )
        assert resumed.status == 200
        assert resumed.headers["X-Sluice-Stream-Id"] == stream_id
        gate.set()  # the upstream was held all along: nothing after event KEPT existed yet
        rest = _events(await resumed.read())
    together = first_events + rest
    ids = [event_id for event_id, _data in together]
    assert ids == [f"{stream_id}.{n}" for n in range(1, len(together) + 1)]  # no gap, no repeat
    assert _text(together) == _text(_events(whole)) == "".join(TOKENS)
    assert together[-1][1] == b"[DONE]"
    assert [data for _id, data in together] == [data for _id, data in _events(whole)]
    assert len(gated.exchanges) == 2  # one generation each: the resume reran nothing


async def test_a_post_with_last_event_id_resumes_too(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    (gate,) = _held_stream(gated)
    async with run_gateway(config_for(gated)) as gw:
        stream_id, first = await _drop_after_k(http, gw.v1)
        gate.set()
        again = await http.post(
            gw.v1 + CHAT, json=chat_body(), headers={"Last-Event-ID": f"{stream_id}.2"}
        )
        rest = _events(await again.read())
    assert rest[0][0] == f"{stream_id}.3"
    assert _text(_events(first)[:2] + rest) == "".join(TOKENS)
    assert len(gated.exchanges) == 1


async def test_plain_streams_carry_no_ids_and_resumable_routes_need_no_header(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    gated.queue(Script(openai_stream(["a"])), Script(openai_stream(["b"])))
    config = config_for(gated)
    async with run_gateway(config) as gw:
        plain = await http.post(gw.v1 + CHAT, json=chat_body())
        assert "X-Sluice-Stream-Id" not in plain.headers
        assert all(event_id is None for event_id, _ in _events(await plain.read()))
    config["routes"][0]["resumable"] = True
    async with run_gateway(config) as gw:
        routed = await http.post(gw.v1 + CHAT, json=chat_body())
        assert routed.headers["X-Sluice-Stream-Id"].startswith("rs_")
        assert all(event_id is not None for event_id, _ in _events(await routed.read()))


async def test_only_the_key_that_started_a_stream_can_resume_it(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    keys = {"a": "sk-team-a-key-0000000001", "b": "sk-team-b-key-0000000002"}
    config = config_for(gated)
    config["teams"] = {
        team: {"keys": [{"name": "k", "sha256": hashlib.sha256(key.encode()).hexdigest()}]}
        for team, key in keys.items()
    }
    (gate,) = _held_stream(gated)
    async with run_gateway(config) as gw:
        owner = {"Authorization": f"Bearer {keys['a']}"}
        stream_id, _first = await _drop_after_k(http, gw.v1, owner)
        url = f"{gw.v1}/streams/{stream_id}"
        other = await http.get(url, headers={"Authorization": f"Bearer {keys['b']}"})
        assert other.status == 404
        assert (await other.json())["error"]["code"] == "stream_not_found"
        anonymous = await http.get(url)
        assert anonymous.status == 401
        unknown = await http.get(f"{gw.v1}/streams/rs_doesnotexist0000", headers=owner)
        assert unknown.status == 404
        gate.set()
        mine = await http.get(url, headers={**owner, "Last-Event-ID": f"{stream_id}.{KEPT}"})
        assert mine.status == 200
        assert _text(_events(await mine.read())) == "".join(TOKENS[KEPT - 1 :])


async def test_past_the_grace_period_the_upstream_is_cancelled(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    probe, log = make_probe()
    _held_stream(gated)  # never released
    config = config_for(gated, plugins=PROBE)
    config["resumable"] = {"grace_seconds": 0.2}
    async with run_gateway(config, registry={"probe": probe}) as gw:
        stream_id, _first = await _drop_after_k(http, gw.v1)
        (exchange,) = gated.exchanges
        async with asyncio.timeout(BOUND):
            await exchange.finished.wait()  # the gateway hung up on the upstream
            await log.wait_ends(1)
        late = await http.get(
            f"{gw.v1}/streams/{stream_id}", headers={"Last-Event-ID": f"{stream_id}.1"}
        )
        assert late.status == 410
        assert (await late.json())["error"]["code"] == "stream_abandoned"
    assert exchange.closed_by_peer
    assert log.outcomes == [Outcome.CLIENT_DISCONNECTED]


async def test_a_resume_point_dropped_by_the_size_bound_is_refused(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    many = [f" {'x' * 400}{i}" for i in range(40)]  # ~20 KB of events, 4 KiB kept
    gated.queue(Script(openai_stream(many)))
    config = config_for(gated)
    config["resumable"] = {"max_bytes": 4096}
    async with run_gateway(config) as gw:
        resp = await http.post(gw.v1 + CHAT, json=chat_body(), headers=RESUMABLE)
        events = _events(await resp.read())  # attached throughout: nothing was lost for it
        stream_id = resp.headers["X-Sluice-Stream-Id"]
        assert _text(events) == "".join(many)
        early = await http.get(
            f"{gw.v1}/streams/{stream_id}", headers={"Last-Event-ID": f"{stream_id}.1"}
        )
        assert early.status == 410
        assert (await early.json())["error"]["code"] == "resume_point_expired"
        late = await http.get(
            f"{gw.v1}/streams/{stream_id}", headers={"Last-Event-ID": str(events[-3][0])}
        )
        assert [data for _id, data in _events(await late.read())] == [
            data for _id, data in events[-2:]
        ]


async def test_bad_event_ids_are_a_clear_400(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    async with run_gateway(config_for(gated)) as gw:
        bad = await http.get(f"{gw.v1}/streams/rs_abcdefgh12345", headers={"Last-Event-ID": "x"})
        assert bad.status == 400
        assert (await bad.json())["error"]["code"] == "invalid_event_id"
        other = await http.get(
            f"{gw.v1}/streams/rs_abcdefgh12345", headers={"Last-Event-ID": "rs_zzzzzzzzzz.4"}
        )
        assert other.status == 400


async def test_resume_on_another_replica_through_redis(
    gated: GatedUpstream, http: aiohttp.ClientSession, redis: RedisServer
) -> None:
    gated.queue(Script(openai_stream(TOKENS)))
    (gate,) = _held_stream(gated)
    config = config_for(gated)
    config["resumable"] = {"redis_url": redis.url, "grace_seconds": 0.3}
    async with run_gateway(config) as one, run_gateway(config) as two:
        whole = await (await http.post(one.v1 + CHAT, json=chat_body(), headers=RESUMABLE)).read()
        stream_id, first = await _drop_after_k(http, one.v1)
        last_id = _events(first)[-1][0]
        resumed = await http.get(
            f"{two.v1}/streams/{stream_id}", headers={"Last-Event-ID": str(last_id)}
        )
        assert resumed.status == 200
        # Outlive replica one's grace period while the reader on two holds its lease:
        # generation must go on. (This waits for a timer; it synchronises nothing.)
        await asyncio.sleep(0.8)
        (_, exchange) = gated.exchanges
        assert not exchange.finished.is_set()
        gate.set()
        rest = _events(await resumed.read())
    together = _events(first) + rest
    assert [i for i, _ in together] == [f"{stream_id}.{n}" for n in range(1, len(together) + 1)]
    assert [data for _id, data in together] == [data for _id, data in _events(whole)]
    assert together[-1][1] == DONE.strip()[6:]


async def test_redis_replica_refuses_other_keys_and_unknown_streams(
    gated: GatedUpstream, http: aiohttp.ClientSession, redis: RedisServer
) -> None:
    keys = {"a": "sk-team-a-key-0000000001", "b": "sk-team-b-key-0000000002"}
    config: dict[str, Any] = config_for(gated)
    config["teams"] = {
        team: {"keys": [{"name": "k", "sha256": hashlib.sha256(key.encode()).hexdigest()}]}
        for team, key in keys.items()
    }
    config["resumable"] = {"redis_url": redis.url}
    (gate,) = _held_stream(gated)
    async with run_gateway(config) as one, run_gateway(config) as two:
        owner = {"Authorization": f"Bearer {keys['a']}"}
        stream_id, _first = await _drop_after_k(http, one.v1, owner)
        gate.set()
        other = await http.get(
            f"{two.v1}/streams/{stream_id}", headers={"Authorization": f"Bearer {keys['b']}"}
        )
        assert other.status == 404
        mine = await http.get(f"{two.v1}/streams/{stream_id}?after=0", headers=owner)
        assert _text(_events(await mine.read())) == "".join(TOKENS)


async def test_a_stream_id_handed_out_is_resumable_on_another_replica_after_a_lost_write(
    gated: GatedUpstream, http: aiohttp.ClientSession, redis: RedisServer
) -> None:
    """Replica one's first write to Redis is lost on the way: it is retried before the
    stream's id goes out, so replica two can serve the stream as soon as a client has it."""
    (gate,) = _held_stream(gated)
    async with SlowLink(redis.port) as link:
        config = config_for(gated)
        via_link = {"redis_url": f"redis://127.0.0.1:{link.port}/0", "grace_seconds": 5}
        config["resumable"] = via_link
        config_two = {**config_for(gated), "resumable": {"redis_url": redis.url}}
        async with run_gateway(config) as one, run_gateway(config_two) as two:
            link.mode = "lost"
            posting = asyncio.create_task(
                http.post(one.v1 + CHAT, json=chat_body(), headers=RESUMABLE)
            )
            try:
                async with asyncio.timeout(BOUND):
                    await link.dropped.wait()  # the stream's meta never reached Redis
                link.mode = "pass"
                async with asyncio.timeout(BOUND):
                    resp = await posting
                stream_id = resp.headers["X-Sluice-Stream-Id"]
                resp.close()
                async with asyncio.timeout(BOUND):
                    resumed = await http.get(f"{two.v1}/streams/{stream_id}?after=0")
                    gate.set()
                    body = await resumed.read()
            finally:
                link.mode = "pass"
                gate.set()
                posting.cancel()
    assert resumed.status == 200, body
    assert _text(_events(body)) == "".join(TOKENS)


async def test_a_stream_whose_mirror_broke_is_unavailable_not_unknown_elsewhere(
    gated: GatedUpstream, http: aiohttp.ClientSession, redis: RedisServer
) -> None:
    """The owner marks a stream it could not mirror as broken; another replica then says
    503 stream_unavailable (it exists), not 404."""
    (gate,) = _held_stream(gated)
    config = {**config_for(gated), "resumable": {"redis_url": redis.url}}
    admin = Redis.from_url(redis.url)
    try:
        async with run_gateway(config) as one, run_gateway(config) as two:
            stream_id, _first = await _drop_after_k(http, one.v1)
            key = f"sluice:stream:{{{stream_id}}}:meta"
            assert await admin.exists(key)
            await admin.hset(key, "state", "broken")  # what a mirror that gave up writes
            async with asyncio.timeout(BOUND):
                other = await http.get(f"{two.v1}/streams/{stream_id}?after=0")
                error = (await other.json())["error"]
            gate.set()
    finally:
        gate.set()
        await admin.aclose()
    assert other.status == 503
    assert error["code"] == "stream_unavailable"
    assert other.headers["Retry-After"] == "1"
