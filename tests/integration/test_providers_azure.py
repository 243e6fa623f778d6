"""Upstream kind `azure`: deployment URLs, `api-key`, and Azure's stream quirks, over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.context import Outcome
from gateway.testing.fake_upstream import Script, json_script, openai_completion, rechunk
from gateway.testing.harness import run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    chat_body,
    completion_body,
    json_error,
    make_probe,
)
from tests.integration.provider_fakes import (
    RecordingUpstream,
    azure_stream,
    openai_sdk,
    read_sdk_stream,
)

AZ_KEY = "0123456789abcdef0123456789abcdef"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]
TOKENS = ["Hel", "lo, ", "w\u00f6rld \U0001f30d"]
USAGE = {"completion_tokens": 3, "prompt_tokens": 9, "total_tokens": 12}
UNSAFE = ["../x", "a/b", "..", "x?y=1", "dep%2F..", "a b", "d#frag"]


@pytest.fixture
async def az() -> AsyncIterator[RecordingUpstream]:
    """A fake Azure resource that also records query strings."""
    upstream = RecordingUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


def _config(fake: RecordingUpstream, **azure: Any) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {"model": "m", "upstream": "az", "upstream_model": "gpt-4o"},
        {"model": "direct", "upstream": "az", "upstream_model": "team.deploy_1-x"},
        {"model_prefix": "az/", "upstream": "az"},  # the client names the deployment
        *[
            {"model": f"bad-{i}", "upstream": "az", "upstream_model": name}
            for i, name in enumerate(UNSAFE)
        ],
    ]
    return {
        "upstreams": {
            "az": {
                "kind": "azure",
                "endpoint": fake.root,
                "api_key": AZ_KEY,
                "deployments": {"gpt-4o": "prod-gpt4o"},
                **azure,
            }
        },
        # One attempt per request: these tests look at single exchanges with the fake.
        "routes": [{**route, "retries": 0} for route in routes],
        "plugins": [{"name": "probe"}],
    }


def _headers_named(headers: dict[str, str], name: str) -> list[str]:
    return [value for key, value in headers.items() if key.lower() == name]


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with asyncio.timeout(BOUND), http.post(url, json=body) as resp:
        return resp.status, await resp.read()


# ----- streaming quirks ---------------------------------------------------------------------------


async def test_stream_quirks_pass_through_and_the_sdk_parses_them(az: RecordingUpstream) -> None:
    events, where = azure_stream(TOKENS, usage=USAGE)
    az.queue(Script(rechunk(b"".join(events), [17, 1, 5])))
    probe, log = make_probe()
    async with (
        run_gateway(_config(az), registry={"probe": probe}) as gw,
        openai_sdk(gw) as client,
    ):
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        got = await read_sdk_stream(stream)
        (ctx,) = await log.wait_ends(1)

    # Everything but the usage chunk (the gateway asked for it, the client did not) and [DONE].
    assert len(got.chunks) == len(events) - 2
    leading = got.chunks[0]
    assert leading.choices == []
    assert leading.model_extra is not None
    filters = leading.model_extra["prompt_filter_results"]
    assert filters[0]["prompt_index"] == 0
    assert filters[0]["content_filter_results"]["hate"] == {"filtered": False, "severity": "safe"}
    annotation = got.chunks[where["annotation"]]
    assert annotation.choices[0].finish_reason is None
    assert annotation.choices[0].model_extra is not None
    assert "content_filter_offsets" in annotation.choices[0].model_extra
    assert got.texts == TOKENS
    assert got.finish == ["stop"]
    assert got.usages == []
    assert ctx.outcome is Outcome.COMPLETED
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens, ctx.usage.total_tokens) == (
        9,
        3,
        12,
    )
    assert ctx.usage.source == "upstream"

    (exchange,) = az.exchanges
    assert exchange.path == "/openai/deployments/prod-gpt4o/chat/completions"
    assert az.queries == ["api-version=2024-10-21"]
    assert _headers_named(exchange.headers, "api-key") == [AZ_KEY]
    assert _headers_named(exchange.headers, "authorization") == []
    assert exchange.body == {
        "messages": [{"role": "user", "content": "Say hello"}],
        "model": "prod-gpt4o",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@pytest.mark.parametrize("client_asks", [False, True])
async def test_stream_bytes_are_azures_minus_only_the_unrequested_usage_chunk(
    az: RecordingUpstream, http: aiohttp.ClientSession, client_asks: bool
) -> None:
    events, where = azure_stream(TOKENS, usage=USAGE)
    az.queue(Script(rechunk(b"".join(events), [9, 2])))
    probe, _ = make_probe()
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if client_asks else {}
    async with run_gateway(_config(az), registry={"probe": probe}) as gw:
        status, raw = await _post(http, gw.v1 + CHAT, chat_body(**extra))
    assert status == 200
    expected = events if client_asks else [e for i, e in enumerate(events) if i != where["usage"]]
    assert raw == b"".join(expected)


async def test_content_filtered_prompt_is_a_400_with_azures_code(az: RecordingUpstream) -> None:
    message = (
        "The response was filtered due to the prompt triggering Azure OpenAI's content "
        "management policy."
    )
    body = {
        "error": {
            "message": message,
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation"},
        }
    }
    az.queue(json_script(body, status=400))
    probe, _ = make_probe()
    async with (
        run_gateway(_config(az), registry={"probe": probe}) as gw,
        openai_sdk(gw) as client,
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert caught.value.status_code == 400
    assert message in caught.value.message
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "content_filter"


# ----- URLs, deployments, api-version -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "upstream_path"),
    [
        (CHAT, chat_body(stream=False), "/openai/deployments/prod-gpt4o/chat/completions"),
        (COMPLETIONS, completion_body(stream=False), "/openai/deployments/prod-gpt4o/completions"),
        (EMBEDDINGS, {"model": "m", "input": "hi"}, "/openai/deployments/prod-gpt4o/embeddings"),
    ],
)
async def test_each_endpoint_goes_to_its_deployment_path(
    az: RecordingUpstream,
    http: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any],
    upstream_path: str,
) -> None:
    az.queue(json_script(openai_completion("ok")))
    probe, _ = make_probe()
    config = _config(az, api_version="2024-06-01")
    async with run_gateway(config, registry={"probe": probe}) as gw:
        status, _ = await _post(http, gw.v1 + path, body)
    assert status == 200
    (exchange,) = az.exchanges
    assert exchange.path == upstream_path
    assert az.queries == ["api-version=2024-06-01"]
    assert exchange.body == {**body, "model": "prod-gpt4o"}, "nothing added to a unary body"


@pytest.mark.parametrize(
    ("model", "deployment"),
    [("direct", "team.deploy_1-x"), ("az/gpt-4o", "prod-gpt4o"), ("az/dep-2", "dep-2")],
)
async def test_deployment_is_the_map_entry_else_the_upstream_model(
    az: RecordingUpstream, http: aiohttp.ClientSession, model: str, deployment: str
) -> None:
    az.queue(json_script(openai_completion("ok")))
    probe, _ = make_probe()
    async with run_gateway(_config(az), registry={"probe": probe}) as gw:
        status, _ = await _post(http, gw.v1 + CHAT, chat_body(stream=False, model=model))
    assert status == 200
    (exchange,) = az.exchanges
    assert exchange.path == f"/openai/deployments/{deployment}/chat/completions"
    assert exchange.body["model"] == deployment


async def test_v1_surface_puts_the_deployment_in_the_body(
    az: RecordingUpstream, http: aiohttp.ClientSession
) -> None:
    az.queue(json_script(openai_completion("ok")))
    probe, _ = make_probe()
    async with run_gateway(_config(az, use_v1_api=True), registry={"probe": probe}) as gw:
        status, raw = await _post(http, gw.v1 + CHAT, chat_body(stream=False))
    assert status == 200
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == "ok"
    (exchange,) = az.exchanges
    assert exchange.path == "/openai/v1/chat/completions"
    assert az.queries == [""]
    assert exchange.body["model"] == "prod-gpt4o"
    assert _headers_named(exchange.headers, "api-key") == [AZ_KEY]


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(
    "model", [*(f"bad-{i}" for i in range(len(UNSAFE))), "az/../x", "az/a/../../b", "az/.."]
)
async def test_unsafe_deployment_names_are_refused_before_anything_is_sent(
    az: RecordingUpstream, http: aiohttp.ClientSession, model: str, stream: bool
) -> None:
    probe, log = make_probe()
    async with run_gateway(_config(az), registry={"probe": probe}) as gw:
        status, raw = await _post(http, gw.v1 + CHAT, chat_body(stream=stream, model=model))
        (ctx,) = await log.wait_ends(1)
    assert status == 400
    error = json_error(raw)
    assert error["code"] == "invalid_deployment"
    assert error["param"] == "model"
    assert az.exchanges == []
    assert ctx.status == 400


async def test_unsafe_deployment_is_a_rejection_not_an_upstream_error(
    az: RecordingUpstream, http: aiohttp.ClientSession
) -> None:
    """Access logs and metrics must not count a request nobody sent as an upstream failure."""
    probe, log = make_probe()
    async with run_gateway(_config(az), registry={"probe": probe}) as gw:
        status, _ = await _post(http, gw.v1 + CHAT, chat_body(model="az/../x"))
        (ctx,) = await log.wait_ends(1)
    assert status == 400
    assert az.exchanges == []
    assert ctx.outcome is Outcome.REJECTED
