"""The access_log plugin in a real gateway: one line per request, whatever happened.

Lines go to the real stdout (captured by capsys). A probe plugin placed after access_log
records `on_end`: once it ran, the line has been written, so no test waits by sleeping.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.context import RequestContext, upstream_request_id
from gateway.plugin import Plugin
from gateway.sse import SSEEvent
from gateway.testing.fake_upstream import (
    FakeUpstream,
    Script,
    json_script,
    openai_completion,
    openai_stream,
)
from gateway.testing.harness import run_gateway
from plugins.access_log import AccessLog
from tests.integration._support import (
    BOUND,
    CHAT,
    ProbeLog,
    chat_body,
    config_for,
    final_error,
    json_error,
    make_probe,
)

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
TEXT_FIELDS = {"prompt", "prompt_truncated", "completion", "completion_truncated"}
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def setup(
    fake: FakeUpstream,
    *,
    before: tuple[type[Plugin], ...] = (),
    upstream: Mapping[str, Any] | None = None,
    **options: Any,
) -> tuple[dict[str, Any], dict[str, type[Any]], ProbeLog]:
    """Config and registry: [*before, access_log(options), probe], all global plugins."""
    probe, ends = make_probe()
    plugins: list[dict[str, Any]] = [{"name": p.name} for p in before]
    plugins += [{"name": "access_log", "options": options}, {"name": "probe"}]
    config = config_for(fake, plugins=plugins, **(upstream or {}))
    registry: dict[str, type[Any]] = {p.name: p for p in before}
    registry |= {"access_log": AccessLog, "probe": probe}
    return config, registry, ends


def request_lines(out: str) -> list[dict[str, Any]]:
    """Every line written, parsed; all must be JSON objects."""
    parsed = [json.loads(line) for line in out.splitlines()]
    assert all(isinstance(line, dict) for line in parsed)
    return parsed


async def test_completed_stream(
    fake: FakeUpstream, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.queue(Script(openai_stream(["Hello", " world"], usage=USAGE)))
    config, registry, ends = setup(fake)
    body = chat_body(messages=[{"role": "user", "content": "a confidential question"}])
    async with run_gateway(config, registry=registry) as gw, asyncio.timeout(BOUND):
        async with http.post(gw.v1 + CHAT, json=body) as resp:
            assert resp.status == 200
            received = await resp.read()
            request_id = resp.headers["X-Request-Id"]
        await ends.wait_ends(1)
    out = capsys.readouterr().out
    (line,) = request_lines(out)
    assert set(line) == REQUEST_FIELDS
    assert line["event"] == "request"
    assert line["level"] == "info"
    assert line["request_id"] == request_id
    assert line["upstream_request_id"] == upstream_request_id(request_id)
    assert (line["team"], line["key_id"]) == ("anonymous", None)
    assert (line["model"], line["route"], line["upstream"]) == ("m", "m", "fake")
    assert line["upstream_model"] == "gpt-test"
    assert line["endpoint"] == "chat.completions"
    assert line["stream"] is True
    assert (line["status"], line["outcome"]) == (200, "completed")
    assert (line["error_code"], line["error_message"]) == (None, None)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (3, 2)
    assert line["usage_source"] == "upstream"
    assert 0 < line["ttft_ms"] <= line["duration_ms"]
    assert line["events"] == 6  # role, two tokens, finish, usage, [DONE]
    assert line["bytes"] == len(received)
    assert line["retries"] == 0
    assert line["overhead_ms"] >= 0
    assert "Hello" not in out
    assert "confidential" not in out


async def test_completed_non_streaming(
    fake: FakeUpstream, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.queue(json_script(openai_completion("Hi there")))
    config, registry, ends = setup(fake)
    async with run_gateway(config, registry=registry) as gw, asyncio.timeout(BOUND):
        async with http.post(gw.v1 + CHAT, json=chat_body(stream=False)) as resp:
            assert resp.status == 200
            await resp.read()
        await ends.wait_ends(1)
    (line,) = request_lines(capsys.readouterr().out)
    assert set(line) == REQUEST_FIELDS
    assert line["stream"] is False
    assert (line["status"], line["outcome"]) == (200, "completed")
    assert (line["prompt_tokens"], line["completion_tokens"]) == (5, 2)
    assert line["ttft_ms"] is None
    assert line["overhead_ms"] is None


@pytest.mark.parametrize("stream", [True, False])
async def test_messages_requests_are_logged_as_the_messages_endpoint(
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
    stream: bool,
) -> None:
    """/v1/messages runs as chat inside the gateway; the line names what the client called."""
    if stream:
        fake.queue(Script(openai_stream(["Hello"], usage=USAGE)))
    else:
        fake.queue(json_script(openai_completion("Hello")))
    config, registry, ends = setup(fake)
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    async with run_gateway(config, registry=registry) as gw, asyncio.timeout(BOUND):
        async with http.post(gw.url + "/v1/messages", json={**body, "stream": stream}) as resp:
            assert resp.status == 200
            await resp.read()
        await ends.wait_ends(1)
    (line,) = request_lines(capsys.readouterr().out)
    assert set(line) == REQUEST_FIELDS
    assert line["endpoint"] == "messages"
    assert (line["stream"], line["outcome"]) == (stream, "completed")


async def test_client_disconnected(
    fake: FakeUpstream, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """The client leaves after the first event while the upstream still streams."""
    fake.queue(Script(openai_stream(["one", " two"])[:2], then="hang"))
    config, registry, ends = setup(fake)
    async with run_gateway(config, registry=registry) as gw, asyncio.timeout(BOUND):
        resp = await http.post(gw.v1 + CHAT, json=chat_body())
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        resp.close()
        (exchange,) = await fake.wait_for_requests(1)
        await exchange.finished.wait()
        assert exchange.closed_by_peer
        await ends.wait_ends(1)
    (line,) = request_lines(capsys.readouterr().out)
    assert set(line) == REQUEST_FIELDS
    assert line["outcome"] == "client_disconnected"
    assert line["status"] == 200
    assert line["error_code"] is None
    assert line["events"] >= 1
    assert line["ttft_ms"] is not None


async def test_upstream_truncated_stream(
    fake: FakeUpstream, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.queue(Script(openai_stream(["cut", " short"], done=False)))
    config, registry, ends = setup(fake)
    async with run_gateway(config, registry=registry) as gw, asyncio.timeout(BOUND):
        async with http.post(gw.v1 + CHAT, json=chat_body()) as resp:
            assert resp.status == 200
            error = final_error(await resp.read())
        await ends.wait_ends(1)
    (line,) = request_lines(capsys.readouterr().out)
    assert set(line) == REQUEST_FIELDS
    assert line["outcome"] == "upstream_error"
    assert line["status"] == 200  # what the client got; the error rides in the stream
    assert line["error_code"] == error["code"] == "upstream_truncated"
    assert line["error_message"] == error["message"]


@pytest.mark.parametrize(
    ("body", "status", "code", "model"),
    [
        (orjson.dumps(chat_body(model="nope")), 404, "model_not_found", "nope"),
        (b"{not json", 400, None, None),
    ],
    ids=["unknown-model", "bad-json"],
)
async def test_rejected_before_routing(
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
    body: bytes,
    status: int,
    code: str | None,
    model: str | None,
) -> None:
    """The default chain (global plugins) ends requests that never reached a route."""
    config, registry, ends = setup(fake)
    headers = {"Content-Type": "application/json"}
    async with run_gateway(config, registry=registry) as gw, asyncio.timeout(BOUND):
        async with http.post(gw.v1 + CHAT, data=body, headers=headers) as resp:
            assert resp.status == status
            error = json_error(await resp.read())
        await ends.wait_ends(1)
    assert fake.exchanges == []
    (line,) = request_lines(capsys.readouterr().out)
    assert set(line) == REQUEST_FIELDS
    assert (line["status"], line["outcome"]) == (status, "rejected")
    assert line["error_code"] == error["code"]
    if code is not None:
        assert line["error_code"] == code
    assert line["error_message"] == error["message"]
    assert line["model"] == model
    assert (line["route"], line["upstream"]) == (None, None)
    assert line["ttft_ms"] is None


async def test_text_logged_when_enabled(
    fake: FakeUpstream, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.queue(Script(openai_stream(["Hello", " world"], usage=USAGE)))
    config, registry, ends = setup(fake, log_prompts=True, log_completions=True)
    async with run_gateway(config, registry=registry) as gw, asyncio.timeout(BOUND):
        async with http.post(gw.v1 + CHAT, json=chat_body()) as resp:
            await resp.read()
        await ends.wait_ends(1)
    (line,) = request_lines(capsys.readouterr().out)
    assert set(line) == REQUEST_FIELDS | TEXT_FIELDS
    assert line["prompt"] == ["hi"]
    assert line["completion"] == ["Hello world"]
    assert (line["prompt_truncated"], line["completion_truncated"]) == (False, False)


class Scrubber(Plugin):
    """Stands in for content_filter: redacts the prompt and `secret` in the output."""

    name = "scrubber"

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.body = {**ctx.body, "messages": [{"role": "user", "content": "[redacted]"}]}

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        data = event.data
        if data is None or "secret" not in data:
            return None
        return [SSEEvent(data=data.replace("secret", "[x]"))]


async def test_text_is_logged_as_earlier_plugins_left_it(
    fake: FakeUpstream, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.queue(Script(openai_stream(["the", " secret", " plan"])))
    config, registry, ends = setup(fake, before=(Scrubber,), log_prompts=True, log_completions=True)
    body = chat_body(messages=[{"role": "user", "content": "my password is hunter2"}])
    async with run_gateway(config, registry=registry) as gw, asyncio.timeout(BOUND):
        async with http.post(gw.v1 + CHAT, json=body) as resp:
            await resp.read()
        await ends.wait_ends(1)
    (exchange,) = fake.exchanges
    assert exchange.body["messages"] == [{"role": "user", "content": "[redacted]"}]
    out = capsys.readouterr().out
    (line,) = request_lines(out)
    assert line["prompt"] == ["[redacted]"]
    assert line["completion"] == ["the [x] plan"]
    assert "hunter2" not in out
    assert "secret" not in out


async def test_no_secret_reaches_a_line(
    fake: FakeUpstream, http: aiohttp.ClientSession, capfd: pytest.CaptureFixture[str]
) -> None:
    """Client credentials, the upstream's api_key, and a key echoed in an upstream error."""
    upstream_key = "sk-upstreamSECRET0123456789"
    client_key = "sk-clientSECRET0123456789"
    echoed = {"error": {"message": f"Incorrect API key provided: {upstream_key}", "type": "x"}}
    fake.queue(Script(openai_stream(["ok"], usage=USAGE)), json_script(echoed, status=400))
    config, registry, ends = setup(
        fake,
        upstream={"api_key": upstream_key},
        level="debug",
        log_prompts=True,
        log_completions=True,
    )
    headers = {
        "Authorization": f"Bearer {client_key}",
        "X-Api-Key": client_key,
        "Cookie": f"session={client_key}",
    }
    async with run_gateway(config, registry=registry) as gw, asyncio.timeout(BOUND):
        for stream in (True, False):
            async with http.post(
                gw.v1 + CHAT, json=chat_body(stream=stream), headers=headers
            ) as resp:
                await resp.read()
        await ends.wait_ends(2)
    sent = {k.lower(): v for k, v in fake.exchanges[0].headers.items()}
    assert sent["authorization"] == f"Bearer {upstream_key}"  # the secret was in play
    captured = capfd.readouterr()
    everything = captured.out + captured.err
    for secret in (upstream_key, client_key, "SECRET0123456789"):
        assert secret not in everything
    events = [line["event"] for line in request_lines(captured.out)]
    assert events == ["request.start", "request"] * 2 + ["request.error"]
    error_line = request_lines(captured.out)[-1]
    assert error_line["error_status"] == 400
    assert "[redacted]" in error_line["error_message"]


async def test_one_line_per_request(
    fake: FakeUpstream, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    config, registry, ends = setup(fake)
    ids: list[str] = []
    async with run_gateway(config, registry=registry) as gw, asyncio.timeout(BOUND):
        for _ in range(3):
            async with http.post(gw.v1 + CHAT, json=chat_body()) as resp:
                await resp.read()
                ids.append(resp.headers["X-Request-Id"])
        await ends.wait_ends(3)
    lines = request_lines(capsys.readouterr().out)
    assert [line["request_id"] for line in lines] == ids
    assert len(set(ids)) == 3


async def test_console_format(
    fake: FakeUpstream, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    config, registry, ends = setup(fake, format="console")
    async with run_gateway(config, registry=registry) as gw, asyncio.timeout(BOUND):
        async with http.post(gw.v1 + CHAT, json=chat_body()) as resp:
            await resp.read()
            request_id = resp.headers["X-Request-Id"]
        await ends.wait_ends(1)
    (line,) = capsys.readouterr().out.splitlines()
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    assert "[info" in line
    assert f"request_id='{request_id}'" in line
    assert "outcome='completed'" in line
    assert "status=200" in line
    assert "route='m'" in line
