"""The latency meter, driven through a real chain with a request context."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

import plugins.latency
from gateway.chain import Chain, build_chain, discover_plugins
from gateway.config import PluginConfig
from gateway.context import Endpoint, RequestContext
from gateway.plugin import NoOptions
from gateway.sse import SSEEvent
from gateway.testing import PluginRunner
from plugins.latency import LATENCY, LatencyMeter, LatencyStats


def _runner() -> PluginRunner[LatencyMeter]:
    return PluginRunner(LatencyMeter(NoOptions()))


def _chain() -> Chain:
    return build_chain([("plugins[0]", PluginConfig(name="latency"))], discover_plugins())


def _chunk(content: str | None = None, *, role: str | None = None) -> SSEEvent:
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return SSEEvent.from_json(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
    )


def _text(text: str) -> SSEEvent:
    return SSEEvent.from_json(
        {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": text}]}
    )


class FakeClock:
    """Stands in for `time` inside the plugin; each perf_counter() returns the next value."""

    def __init__(self, values: list[float]) -> None:
        self._values: Iterator[float] = iter(values)

    def perf_counter(self) -> float:
        return next(self._values)


def _use_clock(monkeypatch: pytest.MonkeyPatch, *values: float) -> None:
    clock = FakeClock(list(values))
    monkeypatch.setattr(plugins.latency, "time", SimpleNamespace(perf_counter=clock.perf_counter))


def _stats(ctx: RequestContext) -> LatencyStats:
    return ctx.require(LATENCY)


def test_latency_is_the_registered_builtin() -> None:
    chain = _chain()
    assert chain.names == ["latency"]
    assert isinstance(chain.entries[0].plugin, LatencyMeter)


async def test_real_clock_figures_are_consistent() -> None:
    runner = _runner()
    ctx = RequestContext("req_1", Endpoint.CHAT, stream=True)
    await runner.request(ctx=ctx)
    assert _stats(ctx).ttft is None

    runner.events([_chunk("Hello")])
    stats = _stats(ctx)
    assert stats.ttft is not None
    assert stats.ttft >= 0
    first_ttft = stats.ttft
    runner.events([_chunk(" wor"), _chunk("ld")])
    runner.events([_chunk("!")])

    assert stats.ttft == first_ttft  # set once, by the first token
    assert stats.events == 4
    assert stats.gap_count == stats.events - 1
    assert stats.gap_mean is not None
    assert stats.gap_max >= stats.gap_mean >= 0
    assert _stats(ctx).duration is None

    ctx.timing.ended = time.perf_counter()
    await runner.end()
    assert stats.duration is not None
    assert stats.duration >= first_ttft
    assert "latency" in ctx.plugin_seconds
    assert not runner.chain.errors


async def test_exact_figures_with_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner()
    ctx = RequestContext("req_2", Endpoint.CHAT, stream=True)
    ctx.timing.received = 100.0
    await runner.request(ctx=ctx)
    # role-only chunk, then four tokens; one timestamp per batch (its events are written
    # together, so the gap between two events of one batch is 0)
    _use_clock(monkeypatch, 101.0, 101.3, 101.5)
    ping = SSEEvent(data=None, comments=(" ping",))
    runner.events([_chunk(role="assistant"), ping, _chunk("a")])
    runner.events([_chunk("b"), _chunk("c")])
    runner.events([ping, _chunk("d")])

    stats = _stats(ctx)
    assert stats.ttft == pytest.approx(1.0)  # the role-only chunk is not a token
    assert stats.events == 4
    assert stats.gap_count == 3
    assert stats.gap_total == pytest.approx(0.5)
    assert stats.gap_max == pytest.approx(0.3)
    assert stats.gap_mean == pytest.approx(0.5 / 3)

    ctx.timing.ended = 102.0
    ctx.events_in = 6
    ctx.overhead_seconds = 0.012
    await runner.end()
    assert stats.duration == pytest.approx(2.0)
    assert stats.time_per_output_token == pytest.approx(0.5 / 3)
    assert stats.tokens_per_second == pytest.approx(6.0)
    assert stats.overhead == pytest.approx(0.012)
    assert stats.overhead_per_event == pytest.approx(0.002)


async def test_upstream_usage_drives_per_token_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner()
    ctx = RequestContext("req_3", Endpoint.CHAT, stream=True)
    ctx.timing.received = 10.0
    await runner.request(ctx=ctx)
    _use_clock(monkeypatch, 11.0, 13.0)
    runner.events([_chunk("two tokens")])
    runner.events([_chunk("three more tokens")])
    ctx.usage.set_from_upstream({"prompt_tokens": 5, "completion_tokens": 5})
    ctx.timing.ended = 13.5
    await runner.end()

    stats = _stats(ctx)
    assert stats.time_per_output_token == pytest.approx(0.5)
    assert stats.tokens_per_second == pytest.approx(2.0)


async def test_completions_text_counts_as_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner()
    ctx = RequestContext("req_4", Endpoint.COMPLETIONS, stream=True)
    ctx.timing.received = 0.0
    await runner.request(ctx=ctx)
    _use_clock(monkeypatch, 0.25, 0.5)
    runner.events([_text("")])
    runner.events([_text("Once")])
    assert _stats(ctx).ttft == pytest.approx(0.5)


async def test_stream_without_text_has_no_ttft() -> None:
    runner = _runner()
    ctx = RequestContext("req_5", Endpoint.CHAT, stream=True)
    await runner.request(ctx=ctx)
    runner.events([_chunk(role="assistant"), _chunk("")])
    ctx.timing.ended = time.perf_counter()
    await runner.end()

    stats = _stats(ctx)
    assert stats.ttft is None
    assert stats.events == 0
    assert stats.gap_count == 0
    assert stats.gap_mean is None
    assert stats.time_per_output_token is None
    assert stats.tokens_per_second is None
    assert stats.duration is not None


async def test_duration_needs_an_end_time() -> None:
    chain = _chain()
    ctx = RequestContext("req_6", Endpoint.CHAT)
    await chain.run_request(ctx)
    await chain.run_end(ctx)
    assert _stats(ctx).duration is None


async def test_no_state_without_on_request() -> None:
    chain = _chain()
    ctx = RequestContext("req_7", Endpoint.CHAT)
    event = _chunk("x")
    assert chain.run_events(ctx, [event]) == [event]
    await chain.run_end(ctx)
    assert ctx.get(LATENCY) is None
    assert not chain.errors


async def test_events_pass_through_unchanged() -> None:
    runner = _runner()
    ctx = RequestContext("req_8", Endpoint.CHAT)
    await runner.request(ctx=ctx)
    events = [_chunk("a"), _chunk("b")]
    out = runner.events(events)
    assert len(out) == 2
    assert all(o is e for o, e in zip(out, events, strict=True))
