"""Bad client input: an OpenAI-style 4xx JSON error, never a traceback, never the upstream."""

from __future__ import annotations

import asyncio
import contextlib
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
    pytest.param({"temperature": "0.7"}, "temperature", id="temperature-string"),
    pytest.param({"temperature": [1]}, "temperature", id="temperature-list"),
    pytest.param({"temperature": True}, "temperature", id="temperature-bool"),
    pytest.param({"top_p": "high"}, "top_p", id="top-p-string"),
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


# ----- oversized or malformed request heads ---------------------------------------------------
#
# These never reach the gateway's handlers: aiohttp's HTTP parser refuses them (any header
# line or request line over 8190 bytes, more than 128 headers, forbidden bytes in a value)
# with `400 Bad Request`, a one-line text/plain reason, and closes the connection. aiohttp
# has no 431. The tests pin down that the reply is that clean 400, never a traceback or a
# silently closed socket, that nothing reaches the upstream, and that the gateway carries on.

_HEAD_LIMIT = 8190  # aiohttp's max_line_size / max_field_size


async def _raw_exchange(url: str, head_lines: list[bytes], body: bytes) -> bytes:
    """Send one request over a fresh socket; everything the gateway sent until it closed."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = b"\r\n".join(
            [
                b"POST /v1/chat/completions HTTP/1.1",
                b"Host: 127.0.0.1",
                b"Content-Type: application/json",
                *head_lines,
                b"Content-Length: %d" % len(body),
                b"Connection: close",
            ]
        )
        writer.write(head + b"\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(BOUND):
            return await reader.read()  # to EOF: the gateway must close, not hang
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


BAD_HEADS: list[Any] = [
    pytest.param([b"X-Big: " + b"a" * (_HEAD_LIMIT + 10)], id="header-value-too-long"),
    pytest.param([b"X-" + b"n" * (_HEAD_LIMIT + 10) + b": v"], id="header-name-too-long"),
    pytest.param([b"X-H%d: v" % i for i in range(200)], id="too-many-headers"),
    pytest.param([b"Authorization: Bearer " + b"k" * (_HEAD_LIMIT + 10)], id="huge-auth-header"),
    pytest.param([b"X-Bad: a\x00b"], id="nul-in-header-value"),
    pytest.param([b"X-Split: a\rInjected: b"], id="bare-cr-in-header-value"),
]


@pytest.mark.parametrize("head_lines", BAD_HEADS)
async def test_oversized_or_malformed_headers_get_a_clean_400(
    gw: RunningGateway, fake: FakeUpstream, http: aiohttp.ClientSession, head_lines: list[bytes]
) -> None:
    reply = await _raw_exchange(gw.url, head_lines, _json(chat_body()))
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1."), reply[:200]
    assert status_line.split(b" ")[1] == b"400", reply[:200]
    _, _, body = rest.partition(b"\r\n\r\n")
    assert 0 < len(body) < 300  # a short reason, not an echo of the whole header
    assert b"Traceback" not in reply
    assert b'File "' not in reply
    assert fake.exchanges == []
    # The gateway is unharmed: the next request on a new connection is served.
    async with asyncio.timeout(BOUND), http.post(gw.v1 + CHAT, json=chat_body()) as resp:
        assert resp.status == 200
        await resp.read()


async def test_large_headers_under_the_limit_are_served(
    gw: RunningGateway, fake: FakeUpstream
) -> None:
    value = b"v" * (_HEAD_LIMIT - 200)
    reply = await _raw_exchange(gw.url, [b"X-Large: " + value], _json(chat_body()))
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    (exchange,) = fake.exchanges
    assert exchange.headers["X-Large"] == value.decode()


# ----- bodies that used to crash a translation (found by tests/unit/test_request_fuzz.py) ----


async def test_non_string_text_block_on_v1_messages_is_400(
    gw: RunningGateway, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": "m",
        "max_tokens": 10,
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": None}]},
        ],
    }
    async with asyncio.timeout(BOUND), http.post(gw.url + "/v1/messages", json=body) as resp:
        raw = await resp.read()
    assert resp.status == 400
    payload = orjson.loads(raw)
    assert payload["type"] == "error"
    assert payload["error"]["type"] == "invalid_request_error"
    assert "messages[1].content[0]" in payload["error"]["message"]
    assert fake.exchanges == []


async def test_non_string_text_part_to_the_demo_model_is_served(
    http: aiohttp.ClientSession,
) -> None:
    config = {
        "upstreams": {"demo": {"kind": "demo", "ttft_ms": 0, "itl_ms": 0}},
        "routes": [{"model": "demo", "upstream": "demo"}],
    }
    content = [{"type": "text", "text": None}, {"type": "text", "text": "tea"}]
    body = chat_body(model="demo", stream=False, messages=[{"role": "user", "content": content}])
    async with (
        run_gateway(config) as demo,
        asyncio.timeout(BOUND),
        http.post(demo.v1 + CHAT, json=body) as resp,
    ):
        payload = await resp.json()
    assert resp.status == 200
    assert "tea" in payload["choices"][0]["message"]["content"]
