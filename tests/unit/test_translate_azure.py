"""Tests for gateway.translate.azure: config, URL and header building, Azure's stream shape."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import openai
import orjson
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionChunk
from pydantic import ValidationError

from gateway.context import Endpoint, RequestContext
from gateway.deltas import event_texts, finish_reasons
from gateway.errors import GatewayError
from gateway.sse import SSEDecoder
from gateway.translate.azure import (
    DEFAULT_API_VERSION,
    AzureUpstream,
    azure_headers,
    azure_request_body,
    azure_url,
    resolve_deployment,
    validate_deployment,
)
from gateway.upstreams.openai import OpenAIObserver

ENDPOINT = "https://my-resource.openai.azure.com"


def config(**changes: Any) -> AzureUpstream:
    return AzureUpstream.model_validate({"kind": "azure", "endpoint": ENDPOINT, **changes})


# ----- config -------------------------------------------------------------------------------


def test_config_defaults() -> None:
    cfg = config(api_key="k-123")
    assert cfg.api_version == DEFAULT_API_VERSION
    assert not cfg.use_v1_api
    assert cfg.deployment is None
    assert cfg.deployments == {}
    assert cfg.verify_tls
    assert cfg.max_connections == 256
    assert cfg.timeouts.connect == 10.0
    assert "k-123" not in repr(cfg)


@pytest.mark.parametrize(
    "changes",
    [
        {"endpoint": "my-resource.openai.azure.com"},
        {"endpoint": "https://my-resource.openai.azure.com?x=1"},
        {"endpoint": "https://my resource.openai.azure.com"},
        {"endpoint": "ftp://my-resource.openai.azure.com"},
        {"api_version": "latest"},
        {"api_version": "2024-10-21&x=1"},
        {"deployment": "a/b"},
        {"deployment": ".."},
        {"deployments": {"gpt-4o": "prod?x"}},
        {"max_connections": 0},
        {"api_base": ENDPOINT},
    ],
)
def test_config_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        config(**changes)


def test_config_error_names_the_bad_deployment() -> None:
    with pytest.raises(ValidationError, match=r"deployments\.gpt-4o: invalid Azure deployment"):
        config(deployments={"gpt-4o": "."})


# ----- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "tail"),
    [
        ("/chat/completions", "/chat/completions"),
        ("/completions", "/completions"),
        ("/embeddings", "/embeddings"),
        (Endpoint.CHAT, "/chat/completions"),
        (Endpoint.COMPLETIONS, "/completions"),
        (Endpoint.EMBEDDINGS, "/embeddings"),
    ],
)
def test_deployment_urls(path: str, tail: str) -> None:
    assert azure_url(config(), path, "gpt-4o") == (
        f"{ENDPOINT}/openai/deployments/gpt-4o{tail}?api-version={DEFAULT_API_VERSION}"
    )


def test_url_variants() -> None:
    prefixed = config(
        endpoint="https://apim.azure-api.net/team-a/", api_version="2025-04-01-preview"
    )
    assert azure_url(prefixed, "/chat/completions", "d") == (
        "https://apim.azure-api.net/team-a/openai/deployments/d/chat/completions"
        "?api-version=2025-04-01-preview"
    )
    v1 = config(use_v1_api=True)
    assert azure_url(v1, "/chat/completions", "gpt-4o") == f"{ENDPOINT}/openai/v1/chat/completions"
    assert azure_url(v1, "/embeddings", "emb") == f"{ENDPOINT}/openai/v1/embeddings"


def test_unknown_endpoint_path_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        azure_url(config(), "/files", "d")


VALID = ["gpt-4o", "gpt-4o-mini.2024_07", "a", "A" * 64, "..a", "v1.0", "_x-"]
INVALID = [
    "",
    ".",
    "..",
    "...",
    "a/b",
    "../chat",
    "../../openai/v1/files",
    "a?api-version=2020-01-01",
    "a#frag",
    "a%2Fb",
    "a%2e%2e",
    "a b",
    "a\nb",
    "a\n",
    "a\\b",
    "a;b",
    "a:b",
    "a@b",
    "d\u00e9ploiement",
    "\uff0e\uff0e",  # full-width dots
    "x" * 65,
]


@pytest.mark.parametrize("name", VALID)
def test_valid_deployment_names_are_one_path_segment(name: str) -> None:
    url = urlsplit(azure_url(config(), "/chat/completions", name))
    assert url.scheme == "https"
    assert url.netloc == "my-resource.openai.azure.com"
    assert url.path == f"/openai/deployments/{name}/chat/completions"
    assert parse_qs(url.query, strict_parsing=True) == {"api-version": [DEFAULT_API_VERSION]}
    assert url.fragment == ""


@pytest.mark.parametrize("name", INVALID)
@pytest.mark.parametrize("use_v1_api", [False, True])
def test_path_injection_is_refused(name: str, use_v1_api: bool) -> None:
    with pytest.raises(GatewayError) as info:
        azure_url(config(use_v1_api=use_v1_api), "/chat/completions", name)
    err = info.value
    assert err.status == 400
    assert err.type == "invalid_request_error"
    assert err.code == "invalid_deployment"
    assert err.param == "model"
    assert "\n" not in err.message


@pytest.mark.parametrize("name", INVALID)
def test_validate_and_body_refuse_the_same_names(name: str) -> None:
    with pytest.raises(GatewayError):
        validate_deployment(name)
    with pytest.raises(GatewayError):
        azure_request_body({"model": "x"}, name)


def test_resolve_deployment() -> None:
    cfg = config(deployments={"gpt-4o": "prod-4o"}, deployment="shared")
    assert resolve_deployment(cfg, "gpt-4o") == "prod-4o"
    assert resolve_deployment(cfg, "other") == "shared"
    assert resolve_deployment(config(), "gpt-4o-mini") == "gpt-4o-mini"
    with pytest.raises(GatewayError) as info:
        resolve_deployment(config(), "meta/llama-3")  # a route model that is no deployment name
    assert info.value.status == 400


def test_request_body_names_the_deployment() -> None:
    body = {"model": "client-name", "messages": [], "stream": True}
    assert azure_request_body(body, "prod-4o") == {**body, "model": "prod-4o"}
    assert body["model"] == "client-name"  # not mutated


# ----- headers ------------------------------------------------------------------------------


def test_headers_use_api_key_not_authorization() -> None:
    assert azure_headers(config(api_key="secret-key")) == {"api-key": "secret-key"}
    assert azure_headers(config()) == {}
    assert azure_headers(config(api_key="")) == {}
    merged = azure_headers(config(api_key="k", headers={"x-ms-client": "sluice"}))
    assert merged == {"x-ms-client": "sluice", "api-key": "k"}
    assert all(name.lower() != "authorization" for name in merged)
    entra = azure_headers(config(headers={"Authorization": "Bearer eyJ0"}))
    assert entra == {"Authorization": "Bearer eyJ0"}  # Entra ID: operator-set, used as is


# ----- Azure's stream shape against the official SDK -----------------------------------------

_FILTERS = {
    "hate": {"filtered": False, "severity": "safe"},
    "self_harm": {"filtered": False, "severity": "safe"},
    "sexual": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": False, "severity": "safe"},
}
_ENV = {
    "created": 1727000000,
    "id": "chatcmpl-AzUre1",
    "model": "gpt-4o-2024-08-06",
    "object": "chat.completion.chunk",
    "system_fingerprint": "fp_5050236cbd",
}
TOKENS = ["Hel", "lo", " w\u00f6rld"]


def _choice(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "content_filter_results": extra.pop("filters", _FILTERS),
        "delta": delta,
        "finish_reason": finish,
        "index": 0,
        "logprobs": None,
        **extra,
    }


def azure_stream(include_usage: bool) -> bytes:
    """Azure's chat stream, as its wire shows it (keys sorted, empty-choices first chunk)."""
    usage_field: dict[str, Any] = {"usage": None} if include_usage else {}
    chunks: list[dict[str, Any]] = [
        {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": [
                {
                    "prompt_index": 0,
                    "content_filter_results": {
                        **_FILTERS,
                        "jailbreak": {"filtered": False, "detected": False},
                    },
                }
            ],
        },
        {
            **_ENV,
            "choices": [_choice({"content": "", "refusal": None, "role": "assistant"}, filters={})],
            **usage_field,
        },
        *({**_ENV, "choices": [_choice({"content": t})], **usage_field} for t in TOKENS),
        {**_ENV, "choices": [_choice({}, "stop", filters={})], **usage_field},
        {  # asynchronous filter: a trailing verdict after the finish chunk
            **_ENV,
            "choices": [
                _choice(
                    {},
                    content_filter_offsets={"check_offset": 0, "start_offset": 0, "end_offset": 12},
                )
            ],
            **usage_field,
        },
    ]
    if include_usage:
        usage = {"completion_tokens": 3, "prompt_tokens": 9, "total_tokens": 12}
        chunks.append({**_ENV, "choices": [], "usage": usage})
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


@dataclass
class FakeAzure:
    """Answers any POST with Azure's stream; records what it was asked."""

    base: str = ""
    requests: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((request.path_qs, dict(request.headers), body))
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        data = azure_stream(include_usage)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(0, len(data), 61):
            await response.write(data[i : i + 61])
        await response.write_eof()
        return response


@pytest.fixture
async def azure() -> AsyncIterator[FakeAzure]:
    fake = FakeAzure()
    app = web.Application()
    app.router.add_post("/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield fake
    finally:
        await runner.cleanup()


MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello"}
]


async def _with_client(client: openai.AsyncOpenAI, use: Callable[[openai.AsyncOpenAI], Any]) -> Any:
    try:
        return await use(client)
    finally:
        await client.close()


async def test_sdk_parses_azure_chunks_including_the_empty_choices_one(azure: FakeAzure) -> None:
    # What a client of Sluice sees: Azure's events passed through verbatim, read by the
    # plain OpenAI SDK.
    client = openai.AsyncOpenAI(base_url=azure.base + "/v1", api_key="x", max_retries=0)

    async def run(sdk: openai.AsyncOpenAI) -> list[ChatCompletionChunk]:
        stream = await sdk.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        return [chunk async for chunk in stream]

    chunks: list[ChatCompletionChunk] = await _with_client(client, run)
    first = chunks[0]
    assert first.choices == []
    assert first.model_extra is not None
    assert first.model_extra["prompt_filter_results"][0]["prompt_index"] == 0
    texts = [c.delta.content for ch in chunks for c in ch.choices if c.delta.content]
    assert texts == TOKENS
    finishes = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 12


async def test_sdk_stream_helper_accumulates_azure_chunks(azure: FakeAzure) -> None:
    client = openai.AsyncOpenAI(base_url=azure.base + "/v1", api_key="x", max_retries=0)

    async def run(sdk: openai.AsyncOpenAI) -> Any:
        async with sdk.chat.completions.stream(model="gpt-4o", messages=MESSAGES) as stream:
            return await stream.get_final_completion()

    completion = await _with_client(client, run)
    assert completion.choices[0].message.content == "".join(TOKENS)
    assert completion.choices[0].finish_reason == "stop"


def test_azure_chunks_through_the_proxy_observer_and_deltas() -> None:
    ctx = RequestContext("r", Endpoint.CHAT)
    observer = OpenAIObserver()
    texts: list[str] = []
    finishes: list[str] = []
    events = SSEDecoder().feed(azure_stream(include_usage=True))
    for event in events:
        assert observer.observe(ctx, event) is None
        if observer.done:
            break
        texts += event_texts(ctx, event).values()
        finishes += finish_reasons(ctx, event).values()
    assert observer.done
    assert texts == TOKENS
    assert finishes == ["stop"]
    observer.finish(ctx)  # usage is read once, at the end of the stream
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (9, 3)
    # The leading chunk's `"object": ""` fails strict validation of the SDK's type; the SDK
    # never validates stream chunks (it builds them with construct), so clients are fine.
    with pytest.raises(ValidationError, match=r"chat\.completion\.chunk"):
        ChatCompletionChunk.model_validate(events[0].json())
    for event in events[1:-1]:
        ChatCompletionChunk.model_validate(event.json())


async def test_urls_match_the_official_azure_client(azure: FakeAzure) -> None:
    cfg = config(endpoint=azure.base, api_key="azure-key", api_version="2024-10-21")
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=azure.base, api_version=cfg.api_version, api_key="azure-key", max_retries=0
    )

    async def run(sdk: openai.AsyncOpenAI) -> None:
        stream = await sdk.chat.completions.create(model="prod-4o", messages=MESSAGES, stream=True)
        async for _ in stream:
            pass

    await _with_client(client, run)
    ((path_qs, headers, body),) = azure.requests
    expected = urlsplit(azure_url(cfg, "/chat/completions", "prod-4o"))
    assert path_qs == f"{expected.path}?{expected.query}"
    for name, value in azure_headers(cfg).items():
        assert headers[name] == value
    assert "Authorization" not in headers
    assert body["model"] == "prod-4o"


async def test_v1_urls_match_the_sdk_on_the_v1_surface(azure: FakeAzure) -> None:
    cfg = config(endpoint=azure.base, use_v1_api=True)
    client = openai.AsyncOpenAI(base_url=f"{azure.base}/openai/v1", api_key="x", max_retries=0)

    async def run(sdk: openai.AsyncOpenAI) -> None:
        stream = await sdk.chat.completions.create(model="prod-4o", messages=MESSAGES, stream=True)
        async for _ in stream:
            pass

    await _with_client(client, run)
    ((path_qs, _, body),) = azure.requests
    assert path_qs == urlsplit(azure_url(cfg, "/chat/completions", "prod-4o")).path
    assert azure_request_body({"model": "client"}, "prod-4o")["model"] == body["model"]
