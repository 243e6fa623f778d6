"""Sluice in front of llama-cpp-python's server stack (Starlette, starlette-context's
`RequestIdPlugin`, sse-starlette): the real middleware, which refuses any `X-Request-Id`
that is not a UUID with an empty 400."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from gateway.context import upstream_request_id
from gateway.testing.harness import run_gateway
from tests.integration._support import BOUND, CHAT, DONE, chat_body, chat_contents
from tests.integration.starlette_upstream import TOKENS, StarletteUpstream


@pytest.fixture
def starlette_upstream() -> Iterator[StarletteUpstream]:
    """llama-cpp-python's server stack on a free loopback port."""
    with StarletteUpstream() as upstream:
        yield upstream


def _config(upstream: StarletteUpstream, **options: Any) -> dict[str, Any]:
    return {
        "upstreams": {"llama": {"kind": "openai", "base_url": upstream.base_url, **options}},
        "routes": [{"model": "m", "upstream": "llama", "upstream_model": "smol", "retries": 0}],
    }


async def _post(
    http: aiohttp.ClientSession, url: str, *, stream: bool, headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    async with http.post(url + CHAT, json=chat_body(stream=stream), headers=headers) as resp:
        return resp.status, resp.headers["X-Request-Id"], await resp.read()


def _answer(raw: bytes, stream: bool) -> str:
    if stream:
        assert raw.endswith(DONE)
        return "".join(chat_contents(raw))
    content: str = json.loads(raw)["choices"][0]["message"]["content"]
    return content


@pytest.mark.parametrize("stream", [True, False])
async def test_requests_pass_the_request_id_middleware(
    starlette_upstream: StarletteUpstream, http: aiohttp.ClientSession, stream: bool
) -> None:
    async with run_gateway(_config(starlette_upstream)) as gw, asyncio.timeout(BOUND):
        status, request_id, raw = await _post(http, gw.v1, stream=stream)
    assert status == 200, raw
    assert _answer(raw, stream) == "".join(TOKENS)
    assert re.fullmatch(r"req_[0-9a-f]{32}", request_id)
    (seen,) = starlette_upstream.seen
    sent = seen.headers["x-request-id"]
    assert sent == upstream_request_id(request_id)
    assert str(uuid.UUID(sent)) == sent
    assert seen.context_request_id == sent


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_request_id_is_kept_for_the_client_and_a_uuid_goes_upstream(
    starlette_upstream: StarletteUpstream, http: aiohttp.ClientSession, stream: bool
) -> None:
    async with run_gateway(_config(starlette_upstream)) as gw, asyncio.timeout(BOUND):
        status, request_id, raw = await _post(
            http, gw.v1, stream=stream, headers={"X-Request-Id": "trace-7.span:2"}
        )
    assert status == 200, raw
    assert request_id == "trace-7.span:2"
    (seen,) = starlette_upstream.seen
    assert seen.headers["x-request-id"] == upstream_request_id("trace-7.span:2")
    assert seen.context_request_id == seen.headers["x-request-id"]


async def test_a_client_uuid_goes_upstream_as_it_is(
    starlette_upstream: StarletteUpstream, http: aiohttp.ClientSession
) -> None:
    client_id = str(uuid.uuid4())
    async with run_gateway(_config(starlette_upstream)) as gw, asyncio.timeout(BOUND):
        status, request_id, _ = await _post(
            http, gw.v1, stream=True, headers={"X-Request-Id": client_id}
        )
    assert (status, request_id) == (200, client_id)
    (seen,) = starlette_upstream.seen
    assert seen.context_request_id == seen.headers["x-request-id"] == client_id


async def test_the_request_id_header_can_be_renamed(
    starlette_upstream: StarletteUpstream, http: aiohttp.ClientSession
) -> None:
    config = _config(starlette_upstream, request_id_header="X-Correlation-Id")
    async with run_gateway(config) as gw, asyncio.timeout(BOUND):
        status, request_id, raw = await _post(
            http, gw.v1, stream=True, headers={"X-Request-Id": "not-a-uuid"}
        )
    assert status == 200, raw
    assert request_id == "not-a-uuid"
    (seen,) = starlette_upstream.seen
    assert seen.headers["x-correlation-id"] == upstream_request_id("not-a-uuid")
    assert "x-request-id" not in seen.headers
    assert seen.context_request_id != seen.headers["x-correlation-id"]  # made up by the plugin


@pytest.mark.parametrize("off", [None, ""])
async def test_the_request_id_header_can_be_turned_off(
    starlette_upstream: StarletteUpstream, http: aiohttp.ClientSession, off: str | None
) -> None:
    config = _config(starlette_upstream, request_id_header=off)
    async with run_gateway(config) as gw, asyncio.timeout(BOUND):
        status, request_id, raw = await _post(
            http, gw.v1, stream=False, headers={"X-Request-Id": str(uuid.uuid4())}
        )
    assert status == 200, raw
    (seen,) = starlette_upstream.seen
    assert "x-request-id" not in seen.headers
    assert seen.context_request_id != request_id
