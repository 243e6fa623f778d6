"""The native Anthropic lane: an Anthropic client on an Anthropic upstream, over loopback.

Request bodies and headers reach the upstream as the client sent them (model replaced,
the gateway's key instead of the client's); the upstream's events reach the client as
their original bytes unless a plugin edited them. Transcripts in tests/golden/anthropic
are Anthropic's exact framing, with thinking and signatures, redacted thinking, server
tools, citations, tool use, cache usage, stop sequences and pings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from gateway.context import Outcome
from gateway.testing.fake_upstream import FakeUpstream, Script, json_script, rechunk
from gateway.testing.harness import run_gateway
from plugins.content_filter import ContentFilter
from plugins.latency import LatencyMeter
from plugins.token_count import TOKENS, TokenCounter
from tests.integration._support import BOUND, make_probe
from tests.integration.provider_fakes import (
    anthropic_error_body,
    anthropic_error_event,
    anthropic_message_end,
    anthropic_message_start,
    anthropic_text_block,
    cut_at,
    inside,
    named_events,
    root_url,
)

GOLDEN = Path(__file__).parent.parent / "golden" / "anthropic"
FULL = (GOLDEN / "thinking_tools_citations.sse").read_bytes()
STOP_SEQUENCE = (GOLDEN / "stop_sequence.sse").read_bytes()
KEY = "sk-ant-api03-gateway-key-0123456789abcdef"
MESSAGES = "/v1/messages"
SIGNATURE = (
    "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds+ldDcG1JH8fPEgkA5ES5KZk4SLWjjA1D5x0Z"
    "FbKp2kH9JLSHPLkkDX2GqQE4QcaBQ=="
)
REGISTRY: dict[str, type[Any]] = {
    "token_count": TokenCounter,
    "content_filter": ContentFilter,
    "latency": LatencyMeter,
}


def _config(
    fake: FakeUpstream, plugins: Sequence[dict[str, Any]] = (), **extra: Any
) -> dict[str, Any]:
    return {
        "upstreams": {
            "claude": {"kind": "anthropic", "base_url": root_url(fake), "api_key": KEY},
            **extra.pop("upstreams", {}),
        },
        "routes": extra.pop(
            "routes",
            [{"model": "m", "upstream": "claude", "upstream_model": "claude-up", "retries": 0}],
        ),
        "plugins": list(plugins),
        **extra,
    }


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "max_tokens": 1024,
        "stream": True,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        **extra,
    }


def _counted(tmp_path: Path) -> list[dict[str, Any]]:
    """token_count with the character heuristic (no tokenizer files needed)."""
    return [
        {"name": "token_count", "options": {"cache_dir": str(tmp_path), "default_encoding": None}}
    ]


def _headers(headers: dict[str, str], name: str) -> list[str]:
    return [value for key, value in headers.items() if key.lower() == name]


async def _post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str
) -> tuple[int, bytes]:
    async with asyncio.timeout(BOUND), http.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.read()


# ----- byte identity ---------------------------------------------------------------------------

SPLITS: dict[str, Any] = {
    "whole": lambda data: [data],
    "every-7-bytes": lambda data: rechunk(data, [7] * (len(data) // 7 + 1)),
    "awkward": lambda data: cut_at(data, *_awkward(data)),
}


def _awkward(data: bytes) -> list[int]:
    """Offsets inside a UTF-8 sequence, inside JSON, between an event's two LFs, in a name."""
    cuts = {data.index(b"\n\n") + 1, inside(data, "event: ping", 3), inside(data, '"text', 3)}
    for needle in ("é", "☀", "signature_delta"):
        if needle.encode() in data:
            cuts.add(inside(data, needle, 1))
    return sorted(cuts)


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("plugins", ["none", "observers"])
@pytest.mark.parametrize(
    "transcript", [FULL, STOP_SEQUENCE], ids=["thinking-tools-citations", "stop-sequence"]
)
async def test_recorded_transcripts_reach_the_client_byte_for_byte(
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    transcript: bytes,
    plugins: str,
    split: str,
) -> None:
    """No plugin edits these streams (the observing plugins only read them): every event
    leaves as the upstream's bytes, whatever the chunking."""
    fake.queue(Script(SPLITS[split](transcript)))
    chain = [*_counted(tmp_path), {"name": "latency"}]
    config = _config(fake, chain if plugins == "observers" else [])
    async with run_gateway(config, registry=REGISTRY) as gw:
        status, raw = await _post(http, gw.url + MESSAGES, _body())
    assert status == 200
    assert raw == transcript


@pytest.mark.parametrize("split", list(SPLITS))
async def test_content_filter_finding_nothing_changes_no_event_but_held_text(
    fake: FakeUpstream, http: aiohttp.ClientSession, split: str
) -> None:
    """The filter holds back text that may start a match; a non-text event after it (a
    citation, a ping) releases it, possibly cut differently. Everything else is byte-exact."""
    fake.queue(Script(SPLITS[split](FULL)))
    async with run_gateway(_config(fake, [{"name": "content_filter"}]), registry=REGISTRY) as gw:
        status, raw = await _post(http, gw.url + MESSAGES, _body())
    assert status == 200
    got, sent = _split(raw), _split(FULL)
    assert [e for e in got if b'"text_delta"' not in e] == [
        e for e in sent if b'"text_delta"' not in e
    ]
    assert _block_texts(raw) == _block_texts(FULL)


def _split(raw: bytes) -> list[bytes]:
    return [block + b"\n\n" for block in raw.split(b"\n\n")[:-1]]


def _block_texts(raw: bytes) -> dict[int, str]:
    texts: dict[int, str] = {}
    for name, data in named_events(raw):
        if name == "content_block_delta" and data["delta"]["type"] == "text_delta":
            texts[data["index"]] = texts.get(data["index"], "") + data["delta"]["text"]
    return texts


async def test_usage_comes_from_message_start_and_message_delta(
    fake: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    probe, log = make_probe()
    fake.queue(Script([FULL]))
    config = _config(fake, [*_counted(tmp_path), {"name": "probe"}])
    async with run_gateway(config, registry={**REGISTRY, "probe": probe}) as gw:
        status, _ = await _post(http, gw.url + MESSAGES, _body())
        (ctx,) = await log.wait_ends(1)
    assert status == 200
    assert ctx.outcome is Outcome.COMPLETED
    assert ctx.usage.source == "upstream"
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (472 + 1024 + 2048, 189)
    assert ctx.response_model == "claude-sonnet-4-5-20250929"
    # The local count read thinking, tool input and text (diffs are local minus upstream).
    tokens = ctx.require(TOKENS)
    assert tokens.completion_tokens > 30
    assert tokens.diff_completion == tokens.completion_tokens - 189


# ----- requests --------------------------------------------------------------------------------

CLAUDE_CODE_BETAS = ",".join(
    [
        "claude-code-20250219",
        "interleaved-thinking-2025-05-14",
        "fine-grained-tool-streaming-2025-05-14",
        "context-management-2025-06-27",
        "prompt-caching-scope-2026-01-05",
        "effort-2025-11-24",
        "oauth-2025-04-20",
    ]
)


def _claude_code_body() -> dict[str, Any]:
    """Shaped like Claude Code 2.1's first request (what made the old path answer 400)."""
    cached = {"type": "ephemeral"}
    return {
        "model": "m",
        "max_tokens": 32000,
        "stream": True,
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": cached},
            {"type": "text", "text": "Be concise.", "cache_control": {**cached, "ttl": "1h"}},
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "say hi"}]},
            {"role": "system", "content": "<system-reminder>cwd: /tmp</system-reminder>"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "please", "cache_control": cached}],
            },
        ],
        "tools": [
            {
                "name": "Bash",
                "description": "Run a command.",
                "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}},
                "cache_control": cached,
            },
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        ],
        "metadata": {"user_id": "user_abc_account_def_session_0123"},
        "temperature": 1,
        "a_field_from_next_year": {"nested": [1, 2, {"x": None}]},
    }


async def test_request_body_and_anthropic_headers_pass_through(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script([STOP_SEQUENCE]))
    body = _claude_code_body()
    headers = {
        "anthropic-version": "2023-06-01-client",
        "anthropic-beta": CLAUDE_CODE_BETAS,
        "x-api-key": "sk-ant-client-key-that-must-not-travel",
        "anthropic-dangerous-direct-browser-access": "true",
    }
    async with run_gateway(_config(fake)) as gw:
        status, raw = await _post(http, gw.url + MESSAGES, body, **headers)
    assert status == 200, raw
    assert raw == STOP_SEQUENCE
    (exchange,) = fake.exchanges
    assert exchange.path == "/v1/messages"
    assert exchange.body == {**body, "model": "claude-up"}
    assert list(exchange.body) == list(body)  # key order kept too
    sent = exchange.headers
    assert _headers(sent, "anthropic-version") == ["2023-06-01-client"]  # the client's wins
    assert _headers(sent, "anthropic-beta") == [CLAUDE_CODE_BETAS]
    assert _headers(sent, "x-api-key") == [KEY]  # the gateway's key replaces the client's
    assert _headers(sent, "anthropic-dangerous-direct-browser-access") == ["true"]


async def test_without_a_client_version_the_configured_one_goes(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script([STOP_SEQUENCE]))
    config = _config(fake)
    config["upstreams"]["claude"]["anthropic_version"] = "2024-10-22"
    async with run_gateway(config) as gw:
        status, _ = await _post(http, gw.url + MESSAGES, _body())
    assert status == 200
    assert _headers(fake.exchanges[0].headers, "anthropic-version") == ["2024-10-22"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 5, "messages": []}, "model"),
        ({"model": "m", "stream": "yes", "messages": []}, "stream"),
        ({"model": "m", "messages": {"role": "user"}}, "messages"),
    ],
)
async def test_the_gateway_checks_only_what_it_needs(
    fake: FakeUpstream, http: aiohttp.ClientSession, body: dict[str, Any], param: str
) -> None:
    async with run_gateway(_config(fake)) as gw:
        status, raw = await _post(http, gw.url + MESSAGES, body)
    assert status == 400
    error = orjson.loads(raw)
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert f"`{param}`" in error["error"]["message"]
    assert fake.exchanges == []


async def test_what_only_the_upstream_judges_reaches_it(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """No max_tokens, an empty message list: the upstream's call (it answers 400 here)."""
    upstream_error = anthropic_error_body("invalid_request_error", "max_tokens: Field required")
    fake.queue(json_script(upstream_error, status=400))
    async with run_gateway(_config(fake)) as gw:
        status, raw = await _post(http, gw.url + MESSAGES, {"model": "m", "messages": []})
    assert len(fake.exchanges) == 1
    assert status == 400
    error = orjson.loads(raw)
    assert error["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required",
    }
    assert error["request_id"]


async def test_non_streaming_message_passes_through(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    message = {
        "id": "msg_01Unary",
        "type": "message",
        "role": "assistant",
        "model": "claude-up-20250929",
        "content": [
            {"type": "thinking", "thinking": "Count.", "signature": SIGNATURE},
            {"type": "redacted_thinking", "data": "EmwKAhgB"},
            {"type": "text", "text": "Un, deux, trois", "citations": None},
        ],
        "stop_reason": "stop_sequence",
        "stop_sequence": "quatre",
        "usage": {
            "input_tokens": 31,
            "cache_creation_input_tokens": 7,
            "cache_read_input_tokens": 2048,
            "output_tokens": 6,
            "service_tier": "standard",
        },
    }
    fake.queue(json_script(message))
    probe, log = make_probe()
    async with run_gateway(_config(fake, [{"name": "probe"}]), registry={"probe": probe}) as gw:
        status, raw = await _post(http, gw.url + MESSAGES, _body(stream=False))
        (ctx,) = await log.wait_ends(1)
    assert status == 200
    assert orjson.loads(raw) == message
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (31 + 7 + 2048, 6)


# ----- the official SDK ------------------------------------------------------------------------


def _thinking_then_tool() -> bytes:
    """Thinking (signed), then a tool call: the turn the client must echo back."""
    start = anthropic_message_start(msg_id="msg_01Think", input_tokens=50, cache_write=40)
    events = [start]
    events.append(
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"thinking","thinking":"","signature":""}}\n\n'
    )
    for thought in ("I need the ", "forecast tool."):
        events.append(
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"thinking_delta","thinking":"' + thought.encode() + b'"}}\n\n'
        )
    events.append(
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"signature_delta","signature":"' + SIGNATURE.encode() + b'"}}\n\n'
    )
    events.append(b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n')
    events.append(
        b'event: content_block_start\ndata: {"type":"content_block_start","index":1,'
        b'"content_block":{"type":"tool_use","id":"toolu_01A","name":"get_forecast",'
        b'"input":{}}}\n\n'
    )
    for piece in (b"", b'{\\"city\\": ', b'\\"Paris\\"}'):
        events.append(
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
            b'"delta":{"type":"input_json_delta","partial_json":"' + piece + b'"}}\n\n'
        )
    events.append(b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n')
    events += anthropic_message_end("tool_use", 33)
    return b"".join(events)


async def test_sdk_extended_thinking_and_a_tool_turn_that_echoes_the_signed_block(
    fake: FakeUpstream,
) -> None:
    answer = [
        anthropic_message_start(msg_id="msg_02", cache_read=40),
        *anthropic_text_block(0, ["Sunny all week."]),
        *anthropic_message_end("end_turn", 5),
    ]
    fake.queue(Script(rechunk(_thinking_then_tool(), [13] * 200)), Script(answer))
    cached: Any = {"type": "ephemeral"}
    system: Any = [{"type": "text", "text": "You forecast.", "cache_control": cached}]
    first: Any = {
        "role": "user",
        "content": [{"type": "text", "text": "Paris, 3 days?", "cache_control": cached}],
    }
    thinking: Any = {"type": "enabled", "budget_tokens": 2048}
    tools: Any = [
        {
            "name": "get_forecast",
            "description": "Forecast.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    async with run_gateway(_config(fake)) as gw:
        client = anthropic.AsyncAnthropic(base_url=gw.url, api_key="client", max_retries=0)
        try:
            async with client.messages.stream(
                model="m",
                max_tokens=4096,
                system=system,
                messages=[first],
                thinking=thinking,
                tools=tools,
            ) as stream:
                turn = await stream.get_final_message()
            tool_use = turn.content[1]
            assert tool_use.type == "tool_use"
            result: Any = {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}
                ],
            }
            assistant: Any = {"role": "assistant", "content": turn.content}
            async with client.messages.stream(
                model="m",
                max_tokens=4096,
                system=system,
                messages=[first, assistant, result],
                thinking=thinking,
                tools=tools,
            ) as stream:
                final = await stream.get_final_message()
        finally:
            await client.close()

    thought = turn.content[0]
    assert thought.type == "thinking"
    assert (thought.thinking, thought.signature) == ("I need the forecast tool.", SIGNATURE)
    assert tool_use.input == {"city": "Paris"}
    assert turn.stop_reason == "tool_use"
    assert turn.usage.cache_creation_input_tokens == 40
    assert final.content[0].type == "text"
    assert final.usage.cache_read_input_tokens == 40
    one, two = fake.exchanges
    assert one.body["thinking"] == thinking
    assert one.body["system"] == system
    assert one.body["messages"][0]["content"][0]["cache_control"] == cached
    # The upstream got the signed thinking block back exactly as it had sent it.
    echoed = two.body["messages"][1]["content"][0]
    assert echoed == {
        "type": "thinking",
        "thinking": "I need the forecast tool.",
        "signature": SIGNATURE,
    }
    assert two.body["messages"][1]["content"][1]["id"] == "toolu_01A"


# ----- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "client_status", "client_kind"),
    [
        (400, "invalid_request_error", 400, "invalid_request_error"),
        (404, "not_found_error", 404, "not_found_error"),
        (429, "rate_limit_error", 429, "rate_limit_error"),
        (529, "overloaded_error", 502, "overloaded_error"),
        (401, "authentication_error", 502, "api_error"),
    ],
)
async def test_upstream_errors_before_headers_in_anthropics_shape(
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    status: int,
    kind: str,
    client_status: int,
    client_kind: str,
) -> None:
    fake.queue(json_script(anthropic_error_body(kind, f"upstream says {kind}"), status=status))
    async with run_gateway(_config(fake)) as gw:
        got, raw = await _post(http, gw.url + MESSAGES, _body())
    assert got == client_status
    error = orjson.loads(raw)
    assert error["type"] == "error"
    assert error["error"]["type"] == client_kind
    if client_status < 500:
        assert error["error"]["message"] == f"upstream says {kind}"
    assert KEY not in raw.decode()


@pytest.mark.parametrize("tail", ["error-event", "truncated"])
async def test_failure_after_headers_is_one_final_anthropic_error_event(
    fake: FakeUpstream, http: aiohttp.ClientSession, tail: str
) -> None:
    head = [anthropic_message_start(), *anthropic_text_block(0, ["Hel", "lo"])]
    if tail == "error-event":
        head.append(anthropic_error_event("overloaded_error", "Overloaded"))
    fake.queue(Script(head))
    async with run_gateway(_config(fake)) as gw:
        status, raw = await _post(http, gw.url + MESSAGES, _body())
    assert status == 200
    assert raw.startswith(b"".join(head[: len(anthropic_text_block(0, ["Hel", "lo"])) + 1]))
    events = named_events(raw)
    names = [name for name, _ in events]
    assert names.count("error") == 1
    assert names[-1] == "error"
    assert "message_stop" not in names
    error = events[-1][1]["error"]
    if tail == "error-event":
        assert error == {"type": "overloaded_error", "message": "Overloaded"}
    else:
        assert error["type"] == "api_error"
        assert "closed the stream" in error["message"]


async def test_sdk_raises_on_a_truncated_stream(fake: FakeUpstream) -> None:
    fake.queue(Script([anthropic_message_start(), *anthropic_text_block(0, ["Hi"])]))
    async with run_gateway(_config(fake)) as gw:
        client = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        try:
            with pytest.raises(anthropic.APIStatusError):
                async with client.messages.stream(
                    model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
                ) as stream:
                    await stream.get_final_message()
        finally:
            await client.close()


async def test_an_error_event_before_any_content_is_a_real_http_error(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script([anthropic_error_event("overloaded_error", "Overloaded")]))
    async with run_gateway(_config(fake)) as gw:
        status, raw = await _post(http, gw.url + MESSAGES, _body())
    assert status == 502
    assert orjson.loads(raw)["error"]["type"] == "overloaded_error"


async def test_client_disconnect_cancels_the_upstream_and_counts_locally(
    fake: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    head = [anthropic_message_start(input_tokens=25), *anthropic_text_block(0, ["Bonjour ", "à"])]
    fake.queue(Script(head[:-1], then="hang"))  # no block stop: the answer is still going
    probe, log = make_probe()
    config = _config(fake, [*_counted(tmp_path), {"name": "probe"}])
    async with run_gateway(config, registry={**REGISTRY, "probe": probe}) as gw:
        async with asyncio.timeout(BOUND):
            resp = await http.post(gw.url + MESSAGES, json=_body())
            await resp.content.readuntil("à".encode())
            resp.close()
            (exchange,) = await fake.wait_for_requests(1)
            await exchange.finished.wait()
        (ctx,) = await log.wait_ends(1)
    assert exchange.closed_by_peer
    assert ctx.outcome is Outcome.CLIENT_DISCONNECTED
    assert ctx.usage.source == "local_partial"
    assert ctx.usage.completion_tokens == ctx.require(TOKENS).completion_tokens > 0
    assert ctx.usage.prompt_tokens != 25


# ----- plugins on the native lane ---------------------------------------------------------------


async def test_content_filter_redacts_inside_anthropic_text_deltas(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    texts = ["Write to bob", "@example", ".com today"]
    transcript = [
        anthropic_message_start(),
        *anthropic_text_block(0, texts, ping=True),
        *anthropic_message_end("end_turn", 9),
    ]
    fake.queue(Script(transcript))
    async with run_gateway(_config(fake, [{"name": "content_filter"}]), registry=REGISTRY) as gw:
        status, raw = await _post(http, gw.url + MESSAGES, _body())
    assert status == 200
    events = named_events(raw)
    text = "".join(
        data["delta"]["text"]
        for name, data in events
        if name == "content_block_delta" and data["delta"]["type"] == "text_delta"
    )
    assert text == "Write to [REDACTED:email] today"
    assert [name for name, _ in events] == [name for name, _ in named_events(b"".join(transcript))][
        : len(events)
    ] or [name for name, _ in events][-3:] == [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert raw.startswith(transcript[0])  # message_start as it came
    assert raw.endswith(b"".join(transcript[-3:]))  # block stop, message_delta, message_stop


async def test_content_filter_stop_ends_the_anthropic_message_properly(
    fake: FakeUpstream,
) -> None:
    transcript = [
        anthropic_message_start(),
        *anthropic_text_block(
            0, ["The key is ", "sk-proj-abcdefghijklmnopqrstuvwxyz012345", " ok"]
        ),
        *anthropic_message_end("end_turn", 9),
    ]
    fake.queue(Script(transcript))
    options = {"completion_action": "stop"}
    config = _config(fake, [{"name": "content_filter", "options": options}])
    async with run_gateway(config, registry=REGISTRY) as gw:
        client = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        try:
            async with client.messages.stream(
                model="m", max_tokens=10, messages=[{"role": "user", "content": "key?"}]
            ) as stream:
                seen = [event.type async for event in stream]
                message = await stream.get_final_message()
        finally:
            await client.close()
    assert seen[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert message.stop_reason == "refusal"
    assert message.content[0].type == "text"
    assert message.content[0].text == "The key is "
    assert "sk-proj" not in message.model_dump_json()


async def test_content_filter_redacts_the_system_prompt_and_non_streaming_text(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-up",
        "content": [{"type": "text", "text": "mail eve@example.org"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 4},
    }
    fake.queue(json_script(message))
    options = {"prompt_action": "redact"}
    config = _config(fake, [{"name": "content_filter", "options": options}])
    body = _body(stream=False, system=[{"type": "text", "text": "Admin: root@example.com"}])
    async with run_gateway(config, registry=REGISTRY) as gw:
        status, raw = await _post(http, gw.url + MESSAGES, body)
    assert status == 200
    assert orjson.loads(raw)["content"][0]["text"] == "mail [REDACTED:email]"
    assert fake.exchanges[0].body["system"] == [{"type": "text", "text": "Admin: [REDACTED:email]"}]


# ----- count_tokens and models -----------------------------------------------------------------


async def test_count_tokens_goes_to_an_anthropic_upstream_as_is(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(json_script({"input_tokens": 1234}))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "system": "s"}
    async with run_gateway(_config(fake)) as gw:
        client = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        try:
            counted = await client.messages.count_tokens(
                model="m", system="s", messages=[{"role": "user", "content": "hi"}]
            )
        finally:
            await client.close()
    assert counted.input_tokens == 1234
    (exchange,) = fake.exchanges
    assert exchange.path == "/v1/messages/count_tokens"
    assert exchange.body == {**body, "model": "claude-up"}
    assert _headers(exchange.headers, "x-api-key") == [KEY]


async def test_count_tokens_is_estimated_locally_for_other_upstreams(
    fake: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    routes = [{"model": "m", "upstream": "oai", "upstream_model": "gpt-4o", "retries": 0}]
    upstreams = {"oai": {"kind": "openai", "base_url": fake.base_url}}
    body = {"model": "m", "system": "Be brief.", "messages": [{"role": "user", "content": "hi"}]}
    with_counter = _config(fake, _counted(tmp_path), routes=routes, upstreams=upstreams)
    without = _config(fake, routes=routes, upstreams=upstreams)
    async with run_gateway(with_counter, registry=REGISTRY) as gw:
        status, raw = await _post(http, gw.url + "/v1/messages/count_tokens", body)
    assert status == 200
    answer = orjson.loads(raw)
    assert answer["input_tokens"] > 0
    assert answer["x_sluice"]["estimate"] is True
    async with run_gateway(without, registry=REGISTRY) as gw:
        status, raw = await _post(http, gw.url + "/v1/messages/count_tokens", body)
    assert status == 501
    assert orjson.loads(raw)["type"] == "error"
    assert fake.exchanges == []


async def test_models_by_id(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    async with run_gateway(_config(fake)) as gw, asyncio.timeout(BOUND):
        async with http.get(gw.url + "/v1/models/m") as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "id": "m",
                "object": "model",
                "created": 0,
                "owned_by": "sluice",
            }
        async with http.get(gw.url + "/v1/models/nope") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "model_not_found"


# ----- lane choice -------------------------------------------------------------------------------


async def test_a_route_mixing_kinds_runs_translated(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """Not every deployment speaks Messages: the request runs on the chat core (translated),
    so the chain sees one format whichever deployment answers."""
    fake.queue(Script([STOP_SEQUENCE]))
    routes = [
        {
            "model": "m",
            "deployments": [
                {"upstream": "claude", "upstream_model": "claude-up"},
                {"upstream": "oai", "upstream_model": "gpt"},
            ],
            "retries": 0,
        }
    ]
    upstreams = {"oai": {"kind": "openai", "base_url": fake.base_url}}
    async with run_gateway(_config(fake, routes=routes, upstreams=upstreams)) as gw:
        status, raw = await _post(http, gw.url + MESSAGES, _body())
    assert status == 200
    assert raw != STOP_SEQUENCE  # re-encoded by the translation
    assert "max_tokens" in fake.exchanges[0].body  # translated from chat
    assert [name for name, _ in named_events(raw)][-1] == "message_stop"
