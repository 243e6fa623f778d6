"""OpenTelemetry traces, exported over OTLP/HTTP to a real receiver on loopback that decodes
the protocol's protobufs. Spans are awaited on the receiver (the gateway's shutdown flushes
them, or a short batch delay in the subprocess test), never slept for."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import aiohttp
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from gateway.auth import hash_key
from gateway.testing.fake_upstream import (
    FakeUpstream,
    Script,
    json_script,
    openai_completion,
    openai_stream,
)
from gateway.testing.harness import run_gateway
from tests.integration._process import REPO, gateway_process
from tests.integration._support import CHAT, chat_body, config_for
from tests.integration.otlp_receiver import OtlpReceiver, ReceivedSpan, attributes

KEY = "sk-sluice-tracing-team-key-00001"
UPSTREAM_KEY = "sk-upstream-secret-never-exported"
PROMPT = "PROMPT-TEXT-THAT-MUST-STAY-PRIVATE"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


@pytest.fixture(autouse=True)
def _no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process tests configure tracing through the config block only."""
    import os

    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def _config(fake: FakeUpstream, receiver: OtlpReceiver, **tracing: Any) -> dict[str, Any]:
    config = config_for(fake, api_key=UPSTREAM_KEY, include_usage=True)
    config["teams"] = {"ml": {"keys": [{"name": "ci", "sha256": hash_key(KEY)}]}}
    config["tracing"] = {"enabled": True, "endpoint": receiver.url, **tracing}
    return config


def _headers(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}", **extra}


def _by_kind(spans: list[ReceivedSpan], kind: int) -> list[ReceivedSpan]:
    return [s for s in spans if s.span.kind == kind]


def _body(stream: bool) -> dict[str, Any]:
    return chat_body(stream=stream, messages=[{"role": "user", "content": PROMPT}])


async def test_stream_traced_in_the_clients_trace(http: aiohttp.ClientSession) -> None:
    stream = openai_stream(["Hel", "lo", "!"], model="gpt-test-0613", usage=USAGE)
    fake = FakeUpstream(Script(stream))
    async with OtlpReceiver() as receiver, fake:
        async with run_gateway(_config(fake, receiver)) as gw:
            headers = _headers(traceparent=TRACEPARENT, tracestate="vendor=abc")
            async with http.post(gw.v1 + CHAT, json=_body(True), headers=headers) as resp:
                assert resp.status == 200
                await resp.read()
        spans = await receiver.wait_spans(2)  # the gateway's shutdown flushed them
    assert len(spans) == 2
    [server] = _by_kind(spans, Span.SPAN_KIND_SERVER)
    [client] = _by_kind(spans, Span.SPAN_KIND_CLIENT)
    # One trace, the client's: server span under the client's span, attempt under the server.
    assert server.span.trace_id.hex() == client.span.trace_id.hex() == TRACE_ID
    assert server.span.parent_span_id.hex() == PARENT_ID
    assert client.span.parent_span_id == server.span.span_id
    # The upstream got the attempt span's context, not the client's header verbatim.
    sent = fake.exchanges[0].headers
    assert sent["traceparent"] == f"00-{TRACE_ID}-{client.span.span_id.hex()}-01"
    assert sent["tracestate"] == "vendor=abc"
    assert server.resource["service.name"] == "sluice"

    s = server.attrs
    assert s["gen_ai.operation.name"] == "chat"
    assert s["gen_ai.request.model"] == "m"
    assert s["gen_ai.response.model"] == "gpt-test-0613"
    assert s["gen_ai.provider.name"] == "openai"
    assert (s["gen_ai.usage.input_tokens"], s["gen_ai.usage.output_tokens"]) == (9, 3)
    assert (s["sluice.team"], s["sluice.route"], s["sluice.upstream"]) == ("ml", "m", "fake")
    assert s["sluice.outcome"] == "completed"
    assert s["http.response.status_code"] == 200
    assert "error.type" not in s
    assert server.span.name == "chat m"
    assert server.span.status.code == Status.STATUS_CODE_OK
    [first_token] = server.span.events
    assert first_token.name == "gen_ai.first_token"
    assert server.span.start_time_unix_nano < first_token.time_unix_nano
    assert first_token.time_unix_nano <= server.span.end_time_unix_nano
    ttft = attributes(first_token.attributes)["gen_ai.server.time_to_first_token"]
    assert isinstance(ttft, float)
    assert ttft > 0

    c = client.attrs
    assert client.span.name == "chat gpt-test"
    assert c["gen_ai.request.model"] == "gpt-test"
    assert c["gen_ai.response.model"] == "gpt-test-0613"
    assert (c["server.address"], c["server.port"]) == ("127.0.0.1", fake.port)
    assert c["http.response.status_code"] == 200
    assert c["gen_ai.usage.output_tokens"] == 3
    assert client.span.status.code == Status.STATUS_CODE_UNSET
    assert server.span.start_time_unix_nano <= client.span.start_time_unix_nano
    assert client.span.end_time_unix_nano <= server.span.end_time_unix_nano

    exported = b"".join(receiver.raw)
    for secret in (KEY, UPSTREAM_KEY, PROMPT, "Hello!"):
        assert secret.encode() not in exported


async def test_failed_attempts_are_error_spans(http: aiohttp.ClientSession) -> None:
    error = {"error": {"message": "overloaded", "type": "server_error", "code": None}}
    fake = FakeUpstream(json_script(error, status=503))
    async with OtlpReceiver() as receiver, fake:
        config = _config(fake, receiver)
        config["routes"][0]["retries"] = 1
        async with run_gateway(config) as gw:
            body = _body(False)
            async with http.post(gw.v1 + CHAT, json=body, headers=_headers()) as resp:
                assert resp.status == 502  # an upstream's 503, retried, then reported
        spans = await receiver.wait_spans(3)
    [server] = _by_kind(spans, Span.SPAN_KIND_SERVER)
    clients = _by_kind(spans, Span.SPAN_KIND_CLIENT)
    assert [c.attrs["sluice.attempt"] for c in clients] == [1, 2]
    assert len(fake.exchanges) == 2
    for client, exchange in zip(clients, fake.exchanges, strict=True):
        assert client.span.parent_span_id == server.span.span_id
        assert client.span.status.code == Status.STATUS_CODE_ERROR
        assert client.attrs["http.response.status_code"] == 503
        assert client.attrs["error.type"]
        # A fresh trace (the client sent none); each attempt carried its own span id.
        assert exchange.headers["traceparent"].split("-")[2] == client.span.span_id.hex()
    assert server.span.status.code == Status.STATUS_CODE_ERROR
    assert server.attrs["sluice.outcome"] == "upstream_error"
    assert server.attrs["http.response.status_code"] == 502
    assert server.attrs["sluice.retries"] == 1
    assert server.attrs["error.type"]
    assert server.span.events == []  # no first token
    assert b"overloaded" not in b"".join(receiver.raw)  # upstream messages stay out


async def test_capture_content_records_prompt_and_answer(http: aiohttp.ClientSession) -> None:
    fake = FakeUpstream(json_script(openai_completion("the answer")))
    async with OtlpReceiver() as receiver, fake:
        async with run_gateway(_config(fake, receiver, capture_content=True)) as gw:
            body = _body(False)
            async with http.post(gw.v1 + CHAT, json=body, headers=_headers()) as resp:
                assert resp.status == 200
        spans = await receiver.wait_spans(2)
    [server] = _by_kind(spans, Span.SPAN_KIND_SERVER)
    assert PROMPT in str(server.attrs["gen_ai.input.messages"])
    assert "the answer" in str(server.attrs["gen_ai.output.messages"])
    assert KEY.encode() not in b"".join(receiver.raw)


async def test_unsampled_requests_export_nothing(http: aiohttp.ClientSession) -> None:
    fake = FakeUpstream(json_script(openai_completion("ok")))
    async with OtlpReceiver() as receiver, fake:
        async with run_gateway(_config(fake, receiver, sample_ratio=0.0)) as gw:
            async with http.post(gw.v1 + CHAT, json=_body(False), headers=_headers()) as resp:
                assert resp.status == 200
            # The client's sampled flag wins over the ratio (parent-based sampling).
            headers = _headers(traceparent=TRACEPARENT)
            async with http.post(gw.v1 + CHAT, json=_body(False), headers=headers) as resp:
                assert resp.status == 200
        spans = await receiver.wait_spans(2)
    assert {s.span.trace_id.hex() for s in spans} == {TRACE_ID}
    flags = fake.exchanges[0].headers["traceparent"].split("-")[3]
    assert int(flags, 16) & 1 == 0  # propagated upstream as not sampled


async def test_tracing_off_forwards_the_clients_trace_headers(http: aiohttp.ClientSession) -> None:
    fake = FakeUpstream(json_script(openai_completion("ok")))
    async with fake, run_gateway(config_for(fake)) as gw:
        assert gw.state.tracing is None
        assert gw.state.proxy is not None
        assert gw.state.proxy.tracing is None
        headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"}
        async with http.post(gw.v1 + CHAT, json=chat_body(stream=False), headers=headers):
            pass
    assert fake.exchanges[0].headers["traceparent"] == TRACEPARENT
    assert fake.exchanges[0].headers["tracestate"] == "vendor=abc"


def test_tracing_off_never_imports_opentelemetry() -> None:
    code = (
        "import sys\n"
        "from gateway.app import build_app, build_state\n"
        "from gateway.config import load_config\n"
        "build_app(build_state(load_config(None)))\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()


async def test_otel_environment_variables_switch_tracing_on(
    http: aiohttp.ClientSession, tmp_path: Any
) -> None:
    fake = FakeUpstream(Script(openai_stream(["a", "b"], usage=USAGE)))
    async with OtlpReceiver() as receiver, fake:
        config = config_for(fake, api_key=UPSTREAM_KEY, include_usage=True)
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "sluice-under-test",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "50",  # milliseconds: spans leave while it runs
        }
        async with gateway_process(config, tmp_path, env=env) as gw:
            headers = {"traceparent": TRACEPARENT}
            async with http.post(gw.v1 + CHAT, json=_body(True), headers=headers) as resp:
                assert resp.status == 200
                await resp.read()
            spans = await receiver.wait_spans(2)
    assert {s.resource["service.name"] for s in spans} == {"sluice-under-test"}
    [server] = _by_kind(spans, Span.SPAN_KIND_SERVER)
    [client] = _by_kind(spans, Span.SPAN_KIND_CLIENT)
    assert server.span.trace_id.hex() == TRACE_ID
    assert client.span.parent_span_id == server.span.span_id
    assert fake.exchanges[0].headers["traceparent"].split("-")[2] == client.span.span_id.hex()
    assert server.attrs["gen_ai.usage.output_tokens"] == 3
    assert receiver.content_types[0] == "application/x-protobuf"
    exported = b"".join(receiver.raw)
    assert UPSTREAM_KEY.encode() not in exported
    assert PROMPT.encode() not in exported
