"""Stream healing over loopback: an upstream that breaks after k events, a deployment that
continues the answer, and the client seeing one answer (raw SSE and the official SDKs)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from gateway.chain import discover_plugins
from gateway.context import Outcome
from gateway.heal import HEALED
from gateway.testing.fake_upstream import (
    Exchange,
    FakeUpstream,
    Script,
    json_script,
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


def _broken_first(pair: tuple[FakeUpstream, FakeUpstream]) -> tuple[str, str]:
    """(the upstream whose stream broke, the one that continued it), from what each saw."""
    one, _ = pair
    first = one.exchanges[0].body["messages"][-1]["role"] == "user" if one.exchanges else False
    return ("one", "two") if first else ("two", "one")


@pytest.mark.parametrize("threshold", [1, 5])
async def test_the_breaker_counts_the_break_against_the_broken_upstream_only(
    pair: tuple[FakeUpstream, FakeUpstream], http: aiohttp.ClientSession, threshold: int
) -> None:
    healing = Healing(4)
    _use(pair, healing)
    async with run_gateway(_config(pair, upstream={"failure_threshold": threshold})) as gw:
        _, raw = await _stream(http, gw.url)
        health = gw.state.health
    assert _text(_events(raw)) == ANSWER
    assert [len(fake.exchanges) for fake in pair] == [1, 1]
    broken, continued = (health[name] for name in _broken_first(pair))
    assert (broken.failures, broken.successes) == (1, 0)
    assert broken.breaker.consecutive_failures == 1
    assert broken.breaker.state == ("open" if threshold == 1 else "closed")
    assert broken.breaker.times_opened == (1 if threshold == 1 else 0)
    assert (continued.failures, continued.successes) == (0, 1)
    assert continued.breaker.consecutive_failures == 0
    assert continued.breaker.state == "closed"
    assert broken.outstanding == continued.outstanding == 0


async def test_a_single_deployment_route_heals_on_the_same_upstream(
    pair: tuple[FakeUpstream, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    healing = Healing(4)
    one, two = pair
    one.responder = healing.respond
    async with run_gateway(_config(pair, only="one")) as gw:
        _, raw = await _stream(http, gw.url)
        health = gw.state.health["one"]
    events = _events(raw)
    assert _text(events) == ANSWER
    assert events[-1] == ("data", "[DONE]")
    assert (len(one.exchanges), len(two.exchanges)) == (2, 0)
    continuation = one.exchanges[1].body
    assert continuation["continue_final_message"] is True
    assert continuation["messages"][-1] == {"role": "assistant", "content": "Once upon a"}
    assert (health.failures, health.successes) == (1, 1)
    assert health.breaker.consecutive_failures == 0  # the continuation's success
    assert health.outstanding == 0


async def test_an_upstream_its_break_ejected_is_not_asked_to_continue(
    pair: tuple[FakeUpstream, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    healing = Healing(4)
    one, _ = pair
    one.responder = healing.respond
    config = _config(pair, only="one", upstream={"failure_threshold": 1})
    async with run_gateway(config) as gw:
        _, raw = await _stream(http, gw.url)
        metrics = await (await http.get(gw.url + "/metrics")).text()
        breaker = gw.state.health["one"].breaker
    events = _events(raw)
    assert len(one.exchanges) == 1
    assert breaker.state == "open"
    assert _text(events) == "Once upon a"
    assert "error" in events[-1][1]
    assert 'sluice_stream_heals_total{result="failed",route="m"} 1.0' in metrics


async def test_a_continuation_that_breaks_in_turn_is_a_failure_of_its_own_upstream(
    pair: tuple[FakeUpstream, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    healing = Breaking(3)
    _use(pair, healing)
    async with run_gateway(_config(pair)) as gw:
        _, raw = await _stream(http, gw.url)
        health = gw.state.health
    assert "error" in _events(raw)[-1][1]
    assert [len(fake.exchanges) for fake in pair] == [1, 1]
    for name in ("one", "two"):
        assert (health[name].failures, health[name].successes) == (1, 0), name
        assert health[name].breaker.consecutive_failures == 1, name
        assert health[name].outstanding == 0


class Refusing(Healing):
    """The first request is refused before the first byte (503); the next streams whole."""

    def respond(self, exchange: Exchange) -> Script:
        self.requests.append(exchange.body)
        if len(self.requests) == 1:
            return json_script({"error": {"message": "busy", "type": "server_error"}}, 503)
        return Script(EVENTS)


async def test_a_failure_before_the_first_byte_is_a_retry_not_a_heal(
    pair: tuple[FakeUpstream, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    healing = Refusing(0)
    _use(pair, healing)
    registry, ends = _registry()
    async with run_gateway(_config(pair, probe=True), registry=registry) as gw:
        _, raw = await _stream(http, gw.url)
        (ctx,) = await ends.wait_ends(1)
        metrics = await (await http.get(gw.url + "/metrics")).text()
    events = _events(raw)
    assert _text(events) == ANSWER
    assert not any(kind == "comment" and "sluice-healed" in p for kind, p in events)
    assert ctx.retries == 1
    assert ctx.get(HEALED) is None
    assert "continue_final_message" not in healing.requests[1]
    assert healing.requests[1]["messages"] == healing.requests[0]["messages"]
    assert "sluice_stream_heals_total{" not in metrics


PROMPT = 10  # the first attempt's prompt tokens; the continuation's adds the prefix's 3


def _metered(content: str | None, completion: int, *, role: bool = False) -> bytes:
    """A chunk carrying vLLM's continuous usage stats (running totals)."""
    chunk = openai_chunk(content, role=role)
    chunk["usage"] = {
        "prompt_tokens": PROMPT,
        "completion_tokens": completion,
        "total_tokens": PROMPT + completion,
    }
    return sse(chunk)


class Metered(Healing):
    """Both attempts report usage: the first (broken after 3 tokens) as running totals on
    every chunk, the continuation in a final usage-only chunk."""

    def respond(self, exchange: Exchange) -> Script:
        self.requests.append(exchange.body)
        if len(self.requests) == 1:
            events = [_metered("", 0, role=True)]
            events += [_metered(token, i + 1) for i, token in enumerate(TOKENS[:3])]
            return Script(events, then="reset")
        usage = {"prompt_tokens": PROMPT + 3, "completion_tokens": 5, "total_tokens": PROMPT + 8}
        rest = openai_stream(TOKENS[3:], usage=usage)
        return Script(rest)


async def test_usage_is_the_sum_of_both_attempts_reports(
    pair: tuple[FakeUpstream, FakeUpstream],
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    healing = Metered(4)
    _use(pair, healing)
    registry, ends = _registry()
    config = _config(pair, upstream={"include_usage": True}, probe=True)
    async with run_gateway(config, registry=registry) as gw:
        _, raw = await _stream(http, gw.url, stream_options={"include_usage": True})
        (ctx,) = await ends.wait_ends(1)
        metrics = await (await http.get(gw.url + "/metrics")).text()
    events = _events(raw)
    assert _text(events) == ANSWER
    summed = {"prompt_tokens": 2 * PROMPT + 3, "completion_tokens": 8, "total_tokens": 31}
    usages = [p["usage"] for kind, p in events if isinstance(p, dict) and p.get("usage")]
    assert usages[-1] == summed  # the client's final usage chunk
    assert events[-2][1]["choices"] == []
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (23, 8)
    (line,) = [
        json.loads(out) for out in capsys.readouterr().out.splitlines() if '"request"' in out
    ]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (23, 8)
    assert line["usage_source"] == "upstream"
    assert line["healed"] == 1
    assert isinstance(line["heal_gap_ms"], float | int)
    assert line["heal_gap_ms"] >= 0
    assert line["outcome"] == "completed"
    assert 'sluice_stream_heal_gap_seconds_count{route="m"} 1.0' in metrics


class Unmetered(Metered):
    """The first attempt reports no usage (it broke before its usage chunk)."""

    def respond(self, exchange: Exchange) -> Script:
        if not self.requests:
            self.requests.append(exchange.body)
            return Script(EVENTS[: self.k], then="reset")
        return super().respond(exchange)


async def test_a_broken_attempt_without_a_report_adds_its_local_count(
    pair: tuple[FakeUpstream, FakeUpstream],
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Usage = the local count of what the broken attempt streamed + the continuation's
    report; the local count is what the same text costs in an unbroken, unreported stream."""
    healing = Unmetered(4)
    _use(pair, healing)
    registry, ends = _registry()
    config = _config(pair, upstream={"include_usage": True}, probe=True)
    async with run_gateway(config, registry=registry) as gw:
        _, raw = await _stream(http, gw.url, stream_options={"include_usage": True})
        await ends.wait_ends(1)
        for fake in pair:  # the oracle: the first attempt's text, unbroken, no usage
            fake.responder = None
            fake.queue(Script(openai_stream(TOKENS[:3])))
        await _stream(http, gw.url)
        await ends.wait_ends(2)
    healed, oracle = [
        json.loads(out) for out in capsys.readouterr().out.splitlines() if '"request"' in out
    ]
    assert oracle["usage_source"] == "local"
    assert oracle["completion_tokens"] > 0
    prompt = oracle["prompt_tokens"] + PROMPT + 3
    completion = oracle["completion_tokens"] + 5
    assert (healed["prompt_tokens"], healed["completion_tokens"]) == (prompt, completion)
    assert healed["usage_source"] == "upstream"
    assert healed["healed"] == 1
    usages = [p["usage"] for kind, p in _events(raw) if isinstance(p, dict) and p.get("usage")]
    assert usages == [
        {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
    ]


async def test_the_local_usage_chunk_of_a_healed_stream_is_part_of_the_same_answer(
    pair: tuple[FakeUpstream, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    """No upstream reports usage: the chunk the gateway makes up carries the answer's id."""
    healing = Healing(4)
    _use(pair, healing)
    async with run_gateway(_config(pair)) as gw:
        _, raw = await _stream(http, gw.url, stream_options={"include_usage": True})
    datas = [p for kind, p in _events(raw) if kind == "data" and isinstance(p, dict)]
    assert _text(_events(raw)) == ANSWER
    assert datas[-1]["choices"] == []
    assert datas[-1]["usage"]["completion_tokens"] > 0
    assert {p["id"] for p in datas} == {"chatcmpl-test"}


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
