"""Stream healing over loopback: an upstream that breaks after k events, a deployment that
continues the answer, and the client seeing one answer (raw SSE and the official SDKs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from gateway.chain import discover_plugins
from gateway.context import Outcome
from gateway.testing.fake_upstream import (
    Exchange,
    FakeUpstream,
    Script,
    openai_chunk,
    openai_stream,
    sse,
)
from gateway.testing.harness import run_gateway
from tests.integration._support import BOUND, CHAT, ProbeLog, make_probe
from tests.integration.provider_fakes import (
    anthropic_message_end,
    anthropic_message_start,
    anthropic_text_block,
    openai_tool_stream,
)

TOKENS = ["Once", " upon", " a", " time", " there", " was", " a", " gateway."]
ANSWER = "".join(TOKENS)
EVENTS = openai_stream(TOKENS)  # role, 8 tokens, finish, [DONE]


class Healing:
    """Two deployments sharing one script: the first request breaks after `k` events (by
    `then`), every later one continues from the trailing assistant message it was sent."""

    def __init__(self, k: int, then: str = "reset") -> None:
        self.k, self.then = k, then
        self.requests: list[Any] = []

    def respond(self, exchange: Exchange) -> Script:
        self.requests.append(exchange.body)
        if len(self.requests) == 1:
            return Script(EVENTS[: self.k], then=self.then)
        messages = exchange.body["messages"]
        prefix = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        assert ANSWER.startswith(prefix)
        rest = _split(ANSWER[len(prefix) :])
        events = [sse(openai_chunk("", role=True, cid="chatcmpl-second"))]
        events += [sse(openai_chunk(t, cid="chatcmpl-second")) for t in rest]
        events.append(sse(openai_chunk(None, finish_reason="stop", cid="chatcmpl-second")))
        return Script([*events, b"data: [DONE]\n\n"])


def _split(text: str) -> list[str]:
    return [text[i : i + 3] for i in range(0, len(text), 3)]


@pytest.fixture
async def pair() -> AsyncIterator[tuple[FakeUpstream, FakeUpstream]]:
    async with FakeUpstream() as one, FakeUpstream() as two:
        yield one, two


def _config(
    pair: tuple[FakeUpstream, FakeUpstream],
    heal: Any = True,
    *,
    upstream: Mapping[str, Any] | None = None,
    only: str | None = None,
    probe: bool = False,
    **route: Any,
) -> dict[str, Any]:
    """Upstreams `one` and `two` (`upstream`: extra settings for both); a route `m` over both,
    or over `only`; `probe`: the Probe plugin last (registry from `_registry`)."""
    one, two = pair
    ups = {
        name: {
            "kind": "openai",
            "base_url": fake.base_url,
            "include_usage": False,
            "continuation": "vllm",
            **(upstream or {}),
        }
        for name, fake in (("one", one), ("two", two))
    }
    names = ["one", "two"] if only is None else [only]
    deployments = [{"upstream": name} for name in names]
    plugins = [{"name": "token_count"}, {"name": "access_log"}]
    return {
        "upstreams": ups,
        "routes": [{"model": "m", "deployments": deployments, "heal": heal, **route}],
        "plugins": [*plugins, *([{"name": "probe"}] if probe else [])],
    }


def _registry() -> tuple[dict[str, type[Any]], ProbeLog]:
    probe, ends = make_probe()
    return {**discover_plugins(), "probe": probe}, ends


def _use(pair: tuple[FakeUpstream, FakeUpstream], healing: Healing) -> None:
    for fake in pair:
        fake.responder = healing.respond


def _events(raw: bytes) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for block in raw.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith(":"):
                out.append(("comment", line[1:].strip()))
            elif line.startswith("data: "):
                data = line[6:]
                out.append(("data", data if data == "[DONE]" else orjson.loads(data)))
    return out


def _text(events: list[tuple[str, Any]]) -> str:
    return "".join(
        c["delta"].get("content") or ""
        for kind, p in events
        if kind == "data" and isinstance(p, dict)
        for c in p.get("choices", [])
    )


async def _stream(
    http: aiohttp.ClientSession, url: str, **extra: Any
) -> tuple[dict[str, str], bytes]:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}], **extra}
    async with asyncio.timeout(BOUND), http.post(url + "/v1" + CHAT, json=body) as resp:
        assert resp.status == 200
        return dict(resp.headers), await resp.read()


@pytest.mark.parametrize("k", range(1, len(TOKENS) + 2))
async def test_a_stream_broken_after_k_events_heals_into_the_same_answer(
    pair: tuple[FakeUpstream, FakeUpstream], http: aiohttp.ClientSession, k: int
) -> None:
    healing = Healing(k)
    _use(pair, healing)
    async with run_gateway(_config(pair)) as gw:
        headers, raw = await _stream(http, gw.url)
        metrics = await (await http.get(gw.url + "/metrics")).text()
    events = _events(raw)
    assert headers["X-Sluice-Heal"] == "enabled"
    assert _text(events) == ANSWER
    assert events[-1] == ("data", "[DONE]")
    assert not any(p.get("error") for kind, p in events if isinstance(p, dict))
    datas = [p for kind, p in events if kind == "data" and isinstance(p, dict)]
    assert {p["id"] for p in datas} == {"chatcmpl-test"}  # one answer for SDKs
    assert sum(1 for p in datas if p["choices"][0]["delta"].get("role")) == 1
    comments = [p for kind, p in events if kind == "comment" and "sluice-healed" in p]
    assert len(comments) == 1
    assert comments[0].startswith("sluice-healed attempt=2 gap_ms=")
    continuation = healing.requests[1]
    assert continuation["continue_final_message"] is True
    assert continuation["add_generation_prompt"] is False
    assert continuation["messages"][-1] == {
        "role": "assistant",
        "content": "".join(TOKENS[: k - 1]),
    }
    assert 'sluice_stream_heals_total{result="ok",route="m"} 1.0' in metrics


class Breaking(Healing):
    """Every request breaks after `k` events: the heal fails too."""

    def respond(self, exchange: Exchange) -> Script:
        self.requests.append(exchange.body)
        return Script(EVENTS[: self.k], then="reset")


async def test_a_heal_that_fails_ends_with_one_final_error_event(
    pair: tuple[FakeUpstream, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    healing = Breaking(3)
    _use(pair, healing)
    async with run_gateway(_config(pair)) as gw:
        _, raw = await _stream(http, gw.url)
        metrics = await (await http.get(gw.url + "/metrics")).text()
    events = _events(raw)
    errors = [p for kind, p in events if isinstance(p, dict) and "error" in p]
    assert len(errors) == 1
    assert events[-1] == ("data", errors[0])
    assert len(healing.requests) == 2  # max_attempts: 1
    assert _text(events).startswith("".join(TOKENS[:2]))
    assert 'sluice_stream_heals_total{result="failed",route="m"} 1.0' in metrics


@pytest.mark.parametrize("heal", [False, None])
async def test_a_route_without_heal_ends_a_broken_stream_as_before(
    pair: tuple[FakeUpstream, FakeUpstream], http: aiohttp.ClientSession, heal: Any
) -> None:
    healing = Healing(4)
    _use(pair, healing)
    async with run_gateway(_config(pair, heal=heal)) as gw:
        headers, raw = await _stream(http, gw.url)
    events = _events(raw)
    assert "X-Sluice-Heal" not in headers
    assert len(healing.requests) == 1
    assert _text(events) == "".join(TOKENS[:3])
    assert "error" in events[-1][1]


class Recorder:
    """Answers every request with one script, keeping the bodies."""

    def __init__(self, seen: list[Any], script: Script) -> None:
        self.seen, self.script = seen, script

    def respond(self, exchange: Exchange) -> Script:
        self.seen.append(exchange.body)
        return self.script


async def test_no_heal_after_a_length_stop(
    pair: tuple[FakeUpstream, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    healing = Healing(0)
    stopped = [*EVENTS[:4], sse(openai_chunk(None, finish_reason="length"))]
    for fake in pair:
        fake.responder = Recorder(healing.requests, Script(stopped, then="reset")).respond
    async with run_gateway(_config(pair)) as gw:
        _, raw = await _stream(http, gw.url)
    assert len(healing.requests) == 1
    assert "error" in _events(raw)[-1][1]


async def test_no_heal_inside_a_tool_call(
    pair: tuple[FakeUpstream, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    seen: list[Any] = []
    tool = openai_tool_stream(text=["Let me look."], pieces=['{"q":', ' "x"}', "}"])
    for fake in pair:
        fake.responder = Recorder(seen, Script(tool[:4], then="reset")).respond
    async with run_gateway(_config(pair)) as gw:
        _, raw = await _stream(http, gw.url)
    assert len(seen) == 1
    assert "error" in _events(raw)[-1][1]


async def test_the_openai_sdk_sees_one_answer(
    pair: tuple[FakeUpstream, FakeUpstream],
) -> None:
    healing = Healing(5)
    _use(pair, healing)
    async with run_gateway(_config(pair)) as gw:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        async with client:
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            chunks = [chunk async for chunk in stream]
    assert {chunk.id for chunk in chunks} == {"chatcmpl-test"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"


class ErrorEvent(Healing):
    """The first stream sends an in-band error event after `k` events (and ends)."""

    def respond(self, exchange: Exchange) -> Script:
        if not self.requests:
            self.requests.append(exchange.body)
            error = {"error": {"message": "overloaded", "type": "server_error", "code": None}}
            return Script([*EVENTS[: self.k], sse(error)])
        return super().respond(exchange)


async def test_an_in_band_error_event_mid_stream_heals(
    pair: tuple[FakeUpstream, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    healing = ErrorEvent(4)
    _use(pair, healing)
    async with run_gateway(_config(pair)) as gw:
        _, raw = await _stream(http, gw.url)
    events = _events(raw)
    assert _text(events) == ANSWER
    assert events[-1] == ("data", "[DONE]")
    assert not any("error" in p for kind, p in events if isinstance(p, dict))
    assert any(kind == "comment" and "sluice-healed" in p for kind, p in events)
    assert len(healing.requests) == 2
    assert healing.requests[1]["messages"][-1]["content"] == "Once upon a"


async def test_a_client_that_leaves_mid_stream_is_never_healed(
    pair: tuple[FakeUpstream, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    healing = Healing(4, then="hang")
    _use(pair, healing)
    registry, ends = _registry()
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with run_gateway(_config(pair, probe=True), registry=registry) as gw:
        async with asyncio.timeout(BOUND):
            resp = await http.post(gw.url + "/v1" + CHAT, json=body)
            got = b""
            while got.count(b"\n\n") < 4:  # the role chunk and three tokens
                got += await resp.content.readany()
            resp.close()  # the client goes away mid-answer
            (exchange,) = [e for fake in pair for e in fake.exchanges]
            await exchange.finished.wait()  # the gateway cancelled the upstream
        (ctx,) = await ends.wait_ends(1)
    assert ctx.outcome is Outcome.CLIENT_DISCONNECTED
    assert exchange.closed_by_peer
    assert len(healing.requests) == 1
    assert sum(len(fake.exchanges) for fake in pair) == 1


# ----- the native Anthropic lane --------------------------------------------------------

BLOCKS = ["Once", " upon", " a", " time"]


def _anthropic_events(k: int | None) -> list[bytes]:
    events = [
        anthropic_message_start(),
        *anthropic_text_block(0, BLOCKS),
        *anthropic_message_end("end_turn", 4),
    ]
    return events if k is None else events[:k]


async def test_the_anthropic_sdk_sees_one_message_on_the_native_lane(
    pair: tuple[FakeUpstream, FakeUpstream],
) -> None:
    sent: list[Any] = []

    def respond(exchange: Exchange) -> Script:
        sent.append(exchange.body)
        if len(sent) == 1:
            return Script(_anthropic_events(4), then="reset")  # start, block start, 2 deltas
        prefix = exchange.body["messages"][-1]["content"]
        assert "".join(BLOCKS).startswith(prefix)
        rest = "".join(BLOCKS)[len(prefix) :]
        return Script(
            [
                anthropic_message_start(),
                *anthropic_text_block(0, [rest]),
                *anthropic_message_end("end_turn", 2),
            ]
        )

    one, two = pair
    for fake in pair:
        fake.responder = respond
    config = {
        "upstreams": {
            name: {"kind": "anthropic", "base_url": f"http://127.0.0.1:{fake.port}"}
            for name, fake in (("one", one), ("two", two))
        },
        "routes": [
            {"model": "m", "deployments": [{"upstream": "one"}, {"upstream": "two"}], "heal": True}
        ],
    }
    async with run_gateway(config) as gw:
        client = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        async with (
            client,
            client.messages.stream(
                model="m", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            ) as stream,
        ):
            text = "".join([t async for t in stream.text_stream])
            message = await stream.get_final_message()
    assert text == "".join(BLOCKS)
    assert len(message.content) == 1
    assert message.content[0].type == "text"
    assert message.content[0].text == "".join(BLOCKS)
    assert message.stop_reason == "end_turn"
    assert sent[1]["messages"][-1] == {"role": "assistant", "content": "Once upon"}
