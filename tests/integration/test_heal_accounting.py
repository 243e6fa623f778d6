"""Stream healing's accounting over loopback: the breakers of the broken and the continuing
upstream, retries before the first byte, and usage summed over the attempts (the client's
usage chunk, the access log's `healed` and `heal_gap_ms`, the gap metric)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

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
from tests.integration.test_heal import (
    ANSWER,
    EVENTS,
    TOKENS,
    Breaking,
    Healing,
    _config,
    _events,
    _registry,
    _stream,
    _text,
    _use,
)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[FakeUpstream, FakeUpstream]]:
    async with FakeUpstream() as one, FakeUpstream() as two:
        yield one, two


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
