"""What the upstream receives: credentials, headers, path and body."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from gateway.testing.fake_upstream import FakeUpstream, json_script, openai_completion
from gateway.testing.harness import run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
    COMPLETIONS,
    RawClient,
    chat_body,
    completion_body,
    config_for,
    split_events,
)


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


@pytest.mark.parametrize("stream", [True, False])
async def test_client_authorization_is_replaced_by_the_configured_key(
    fake: FakeUpstream, http: aiohttp.ClientSession, stream: bool
) -> None:
    if not stream:
        fake.queue(json_script(openai_completion("ok")))
    config = config_for(fake, api_key="sk-upstream-0123456789")
    async with (
        run_gateway(config) as gw,
        asyncio.timeout(BOUND),
        http.post(
            gw.v1 + CHAT,
            json=chat_body(stream=stream),
            headers={
                "Authorization": "Bearer client-secret-token",
                "X-Api-Key": "client-api-key",
                "Cookie": "session=abc",
            },
        ) as resp,
    ):
        await resp.read()
    assert resp.status == 200
    (exchange,) = fake.exchanges
    seen = _lower(exchange.headers)
    assert seen["authorization"] == "Bearer sk-upstream-0123456789"
    assert "client-secret-token" not in str(exchange.headers)
    assert "x-api-key" not in seen
    assert "cookie" not in seen


async def test_no_authorization_upstream_without_a_configured_key(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with (
        run_gateway(config_for(fake)) as gw,
        asyncio.timeout(BOUND),
        http.post(
            gw.v1 + CHAT, json=chat_body(), headers={"Authorization": "Bearer client-secret"}
        ) as resp,
    ):
        await resp.read()
    (exchange,) = fake.exchanges
    assert "authorization" not in _lower(exchange.headers)


async def test_configured_upstream_headers_are_sent(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config = config_for(fake, headers={"X-Org": "team-a", "OpenAI-Project": "proj_1"})
    async with (
        run_gateway(config) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body(), headers={"X-Org": "client-org"}) as resp,
    ):
        await resp.read()
    (exchange,) = fake.exchanges
    seen = _lower(exchange.headers)
    assert seen["x-org"] == "team-a"
    assert seen["openai-project"] == "proj_1"


async def test_hop_by_hop_headers_are_not_forwarded(fake: FakeUpstream) -> None:
    """Sent byte-exact over a raw socket so no client library rewrites them."""
    hop = [
        ("Connection", "keep-alive, X-Hop-Listed"),
        ("X-Hop-Listed", "must-not-pass"),
        ("Keep-Alive", "timeout=5, max=100"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Trace-Id", "end-to-end-1"),
        ("OpenAI-Organization", "org-kept"),
    ]
    async with run_gateway(config_for(fake)) as gw:
        client = await RawClient.connect(gw.url)
        try:
            async with asyncio.timeout(BOUND):
                await client.post_json("/v1" + CHAT, chat_body(), hop)
                head = await client.read_head()
                body = await client.read_body(head)
        finally:
            await client.close()
    assert head.status == 200
    assert split_events(body)[-1] == b"data: [DONE]\n\n"
    (exchange,) = fake.exchanges
    seen = _lower(exchange.headers)
    for name in (
        "x-hop-listed",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    ):
        assert name not in seen, f"{name} was forwarded upstream"
    assert "x-hop-listed" not in seen.get("connection", "").lower()
    assert "must-not-pass" not in str(exchange.headers)
    assert seen["x-trace-id"] == "end-to-end-1"
    assert seen["openai-organization"] == "org-kept"


PASSTHROUGH: dict[str, Any] = {
    "temperature": 0.3,
    "top_p": 0.9,
    "n": 2,
    "seed": 42,
    "max_tokens": 17,
    "stop": ["\n\n", "END"],
    "presence_penalty": -0.5,
    "logit_bias": {"50256": -100},
    "user": "user-\u00e9\u65e5",
    "stream_options": {"include_usage": True},
    "response_format": {"type": "json_object"},
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ],
    "tool_choice": "auto",
    # vLLM extras the gateway knows nothing about.
    "min_p": 0.05,
    "top_k": 40,
    "repetition_penalty": 1.1,
    "guided_json": {"type": "object"},
    "skip_special_tokens": False,
    "chat_template_kwargs": {"enable_thinking": False},
}


@pytest.mark.parametrize("stream", [True, False])
async def test_body_passes_through_with_the_upstream_model(
    fake: FakeUpstream, http: aiohttp.ClientSession, stream: bool
) -> None:
    if not stream:
        fake.queue(json_script(openai_completion("ok")))
    sent = chat_body(stream=stream, **PASSTHROUGH)
    sent["messages"] = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "caf\u00e9 \U0001f600"}]},
    ]
    async with (
        run_gateway(config_for(fake)) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=sent) as resp,
    ):
        await resp.read()
    assert resp.status == 200
    (exchange,) = fake.exchanges
    assert exchange.path == "/v1/chat/completions"
    assert exchange.body == {**sent, "model": "gpt-test"}
    assert _lower(exchange.headers)["content-type"].startswith("application/json")


async def test_model_is_kept_when_the_route_has_no_upstream_model(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config = config_for(fake)
    config["routes"] = [{"model": "llama-3-8b", "upstream": "fake"}]
    async with (
        run_gateway(config) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + COMPLETIONS, json=completion_body(model="llama-3-8b", echo=True)) as resp,
    ):
        await resp.read()
    (exchange,) = fake.exchanges
    assert exchange.path == "/v1/completions"
    assert exchange.body == completion_body(model="llama-3-8b", echo=True)
