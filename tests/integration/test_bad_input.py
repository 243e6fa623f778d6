"""Bad client input: an OpenAI-style 4xx JSON error, never a traceback, never the upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.testing.fake_upstream import FakeUpstream
from gateway.testing.harness import RunningGateway, run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    SANE_ID,
    chat_body,
    config_for,
    json_error,
)

MAX_BODY = 4096


@pytest.fixture
async def gw(fake: FakeUpstream) -> AsyncIterator[RunningGateway]:
    config = config_for(fake, server={"max_body_bytes": MAX_BODY})
    async with run_gateway(config) as running:
        yield running


async def _send(
    http: aiohttp.ClientSession,
    url: str,
    data: bytes | AsyncIterator[bytes],
    content_type: str | None = "application/json",
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    async with asyncio.timeout(BOUND), http.post(url, data=data, headers=headers) as resp:
        raw = await resp.read()
    assert resp.content_type == "application/json", raw[:200]
    assert b"Traceback" not in raw
    return resp.status, json_error(raw), resp


def _json(obj: Any) -> bytes:
    return orjson.dumps(obj)


BAD_BODIES: list[Any] = [
    pytest.param(b'{"model": "m", "messages": [', id="malformed-json"),
    pytest.param(b"", id="empty-body"),
    pytest.param(b"[1, 2, 3]", id="json-array"),
    pytest.param(b'"just a string"', id="json-string"),
    pytest.param(b"null", id="json-null"),
    pytest.param(b"42", id="json-number"),
    pytest.param(b'{"model": "m\xff\xfe", "messages": []}', id="invalid-utf8"),
    pytest.param(
        b'{"model": "m", "messages": [{"role": "user", "content": "\xc3"}]}', id="truncated-utf8"
    ),
    pytest.param(b"\xef\xbb\xbf" + b'{"model": "m"', id="bom-and-garbage"),
]


@pytest.mark.parametrize("data", BAD_BODIES)
async def test_unparseable_body_is_400(
    gw: RunningGateway, fake: FakeUpstream, http: aiohttp.ClientSession, data: bytes
) -> None:
    status, error, resp = await _send(http, gw.v1 + CHAT, data)
    assert status == 400
    assert error["type"] == "invalid_request_error"
    assert SANE_ID.match(resp.headers["X-Request-Id"])
    assert fake.exchanges == []


INVALID_FIELDS: list[Any] = [
    pytest.param({"stream": "true"}, "stream", id="stream-string"),
    pytest.param({"stream": 1}, "stream", id="stream-int"),
    pytest.param({"messages": "hi"}, "messages", id="messages-string"),
    pytest.param({"messages": {"role": "user"}}, "messages", id="messages-object"),
    pytest.param({"messages": []}, "messages", id="messages-empty"),
    pytest.param({"messages": None}, "messages", id="messages-null"),
    pytest.param({"messages": ["hi"]}, "messages[0]", id="message-not-object"),
    pytest.param({"messages": [{"content": "x"}]}, "messages[0]", id="message-no-role"),
    pytest.param({"max_tokens": "5"}, "max_tokens", id="max-tokens-string"),
    pytest.param({"max_tokens": 0}, "max_tokens", id="max-tokens-zero"),
    pytest.param({"max_tokens": -3}, "max_tokens", id="max-tokens-negative"),
    pytest.param({"max_tokens": 2.5}, "max_tokens", id="max-tokens-float"),
    pytest.param({"max_tokens": True}, "max_tokens", id="max-tokens-bool"),
    pytest.param({"max_completion_tokens": "9"}, "max_completion_tokens", id="mct-string"),
    pytest.param({"stream_options": "usage"}, "stream_options", id="stream-options-string"),
    pytest.param({"model": ""}, "model", id="model-empty"),
    pytest.param({"model": 7}, "model", id="model-number"),
    pytest.param({"model": None}, "model", id="model-null"),
]


@pytest.mark.parametrize(("change", "param"), INVALID_FIELDS)
async def test_invalid_chat_field_is_400_naming_it(
    gw: RunningGateway,
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    change: dict[str, Any],
    param: str,
) -> None:
    body = {**chat_body(), **change}
    status, error, _ = await _send(http, gw.v1 + CHAT, _json(body))
    assert status == 400
    assert error["param"] == param
    assert fake.exchanges == []


async def test_missing_model_is_400(
    gw: RunningGateway, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    body = chat_body()
    del body["model"]
    status, error, _ = await _send(http, gw.v1 + CHAT, _json(body))
    assert status == 400
    assert error["param"] == "model"
    assert fake.exchanges == []


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        pytest.param(COMPLETIONS, {"model": "m"}, "prompt", id="completions-no-prompt"),
        pytest.param(EMBEDDINGS, {"model": "m"}, "input", id="embeddings-no-input"),
        pytest.param(CHAT, {"model": "m"}, "messages", id="chat-no-messages"),
    ],
)
async def test_missing_required_field_is_400(
    gw: RunningGateway,
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any],
    param: str,
) -> None:
    status, error, _ = await _send(http, gw.v1 + path, _json(body))
    assert status == 400
    assert error["param"] == param
    assert fake.exchanges == []


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_wrong_content_type_is_415(
    gw: RunningGateway, fake: FakeUpstream, http: aiohttp.ClientSession, content_type: str
) -> None:
    status, error, _ = await _send(http, gw.v1 + CHAT, _json(chat_body()), content_type)
    assert status == 415
    assert error["code"] == "unsupported_media_type"
    assert fake.exchanges == []


async def test_json_with_charset_is_accepted(
    gw: RunningGateway, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    async with (
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, data=_json(chat_body()), headers=headers) as resp,
    ):
        await resp.read()
    assert resp.status == 200
    assert len(fake.exchanges) == 1


def _oversized() -> bytes:
    body = chat_body(messages=[{"role": "user", "content": "x" * (MAX_BODY * 2)}])
    data = _json(body)
    assert len(data) > MAX_BODY
    return data


async def test_body_over_limit_is_413(
    gw: RunningGateway, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    status, error, _ = await _send(http, gw.v1 + CHAT, _oversized())
    assert status == 413
    assert error["code"] == "request_too_large"
    assert fake.exchanges == []


async def test_chunked_body_over_limit_is_413(
    gw: RunningGateway, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """No Content-Length to check up front: the limit holds while reading."""
    data = _oversized()

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    status, error, _ = await _send(http, gw.v1 + CHAT, pieces())
    assert status == 413
    assert error["code"] == "request_too_large"
    assert fake.exchanges == []


async def test_body_just_under_limit_is_accepted(
    gw: RunningGateway, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    base = len(_json(chat_body(messages=[{"role": "user", "content": ""}])))
    body = chat_body(messages=[{"role": "user", "content": "y" * (MAX_BODY - base)}])
    data = _json(body)
    assert len(data) == MAX_BODY
    async with (
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, data=data, headers={"Content-Type": "application/json"}) as resp,
    ):
        await resp.read()
    assert resp.status == 200
    (exchange,) = fake.exchanges
    assert exchange.body["messages"] == body["messages"]
