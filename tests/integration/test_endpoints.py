"""Every endpoint over HTTP, against the fake upstream and the embedded demo model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.auth import hash_key
from gateway.testing.fake_upstream import FakeUpstream, Script, json_script, rechunk, sse
from gateway.testing.harness import RunningGateway, run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
    COMPLETIONS,
    DONE,
    EMBEDDINGS,
    SANE_ID,
    chat_body,
    completion_body,
    config_for,
    event_json,
    json_error,
    split_events,
)


def _completion_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-test",
        "object": "text_completion",
        "created": 1700000000,
        "model": "gpt-test",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[aiohttp.ClientResponse, bytes]:
    async with asyncio.timeout(BOUND), http.get(url) as resp:
        return resp, await resp.read()


async def _post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with asyncio.timeout(BOUND), http.post(url, json=body) as resp:
        return resp, await resp.read()


# ----- completions and embeddings through the fake -------------------------------------------


async def test_completions_streaming(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    upstream = b"".join(
        [sse(_completion_chunk(t)) for t in ["Once", " upon", " a \u00e9"]]
        + [sse(_completion_chunk("", "stop")), DONE]
    )
    fake.queue(Script(rechunk(upstream, [5, 11])))
    async with run_gateway(config_for(fake)) as gw:
        resp, raw = await _post(http, gw.v1 + COMPLETIONS, completion_body())
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert raw == upstream
    texts = [event_json(e)["choices"][0]["text"] for e in split_events(raw)[:-1]]
    assert "".join(texts) == "Once upon a \u00e9"
    (exchange,) = fake.exchanges
    assert exchange.path == "/v1/completions"
    assert exchange.body == completion_body(model="gpt-test")


async def test_completions_non_streaming(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    answer = {
        **_completion_chunk("Hello there", "stop"),
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
    }
    fake.queue(json_script(answer))
    async with run_gateway(config_for(fake)) as gw:
        resp, raw = await _post(http, gw.v1 + COMPLETIONS, completion_body(stream=False))
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert orjson.loads(raw) == answer
    assert SANE_ID.match(resp.headers["X-Request-Id"])


async def test_embeddings_round_trip(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    answer = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.1, -0.25, 3e-05]},
            {"object": "embedding", "index": 1, "embedding": [1.0, 0.0, -1.0]},
        ],
        "model": "gpt-test",
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }
    fake.queue(json_script(answer))
    sent = {
        "model": "m",
        "input": ["caf\u00e9", "\u65e5\u672c"],
        "encoding_format": "float",
        "dimensions": 3,
    }
    async with run_gateway(config_for(fake)) as gw:
        resp, raw = await _post(http, gw.v1 + EMBEDDINGS, sent)
    assert resp.status == 200
    assert orjson.loads(raw) == answer
    (exchange,) = fake.exchanges
    assert exchange.path == "/v1/embeddings"
    assert exchange.body == {**sent, "model": "gpt-test"}


# ----- the gateway's own endpoints ---------------------------------------------------------------


async def test_models_lists_routed_models(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    config = config_for(fake)
    config["routes"] += [
        {"model": "big-model", "upstream": "fake"},
        {"model": "org/small:q4", "upstream": "fake", "upstream_model": "small"},
    ]
    async with run_gateway(config) as gw:
        resp, raw = await _get(http, gw.v1 + "/models")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    listing = orjson.loads(raw)
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["m", "big-model", "org/small:q4"]
    for model in listing["data"]:
        assert model["object"] == "model"
        assert isinstance(model["created"], int)
        assert isinstance(model["owned_by"], str)
    assert fake.exchanges == [], "listing models never asks the upstream"


ALL_KEY = "sk-sluice-models-all-0123456789"
SOME_KEY = "sk-sluice-models-some-0123456789"


def _models_config(fake: FakeUpstream, **server: Any) -> dict[str, Any]:
    config = config_for(fake, server=server) if server else config_for(fake)
    config["routes"] += [
        {"model": "big-model", "upstream": "fake", "aliases": ["big"]},
        {"model": "org/small:q4", "upstream": "fake"},
    ]
    config["teams"] = {
        "t": {
            "keys": [
                {"name": "all", "sha256": hash_key(ALL_KEY)},
                {"name": "some", "sha256": hash_key(SOME_KEY), "models": ["big-model", "org/*"]},
            ]
        }
    }
    return config


async def _list(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with asyncio.timeout(BOUND), http.get(url + "/models", headers=headers) as resp:
        body = orjson.loads(await resp.read())
        assert resp.content_type == "application/json"
        return resp.status, body


@pytest.mark.parametrize("header", ["Authorization", "x-api-key"])
async def test_models_needs_a_key_when_keys_are_configured(
    fake: FakeUpstream, http: aiohttp.ClientSession, header: str
) -> None:
    def given(key: str) -> dict[str, str]:
        return {header: f"Bearer {key}" if header == "Authorization" else key}

    async with run_gateway(_models_config(fake)) as gw:
        missing = await _list(http, gw.v1, {})
        wrong = await _list(http, gw.v1, given("sk-sluice-wrong-0123456789"))
        full = await _list(http, gw.v1, given(ALL_KEY))
        some = await _list(http, gw.v1, given(SOME_KEY))
    assert missing[0] == 401
    assert missing[1]["error"]["code"] == "missing_api_key"
    assert missing[1]["error"]["type"] == "invalid_request_error"
    assert wrong[0] == 401
    assert wrong[1]["error"]["code"] == "invalid_api_key"
    assert full[0] == 200
    assert [m["id"] for m in full[1]["data"]] == ["m", "big-model", "big", "org/small:q4"]
    # Only what the key may use: `big-model` and its alias, and the `org/*` prefix.
    assert some[0] == 200
    assert [m["id"] for m in some[1]["data"]] == ["big-model", "big", "org/small:q4"]


async def test_one_model_needs_a_key_and_hides_what_the_key_may_not_use(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """GET /v1/models/{id} follows the list's rules: no key 401; a model the key may not use
    is not found for it (404, as OpenAI answers), one it may use is there."""

    async def one(gw_v1: str, model: str, key: str | None) -> tuple[int, dict[str, Any]]:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        async with (
            asyncio.timeout(BOUND),
            http.get(f"{gw_v1}/models/{model}", headers=headers) as r,
        ):
            return r.status, orjson.loads(await r.read())

    async with run_gateway(_models_config(fake)) as gw:
        missing = await one(gw.v1, "big", None)
        hidden = await one(gw.v1, "m", SOME_KEY)
        allowed = await one(gw.v1, "org/small:q4", SOME_KEY)
        unknown = await one(gw.v1, "nope", ALL_KEY)
    assert (missing[0], missing[1]["error"]["code"]) == (401, "missing_api_key")
    assert (hidden[0], hidden[1]["error"]["code"]) == (404, "model_not_found")
    assert (allowed[0], allowed[1]["id"]) == (200, "org/small:q4")
    assert (unknown[0], unknown[1]["error"]["code"]) == (404, "model_not_found")


async def test_public_models_lists_every_model_without_a_key(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with run_gateway(_models_config(fake, public_models=True)) as gw:
        status, body = await _list(http, gw.v1, {})
        chat, _ = await _post(http, gw.v1 + CHAT, chat_body())
    assert status == 200
    assert [m["id"] for m in body["data"]] == ["m", "big-model", "big", "org/small:q4"]
    assert chat.status == 401, "public_models opens the listing only"


async def test_health_and_readiness(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    async with run_gateway(config_for(fake)) as gw:
        health, health_body = await _get(http, gw.url + "/healthz")
        ready, ready_body = await _get(http, gw.url + "/readyz")
        assert gw.state.ready
    assert health.status == 200
    assert orjson.loads(health_body) == {"status": "ok"}
    assert ready.status == 200
    assert orjson.loads(ready_body) == {"ready": True}


@pytest.mark.parametrize("path", ["/v2/chat/completions", "/v1/chat", "/nothing", "/v1/modelz"])
async def test_unknown_path_is_404_json(
    fake: FakeUpstream, http: aiohttp.ClientSession, path: str
) -> None:
    async with run_gateway(config_for(fake)) as gw:
        resp, raw = await _post(http, gw.url + path, chat_body())
    assert resp.status == 404
    assert resp.content_type == "application/json"
    assert json_error(raw)["code"] == "not_found"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
async def test_get_on_post_endpoint_is_405_json(
    fake: FakeUpstream, http: aiohttp.ClientSession, path: str
) -> None:
    async with run_gateway(config_for(fake)) as gw:
        resp, raw = await _get(http, gw.url + path)
    assert resp.status == 405
    assert resp.content_type == "application/json"
    assert json_error(raw)["code"] == "method_not_allowed"


async def test_405_names_the_allowed_method(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """RFC 9110 §15.5.6: a 405 response must carry an Allow header."""
    async with run_gateway(config_for(fake)) as gw:
        resp, _ = await _get(http, gw.v1 + CHAT)
    assert resp.status == 405
    assert "POST" in resp.headers.get("Allow", "")


@pytest.mark.parametrize("stream", [True, False])
async def test_unknown_model_is_404_model_not_found(
    fake: FakeUpstream, http: aiohttp.ClientSession, stream: bool
) -> None:
    async with run_gateway(config_for(fake)) as gw:
        resp, raw = await _post(http, gw.v1 + CHAT, chat_body(model="gpt-9", stream=stream))
    assert resp.status == 404
    error = json_error(raw)
    assert error["code"] == "model_not_found"
    assert "gpt-9" in error["message"]
    assert fake.exchanges == []


# ----- the embedded demo model --------------------------------------------------------------


@pytest.fixture
async def demo() -> AsyncIterator[RunningGateway]:
    config = {
        "upstreams": {"demo": {"kind": "demo", "ttft_ms": 1, "itl_ms": 0.1, "max_tokens": 200}},
        "routes": [{"model": "demo", "upstream": "demo"}],
    }
    async with run_gateway(config, registry={}) as gw:
        yield gw


async def test_demo_streams_a_chat_answer(
    demo: RunningGateway, http: aiohttp.ClientSession
) -> None:
    body = chat_body(model="demo", messages=[{"role": "user", "content": "tide pools"}])
    resp, raw = await _post(http, demo.v1 + CHAT, body)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    events = split_events(raw)
    assert events[-1] == DONE
    chunks = [event_json(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert "tide pools" in text
    assert len(chunks) > 10, "the demo streams token by token"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_demo_honours_max_tokens_and_usage(
    demo: RunningGateway, http: aiohttp.ClientSession
) -> None:
    body = chat_body(model="demo", max_tokens=5, stream_options={"include_usage": True})
    resp, raw = await _post(http, demo.v1 + CHAT, body)
    assert resp.status == 200
    chunks = [event_json(e) for e in split_events(raw)[:-1]]
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) == 5
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5


async def test_demo_answers_non_streaming_chat(
    demo: RunningGateway, http: aiohttp.ClientSession
) -> None:
    body = chat_body(model="demo", stream=False, messages=[{"role": "user", "content": "owls"}])
    resp, raw = await _post(http, demo.v1 + CHAT, body)
    assert resp.status == 200
    answer = orjson.loads(raw)
    assert answer["object"] == "chat.completion"
    message = answer["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert "owls" in message["content"]
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("stream", [True, False])
async def test_demo_answers_completions(
    demo: RunningGateway, http: aiohttp.ClientSession, stream: bool
) -> None:
    body = completion_body(model="demo", stream=stream, prompt="lighthouses")
    resp, raw = await _post(http, demo.v1 + COMPLETIONS, body)
    assert resp.status == 200
    if stream:
        events = split_events(raw)
        assert events[-1] == DONE
        text = "".join(event_json(e)["choices"][0]["text"] for e in events[:-1])
    else:
        answer = orjson.loads(raw)
        assert answer["object"] == "text_completion"
        text = answer["choices"][0]["text"]
    assert "lighthouses" in text


async def test_demo_answers_embeddings(demo: RunningGateway, http: aiohttp.ClientSession) -> None:
    resp, raw = await _post(
        http, demo.v1 + EMBEDDINGS, {"model": "demo", "input": ["alpha", "beta", "alpha"]}
    )
    assert resp.status == 200
    answer = orjson.loads(raw)
    assert answer["object"] == "list"
    vectors = [item["embedding"] for item in answer["data"]]
    assert [item["index"] for item in answer["data"]] == [0, 1, 2]
    assert len(vectors) == 3
    assert all(len(v) == len(vectors[0]) > 0 for v in vectors)
    assert vectors[0] == vectors[2]
    assert vectors[0] != vectors[1]
