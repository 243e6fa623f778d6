"""The access_log plugin, hook by hook, writing into an in-memory stream."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from gateway.chain import build_chain
from gateway.config import ConfigError, PluginConfig, RouteConfig
from gateway.context import Endpoint, Outcome, RequestContext, Timing, Usage
from gateway.errors import GatewayError
from gateway.plugin import Plugin
from gateway.pricing import PRICING, Pricing
from gateway.pricing_config import PriceConfig, PricingConfig
from gateway.sse import SSEEvent
from gateway.testing import PluginRunner, openai_chunk, openai_completion, request_context
from plugins.access_log import AccessLog, AccessLogOptions

REQUEST_FIELDS = {
    "ts",
    "level",
    "event",
    "request_id",
    "upstream_request_id",
    "team",
    "key_id",
    "model",
    "route",
    "upstream",
    "upstream_model",
    "endpoint",
    "stream",
    "status",
    "outcome",
    "error_code",
    "error_message",
    "prompt_tokens",
    "completion_tokens",
    "usage_source",
    "ttft_ms",
    "duration_ms",
    "events",
    "bytes",
    "retries",
    "healed",
    "heal_gap_ms",
    "overhead_ms",
    "cost",
    "currency",
    "cache",
}


def make(**options: Any) -> tuple[PluginRunner[AccessLog], io.StringIO]:
    """The plugin alone in a runner (fail closed: a hook's exception fails the test), writing
    into the returned in-memory stream."""
    buf = io.StringIO()
    return PluginRunner(AccessLog(AccessLogOptions(**options), file=buf), fail_closed=True), buf


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    out = []
    for line in buf.getvalue().splitlines():
        parsed = json.loads(line)
        assert isinstance(parsed, dict)
        out.append(parsed)
    return out


def routed_ctx(
    *, body: dict[str, Any] | None = None, endpoint: Endpoint = Endpoint.CHAT
) -> RequestContext:
    """A context as the proxy leaves it once a streaming request to `m` was routed (to the
    deployment `gpt-test` on `fake`, received at t=100)."""
    body = body if body is not None else {"messages": [{"role": "user", "content": "hi"}]}
    ctx = request_context(
        body, endpoint=endpoint, stream=True, team="blue", key_id="key_42", request_id="req_unit"
    )
    ctx.route = RouteConfig(model="m", upstream="fake", upstream_model="gpt-test")
    ctx.upstream_name = "fake"
    ctx.upstream_model = "gpt-test"
    ctx.upstream_request_id = "6f1c1b0e-9d7a-4c1e-8f00-000000000001"
    ctx.timing = Timing(received=100.0)
    return ctx


def finish(ctx: RequestContext, outcome: Outcome = Outcome.COMPLETED) -> None:
    """Fill in what a finished stream leaves in the context."""
    ctx.timing.response_started = 100.2
    ctx.timing.first_event_written = 100.25
    ctx.timing.last_event_written = 101.0
    ctx.timing.ended = 101.5
    ctx.usage = Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7, source="upstream")
    ctx.events_in = 6
    ctx.events_out = 6
    ctx.bytes_out = 321
    ctx.overhead_seconds = 0.002
    ctx.outcome = outcome


def chunk(text: str, index: int = 0) -> SSEEvent:
    return SSEEvent.from_json(openai_chunk(text, index=index))


# ----- options ----------------------------------------------------------------------------


def test_option_defaults() -> None:
    opts = AccessLogOptions()
    assert opts.level == "info"
    assert opts.format == "json"
    assert opts.log_prompts is False
    assert opts.log_completions is False
    assert opts.max_text_chars == 2000
    assert opts.stream == "stdout"


@pytest.mark.parametrize(
    "bad",
    [
        {"colour": True},
        {"level": "error"},
        {"format": "xml"},
        {"max_text_chars": 0},
        {"stream": "/no/such/directory/access.log"},
    ],
)
def test_bad_options_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AccessLogOptions(**bad)


def test_bad_option_names_its_key_at_build_time() -> None:
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.options\.stream"):
        PluginRunner.configured(AccessLog, {"stream": "/no/such/dir/x.log"})


# ----- the request line -------------------------------------------------------------------


async def test_completed_line_has_every_documented_field() -> None:
    runner, buf = make()
    ctx = routed_ctx()
    await runner.request(ctx=ctx)
    finish(ctx)
    await runner.end()
    (line,) = lines(buf)
    assert set(line) == REQUEST_FIELDS
    ts = datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
    assert ts.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - ts) < timedelta(minutes=1)
    assert line | {"ts": None} == {
        "ts": None,
        "level": "info",
        "event": "request",
        "request_id": "req_unit",
        "upstream_request_id": "6f1c1b0e-9d7a-4c1e-8f00-000000000001",
        "team": "blue",
        "key_id": "key_42",
        "model": "m",
        "route": "m",
        "upstream": "fake",
        "upstream_model": "gpt-test",
        "endpoint": "chat.completions",
        "stream": True,
        "status": 200,
        "outcome": "completed",
        "error_code": None,
        "error_message": None,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "usage_source": "upstream",
        "ttft_ms": 250.0,
        "duration_ms": 1500.0,
        "events": 6,
        "bytes": 321,
        "retries": 0,
        "healed": 0,
        "heal_gap_ms": None,
        "overhead_ms": 2.0,
        "cost": None,  # no price table
        "currency": None,
        "cache": None,  # not a replay route
    }


async def test_the_line_carries_the_request_cost_from_the_price_table() -> None:
    runner, buf = make()
    ctx = routed_ctx()
    table = {"gpt-test": PriceConfig(input=Decimal("2.5"), output=Decimal("10"))}
    ctx.set(PRICING, Pricing(PricingConfig(currency="EUR", models=table)))
    await runner.request(ctx=ctx)
    finish(ctx)  # 3 prompt tokens, 4 completion tokens
    await runner.end()
    (line,) = lines(buf)
    assert (line["cost"], line["currency"]) == (0.0000475, "EUR")


async def test_request_rejected_before_routing() -> None:
    """Only `on_end` runs (on the default chain): no route, no upstream, the error's code."""
    runner, buf = make()
    ctx = RequestContext("req_404", Endpoint.CHAT, model="nope", timing=Timing(received=5.0))
    ctx.error = GatewayError(404, "The model `nope` does not exist.", code="model_not_found")
    ctx.status = 404
    ctx.timing.ended = 5.001
    await runner.end(Outcome.REJECTED, ctx=ctx)
    (line,) = lines(buf)
    assert set(line) == REQUEST_FIELDS
    assert line["status"] == 404
    assert line["outcome"] == "rejected"
    assert line["error_code"] == "model_not_found"
    assert line["error_message"] == "The model `nope` does not exist."
    assert line["model"] == "nope"
    assert (line["route"], line["upstream"], line["upstream_model"]) == (None, None, None)
    assert line["ttft_ms"] is None
    assert line["overhead_ms"] is None
    assert line["duration_ms"] == pytest.approx(1.0)
    assert line["team"] == "anonymous"
    assert line["key_id"] is None


async def test_empty_model_and_long_model() -> None:
    runner, buf = make()
    await runner.end(ctx=RequestContext("req_a", Endpoint.CHAT))
    await runner.end(ctx=RequestContext("req_b", Endpoint.CHAT, model="x" * 10_000))
    first, second = lines(buf)
    assert first["model"] is None
    assert first["duration_ms"] >= 0
    assert second["model"] == "x" * 200


@pytest.mark.parametrize("level", ["info", "warning"])
async def test_line_level_follows_the_option(level: str) -> None:
    runner, buf = make(level=level)
    ctx = routed_ctx()
    await runner.request(ctx=ctx)
    ctx.error = GatewayError(502, "boom", code="upstream_error")
    finish(ctx, Outcome.UPSTREAM_ERROR)
    await runner.end()
    (line,) = lines(buf)  # no start line, no error details
    assert line["level"] == level
    assert line["error_code"] == "upstream_error"


async def test_start_line_and_error_details_at_debug() -> None:
    runner, buf = make(level="debug")
    ctx = routed_ctx()
    await runner.request(ctx=ctx)
    ctx.error = GatewayError(502, "The upstream closed the stream.", code="upstream_truncated")
    ctx.status = 502
    finish(ctx, Outcome.UPSTREAM_ERROR)
    ctx.timing.upstream_headers = 100.1
    await runner.end()
    start, request, error = lines(buf)
    assert [start["event"], request["event"], error["event"]] == [
        "request.start",
        "request",
        "request.error",
    ]
    assert {start["level"], request["level"], error["level"]} == {"debug"}
    assert start["request_id"] == request["request_id"] == error["request_id"] == "req_unit"
    assert start["route"] == "m"
    assert error["error_status"] == 502
    assert error["error_code"] == "upstream_truncated"
    assert error["error_type"] == "invalid_request_error"
    assert error["upstream_headers_ms"] == pytest.approx(100.0)
    assert error["first_upstream_event_ms"] is None


async def test_no_error_details_line_without_an_error() -> None:
    runner, buf = make(level="debug")
    ctx = routed_ctx()
    await runner.request(ctx=ctx)
    finish(ctx)
    await runner.end()
    assert [line["event"] for line in lines(buf)] == ["request.start", "request"]


# ----- text -------------------------------------------------------------------------------


async def test_text_is_not_logged_by_default() -> None:
    runner, buf = make(level="debug")
    assert getattr(runner.plugin, "on_event", None) is None
    assert getattr(runner.plugin, "on_response", None) is None
    ctx = routed_ctx(body={"messages": [{"role": "user", "content": "my private question"}]})
    await runner.request(ctx=ctx)
    finish(ctx)
    await runner.end()
    out = buf.getvalue()
    assert "private question" not in out
    for line in lines(buf):
        assert not {"prompt", "completion", "prompt_truncated", "completion_truncated"} & set(line)


def test_event_hooks_exist_only_when_completions_are_logged() -> None:
    plain = PluginRunner.configured(AccessLog)
    assert not plain.chain.has_event_hooks
    collecting = PluginRunner.configured(AccessLog, {"log_completions": True})  # checks pass
    assert collecting.chain.has_event_hooks
    # The class itself stays hook-free for events: one instance never affects another.
    assert not hasattr(AccessLog, "on_event")
    assert not hasattr(AccessLog, "on_response")


async def test_prompt_and_completion_are_logged_when_enabled() -> None:
    runner, buf = make(log_prompts=True, log_completions=True)
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ]
    }
    ctx = routed_ctx(body=body)
    await runner.request(ctx=ctx)
    role = SSEEvent.from_json(openai_chunk("", role=True))
    for event in (role, chunk("Hello"), chunk(" world"), SSEEvent(data="[DONE]")):
        assert runner.events([event]) == [event]
    finish(ctx)
    await runner.end()
    (line,) = lines(buf)
    assert set(line) == REQUEST_FIELDS | {
        "prompt",
        "prompt_truncated",
        "completion",
        "completion_truncated",
    }
    assert line["prompt"] == ["Be brief.", "hi"]
    assert line["completion"] == ["Hello world"]
    assert line["prompt_truncated"] is False
    assert line["completion_truncated"] is False


async def test_completion_of_each_choice() -> None:
    runner, buf = make(log_completions=True)
    ctx = routed_ctx()
    await runner.request(ctx=ctx)
    for event in (chunk("a", 0), chunk("c", 1), chunk("b", 0), chunk("d", 1)):
        runner.events([event])
    finish(ctx)
    await runner.end()
    assert lines(buf)[0]["completion"] == ["ab", "cd"]


async def test_completion_text_is_bounded() -> None:
    runner, buf = make(log_completions=True, max_text_chars=10)
    ctx = routed_ctx()
    await runner.request(ctx=ctx)
    for _ in range(10_000):
        event = chunk("Hello ")
        assert runner.events([event]) == [event]
    finish(ctx)
    await runner.end()
    (line,) = lines(buf)
    assert line["completion"] == ["Hello Hell"]
    assert line["completion_truncated"] is True


async def test_completion_exactly_at_the_limit_is_not_truncated() -> None:
    runner, buf = make(log_completions=True, max_text_chars=5)
    ctx = routed_ctx()
    await runner.request(ctx=ctx)
    runner.events([chunk("Hello")])
    runner.events([SSEEvent.from_json(openai_chunk(None, finish_reason="stop"))])
    finish(ctx)
    await runner.end()
    (line,) = lines(buf)
    assert line["completion"] == ["Hello"]
    assert line["completion_truncated"] is False


async def test_prompt_text_is_bounded() -> None:
    runner, buf = make(log_prompts=True, max_text_chars=5)
    body = {
        "messages": [
            {"role": "user", "content": "abc"},
            {"role": "user", "content": "defgh"},
            {"role": "user", "content": "ijk"},
        ]
    }
    ctx = routed_ctx(body=body)
    await runner.request(ctx=ctx)
    finish(ctx)
    await runner.end()
    (line,) = lines(buf)
    assert line["prompt"] == ["abc", "de"]
    assert line["prompt_truncated"] is True


async def test_legacy_completions_prompt_and_text() -> None:
    runner, buf = make(log_prompts=True, log_completions=True)
    ctx = routed_ctx(body={"prompt": "Say hi"}, endpoint=Endpoint.COMPLETIONS)
    await runner.request(ctx=ctx)
    event = SSEEvent.from_json({"choices": [{"index": 0, "text": "hi!", "finish_reason": None}]})
    runner.events([event])
    finish(ctx)
    await runner.end()
    (line,) = lines(buf)
    assert line["endpoint"] == "completions"
    assert line["prompt"] == ["Say hi"]
    assert line["completion"] == ["hi!"]


async def test_non_streaming_completion_is_logged_when_enabled() -> None:
    runner, buf = make(log_completions=True)
    ctx = routed_ctx()
    ctx.stream = False
    await runner.request(ctx=ctx)
    answer = openai_completion("Hi there")
    assert await runner.response(answer) is answer
    ctx.timing.ended = 100.5
    await runner.end(Outcome.COMPLETED)
    (line,) = lines(buf)
    assert line["completion"] == ["Hi there"]
    assert line["stream"] is False
    assert line["ttft_ms"] is None


async def test_text_enabled_but_request_never_routed() -> None:
    runner, buf = make(log_prompts=True, log_completions=True)
    await runner.end(ctx=RequestContext("req_x", Endpoint.CHAT))
    (line,) = lines(buf)
    assert line["prompt"] is None
    assert line["completion"] is None
    assert line["prompt_truncated"] is False


class _Redactor(Plugin):
    """Stands in for content_filter: rewrites the prompt before later plugins see it."""

    name = "redactor"

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.body = {"messages": [{"role": "user", "content": "[redacted]"}]}


async def test_prompt_is_taken_after_earlier_plugins_ran() -> None:
    buf = io.StringIO()

    class Captured(AccessLog):
        def __init__(self, options: Any) -> None:
            super().__init__(options, file=buf)

    registry: dict[str, type[Any]] = {"redactor": _Redactor, "access_log": Captured}
    specs = [
        ("plugins[0]", PluginConfig(name="redactor")),
        ("plugins[1]", PluginConfig(name="access_log", options={"log_prompts": True})),
    ]
    chain = build_chain(specs, registry)
    ctx = routed_ctx(body={"messages": [{"role": "user", "content": "my card is 4111"}]})
    await chain.run_request(ctx)
    ctx.body = {"messages": [{"role": "user", "content": "changed later"}]}
    finish(ctx)
    await chain.run_end(ctx)
    assert not chain.errors
    (line,) = lines(buf)
    assert line["prompt"] == ["[redacted]"]
    assert "4111" not in buf.getvalue()


# ----- secrets, formats, streams ------------------------------------------------------------


async def test_credentials_in_error_messages_are_masked() -> None:
    runner, buf = make(level="debug")
    ctx = routed_ctx()
    await runner.request(ctx=ctx)
    ctx.error = GatewayError(
        502, "upstream said: bad key sk-live-0123456789abcdef (Bearer abcdefghijklmnop)"
    )
    finish(ctx, Outcome.UPSTREAM_ERROR)
    await runner.end()
    out = buf.getvalue()
    assert "sk-live-0123456789abcdef" not in out
    assert "abcdefghijklmnop" not in out
    assert "[redacted]" in lines(buf)[1]["error_message"]


async def test_console_format_is_one_readable_line() -> None:
    runner, buf = make(format="console", log_prompts=True)
    ctx = routed_ctx(body={"messages": [{"role": "user", "content": "two\nlines"}]})
    await runner.request(ctx=ctx)
    finish(ctx)
    await runner.end()
    text = buf.getvalue()
    (line,) = text.splitlines()
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    assert line[:4].isdigit()
    assert "Z [info" in line
    assert " request " in line
    assert "request_id='req_unit'" in line
    assert "outcome='completed'" in line
    assert "ttft_ms=250.0" in line
    assert "two\\nlines" in line


async def test_no_global_structlog_configuration() -> None:
    before = structlog.get_config()
    configured = structlog.is_configured()
    json_log, json_buf = make()
    console_log, console_buf = make(format="console", level="debug")
    for runner in (json_log, console_log):
        ctx = routed_ctx()
        await runner.request(ctx=ctx)
        finish(ctx)
        await runner.end()
    assert structlog.get_config() == before
    assert structlog.is_configured() == configured
    assert len(lines(json_buf)) == 1  # each instance keeps its own format and level
    assert len(console_buf.getvalue().splitlines()) == 2


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
async def test_standard_streams(stream: str, capsys: pytest.CaptureFixture[str]) -> None:
    runner = PluginRunner(AccessLog(AccessLogOptions(stream=stream)), fail_closed=True)
    ctx = routed_ctx()
    finish(ctx)
    await runner.end(ctx=ctx)
    captured = capsys.readouterr()
    written, other = (
        (captured.out, captured.err) if stream == "stdout" else (captured.err, captured.out)
    )
    assert other == ""
    (line,) = written.splitlines()
    assert json.loads(line)["request_id"] == "req_unit"


async def test_file_stream_is_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text('{"earlier": true}\n')
    # One instance per chain (each route and the default chain) may share one file.
    first = AccessLog(AccessLogOptions(stream=path))
    second = AccessLog(AccessLogOptions(stream=path))
    runners = {plugin: PluginRunner(plugin, fail_closed=True) for plugin in (first, second)}
    try:
        for plugin in (first, second, first):
            ctx = routed_ctx()
            finish(ctx)
            await runners[plugin].end(ctx=ctx)
    finally:
        first.close()
        second.close()
        first.close()  # idempotent
    earlier, *written = (json.loads(line) for line in path.read_text().splitlines())
    assert earlier == {"earlier": True}
    assert [line["event"] for line in written] == ["request"] * 3
