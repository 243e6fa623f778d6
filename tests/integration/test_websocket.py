"""GET /v1/ws: the same chunks as SSE, `cancel` mid-answer, several requests on one socket."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.context import Outcome
from gateway.testing.fake_upstream import FakeUpstream, Script, openai_stream
from gateway.testing.harness import run_gateway
from tests.integration._support import (
    BOUND,
    GatedUpstream,
    chat_body,
    config_for,
    gated_script,
    make_probe,
)

PROBE = [{"name": "probe"}]
KEY = "sk-team-a-0123456789abcdef"


async def _next(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    async with asyncio.timeout(BOUND):
        message = await ws.receive()
    assert message.type is aiohttp.WSMsgType.TEXT, message
    payload = orjson.loads(message.data)
    assert isinstance(payload, dict)
    return payload


_STASH: dict[tuple[int, str], list[dict[str, Any]]] = {}


async def _until_done(ws: aiohttp.ClientWebSocketResponse, rid: str) -> list[dict[str, Any]]:
    """Every message for `rid` up to and including its `done` (others are kept for later)."""
    seen = _STASH.pop((id(ws), rid), [])
    while not (seen and seen[-1]["type"] == "done"):
        message = await _next(ws)
        if message["id"] == rid:
            seen.append(message)
        else:
            _STASH.setdefault((id(ws), message["id"]), []).append(message)
    return seen


def _text(messages: list[dict[str, Any]]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for message in messages
        if message["type"] == "chunk"
        for choice in message["data"]["choices"]
    )


async def _request(ws: aiohttp.ClientWebSocketResponse, rid: str, **body: Any) -> None:
    await ws.send_str(
        orjson.dumps({"type": "request", "id": rid, "body": chat_body(**body)}).decode()
    )


async def test_chunks_are_the_sse_chunks_and_done_carries_usage(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    chunks = openai_stream(
        ["Hel", "lo", " there"],
        usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    )
    fake.queue(Script(chunks), Script(chunks))
    async with run_gateway(config_for(fake)) as gw:
        sse_body = await (await http.post(gw.v1 + "/chat/completions", json=chat_body())).read()
        async with http.ws_connect(gw.v1 + "/ws") as ws:
            await _request(ws, "r1")
            messages = await _until_done(ws, "r1")
    assert messages[0]["type"] == "start"
    assert messages[0]["headers"]["X-Request-Id"].startswith("req_")
    sse_chunks = [
        orjson.loads(line[6:]) for line in sse_body.split(b"\n\n") if line.startswith(b"data: {")
    ]
    assert [m["data"] for m in messages if m["type"] == "chunk"] == sse_chunks
    assert _text(messages) == "Hello there"
    done = messages[-1]
    assert done["outcome"] == "completed"
    assert done["usage"]["completion_tokens"] == 3
    assert fake.exchanges[1].body["stream"] is True


async def test_cancel_stops_the_upstream_and_the_socket_takes_a_new_request(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    probe, log = make_probe()
    held, (gate,) = gated_script(openai_stream(["first", " never"]), 2)
    gated.queue(held, Script(openai_stream(["second answer"])))
    async with (
        run_gateway(config_for(gated, plugins=PROBE), registry={"probe": probe}) as gw,
        http.ws_connect(gw.v1 + "/ws") as ws,
    ):
        await _request(ws, "a")
        assert (await _next(ws))["type"] == "start"
        role, chunk = await _next(ws), await _next(ws)
        assert _text([role, chunk]) == "first"
        await ws.send_str('{"type": "cancel", "id": "a"}')
        done = await _until_done(ws, "a")
        assert done[-1] == {"type": "done", "id": "a", "outcome": "cancelled", "usage": None}
        (exchange,) = gated.exchanges
        async with asyncio.timeout(BOUND):
            await exchange.finished.wait()
        assert exchange.closed_by_peer  # the gateway hung up on the upstream
        assert not gate.is_set()
        await log.wait_ends(1)
        assert log.outcomes == [Outcome.CANCELLED]

        await _request(ws, "b")
        second = await _until_done(ws, "b")
    assert _text(second) == "second answer"
    assert second[-1]["outcome"] == "completed"


async def test_closing_the_socket_cancels_the_upstream(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    probe, log = make_probe()
    held, _gates = gated_script(openai_stream(["one", " two"]), 2)
    gated.queue(held)
    async with run_gateway(config_for(gated, plugins=PROBE), registry={"probe": probe}) as gw:
        ws = await http.ws_connect(gw.v1 + "/ws")
        await _request(ws, "x")
        assert (await _next(ws))["type"] == "start"
        assert (await _next(ws))["type"] == "chunk"
        await ws.close()
        (exchange,) = gated.exchanges
        async with asyncio.timeout(BOUND):
            await exchange.finished.wait()
        await log.wait_ends(1)
    assert exchange.closed_by_peer
    assert log.outcomes == [Outcome.CLIENT_DISCONNECTED]


async def test_two_requests_run_at_once_on_one_socket(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    slow, (gate,) = gated_script(openai_stream(["slow", " end"]), 2)
    gated.queue(slow, Script(openai_stream(["quick"])))
    async with run_gateway(config_for(gated)) as gw, http.ws_connect(gw.v1 + "/ws") as ws:
        await _request(ws, "slow")
        await gated.wait_for_requests(1)
        await _request(ws, "quick")
        quick = await _until_done(ws, "quick")  # finishes while "slow" is held
        assert _text(quick) == "quick"
        gate.set()
        slow_messages = await _until_done(ws, "slow")
    assert _text(slow_messages) == "slow end"


async def test_errors_come_as_messages_and_every_request_ends_with_done(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with run_gateway(config_for(fake)) as gw, http.ws_connect(gw.v1 + "/ws") as ws:
        await _request(ws, "u", model="no-such-model")
        error, done = await _until_done(ws, "u")
        assert error["type"] == "error"
        assert error["status"] == 404
        assert error["error"]["code"] == "model_not_found"
        assert done["outcome"] == "rejected"

        await ws.send_str("{not json")
        assert (await _next(ws))["error"]["message"] == "The message is not valid JSON."
        await ws.send_str('{"type": "request", "id": "bad id!", "body": {}}')
        assert (await _next(ws))["error"]["param"] == "id"
        await ws.send_str('{"type": "request", "id": "nb", "body": []}')
        error, done = await _until_done(ws, "nb")
        assert error["status"] == 400
        assert done["outcome"] == "rejected"
        await ws.send_str('{"type": "shout"}')
        assert (await _next(ws))["error"]["param"] == "type"
        await ws.send_str('{"type": "cancel", "id": "never-started"}')  # ignored
        await _request(ws, "after", model="m")
        fake.queue(Script(openai_stream(["ok"])))
        assert _text(await _until_done(ws, "after")) == "ok"


async def test_an_upstream_failure_after_start_is_an_error_message_then_done(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script([*openai_stream(["part"], done=False)], then="reset"))
    async with run_gateway(config_for(fake)) as gw, http.ws_connect(gw.v1 + "/ws") as ws:
        await _request(ws, "r")
        messages = await _until_done(ws, "r")
    kinds = [m["type"] for m in messages]
    assert kinds == ["start", "chunk", "chunk", "chunk", "error", "done"]  # role, part, finish
    assert messages[-2]["error"]["type"] == "upstream_error"
    assert messages[-1]["outcome"] == "upstream_error"


async def test_keys_from_the_handshake_or_an_auth_message(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    import hashlib

    config = config_for(fake)
    config["auth"] = "keys"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    config["teams"] = {"a": {"keys": [{"name": "k", "sha256": digest}]}}
    fake.default = Script(openai_stream(["hi"]))
    async with run_gateway(config) as gw:
        async with http.ws_connect(gw.v1 + "/ws") as ws:
            await _request(ws, "anon")
            error, _done = await _until_done(ws, "anon")
            assert error["status"] == 401
            assert error["error"]["code"] == "missing_api_key"
            await ws.send_str('{"type": "auth", "api_key": "sk-wrong-key-000000"}')
            refused = await _next(ws)
            assert refused["status"] == 401
            assert "sk-wrong-key-000000" not in refused["error"]["message"]
            await ws.send_str(orjson.dumps({"type": "auth", "api_key": KEY}).decode())
            assert await _next(ws) == {"type": "auth", "id": None, "ok": True}
            await _request(ws, "keyed")
            assert _text(await _until_done(ws, "keyed")) == "hi"
        headers = {"Authorization": f"Bearer {KEY}"}
        async with http.ws_connect(gw.v1 + "/ws", headers=headers) as ws:
            await _request(ws, "hs")
            assert _text(await _until_done(ws, "hs")) == "hi"
    metrics = gw.state.metrics.registry.get_sample_value(
        "sluice_requests_total",
        {"team": "a", "model": "m", "upstream": "fake", "status": "200", "outcome": "completed"},
    )
    assert metrics == 2


async def test_a_foreign_browser_origin_is_refused_at_the_handshake(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config = config_for(fake, server={"cors": {"allow_origins": ["https://app.example.com"]}})
    fake.default = Script(openai_stream(["ok"]))
    async with run_gateway(config) as gw:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(gw.v1 + "/ws", headers={"Origin": "https://evil.example"})
        assert refused.value.status == 403
        host = gw.url.removeprefix("http://")
        for origin in ("https://app.example.com", f"http://{host}"):
            async with http.ws_connect(gw.v1 + "/ws", headers={"Origin": origin}) as ws:
                await _request(ws, "o")
                assert _text(await _until_done(ws, "o")) == "ok"
