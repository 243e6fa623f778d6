"""CORS: off by default; with `server.cors`, preflights and every response for allowed
origins, streamed answers and errors included."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from gateway.auth import hash_key
from gateway.config import ConfigError, parse_config
from gateway.testing.fake_upstream import FakeUpstream
from gateway.testing.harness import run_gateway
from tests.integration._support import BOUND, CHAT, DONE, chat_body, config_for, json_error

APP = "https://app.example.com"
OTHER = "https://evil.example.net"
KEY = "sk-sluice-cors-test-key-0123456789"


def _cors_config(fake: FakeUpstream, **cors: Any) -> dict[str, Any]:
    return config_for(fake, server={"cors": {"allow_origins": [APP], **cors}})


async def _post(
    http: aiohttp.ClientSession,
    url: str,
    origin: str | None,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[aiohttp.ClientResponse, bytes]:
    sent = {**({"Origin": origin} if origin else {}), **(headers or {})}
    async with (
        asyncio.timeout(BOUND),
        http.post(url + CHAT, json=body or chat_body(), headers=sent) as resp,
    ):
        return resp, await resp.read()


async def _preflight(
    http: aiohttp.ClientSession,
    url: str,
    origin: str,
    method: str = "POST",
    headers: str = "authorization, content-type",
) -> tuple[aiohttp.ClientResponse, bytes]:
    sent = {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }
    async with asyncio.timeout(BOUND), http.options(url + CHAT, headers=sent) as resp:
        return resp, await resp.read()


def _cors_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {k.lower(): v for k, v in resp.headers.items() if k.lower().startswith("access-control")}


# ----- off by default ----------------------------------------------------------------------


async def test_no_cors_headers_by_default(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    async with run_gateway(config_for(fake)) as gw:
        resp, raw = await _post(http, gw.v1, APP)
        pre, pre_raw = await _preflight(http, gw.v1, APP)
    assert resp.status == 200
    assert raw.endswith(DONE)
    assert _cors_headers(resp) == {}
    assert pre.status == 405  # a preflight is just an OPTIONS nobody routes
    assert _cors_headers(pre) == {}
    assert json_error(pre_raw)["code"] == "method_not_allowed"


# ----- preflight -------------------------------------------------------------------------------


async def test_preflight_from_an_allowed_origin_is_204(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with run_gateway(_cors_config(fake, max_age=123)) as gw:
        resp, raw = await _preflight(http, gw.v1, APP)
    assert resp.status == 204
    assert raw == b""
    got = _cors_headers(resp)
    assert got["access-control-allow-origin"] == APP
    assert "POST" in got["access-control-allow-methods"].split(", ")
    allowed = {h.lower() for h in got["access-control-allow-headers"].split(", ")}
    assert {"authorization", "content-type", "x-api-key"} <= allowed
    assert got["access-control-max-age"] == "123"
    assert "access-control-allow-credentials" not in got
    assert "Origin" in resp.headers["Vary"]
    assert fake.exchanges == []


async def test_preflight_from_another_origin_is_not_granted(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with run_gateway(_cors_config(fake)) as gw:
        resp, _ = await _preflight(http, gw.v1, OTHER)
    assert resp.status != 204
    assert _cors_headers(resp) == {}
    assert "Origin" in resp.headers["Vary"]


@pytest.mark.parametrize(
    ("method", "headers", "needle"),
    [("DELETE", "content-type", "method"), ("POST", "content-type, x-secret-sauce", "header")],
)
async def test_preflight_asking_for_too_much_is_403(
    fake: FakeUpstream, http: aiohttp.ClientSession, method: str, headers: str, needle: str
) -> None:
    async with run_gateway(_cors_config(fake)) as gw:
        resp, raw = await _preflight(http, gw.v1, APP, method, headers)
    assert resp.status == 403
    error = json_error(raw)
    assert error["code"] == "cors_not_allowed"
    assert needle in error["message"]
    got = _cors_headers(resp)
    assert "access-control-allow-methods" not in got
    assert "access-control-allow-headers" not in got


# ----- actual requests -------------------------------------------------------------------------


async def test_streamed_answer_carries_the_cors_headers(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with run_gateway(_cors_config(fake)) as gw:
        resp, raw = await _post(http, gw.v1, APP)
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    assert raw.endswith(DONE)
    got = _cors_headers(resp)
    assert got["access-control-allow-origin"] == APP
    exposed = {h.lower() for h in got["access-control-expose-headers"].split(", ")}
    assert {
        "x-request-id",
        "retry-after",
        "x-should-retry",
        "x-ratelimit-remaining-tokens",
    } <= exposed
    assert "Origin" in resp.headers["Vary"]


@pytest.mark.parametrize("stream", [True, False])
async def test_errors_carry_the_cors_headers(
    fake: FakeUpstream, http: aiohttp.ClientSession, stream: bool
) -> None:
    """A browser app must be able to read why it was refused."""
    async with run_gateway(_cors_config(fake)) as gw:
        missing, _ = await _post(http, gw.v1, APP, chat_body(model="nope", stream=stream))
        bad, _ = await _post(http, gw.v1, APP, {"model": "m", "messages": []})
        unrouted_status = 0
        async with http.get(gw.url + "/nowhere", headers={"Origin": APP}) as unrouted:
            unrouted_status = unrouted.status
    assert (missing.status, bad.status, unrouted_status) == (404, 400, 404)
    for resp in (missing, bad, unrouted):
        assert resp.headers["Access-Control-Allow-Origin"] == APP


async def test_401_carries_the_cors_headers(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config = _cors_config(fake)
    config["teams"] = {"web": {"keys": [{"name": "app", "sha256": hash_key(KEY)}]}}
    async with run_gateway(config) as gw:
        refused, raw = await _post(http, gw.v1, APP)
        served, _ = await _post(http, gw.v1, APP, headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status == 401
    assert json_error(raw)["code"] == "missing_api_key"
    assert refused.headers["Access-Control-Allow-Origin"] == APP
    assert served.status == 200
    assert served.headers["Access-Control-Allow-Origin"] == APP


@pytest.mark.parametrize("origin", [OTHER, None, "null", APP + ".evil.net", APP.upper()])
async def test_other_origins_get_no_grant(
    fake: FakeUpstream, http: aiohttp.ClientSession, origin: str | None
) -> None:
    async with run_gateway(_cors_config(fake)) as gw:
        resp, raw = await _post(http, gw.v1, origin)
    assert resp.status == 200  # CORS protects browser users, it is not access control
    assert raw.endswith(DONE)
    assert _cors_headers(resp) == {}


async def test_any_origin(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    config = config_for(fake, server={"cors": {"allow_origins": ["*"]}})
    async with run_gateway(config) as gw:
        resp, _ = await _post(http, gw.v1, OTHER)
        pre, _ = await _preflight(http, gw.v1, OTHER)
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in resp.headers
    assert "Vary" not in resp.headers
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "*"


async def test_credentials_echo_the_exact_origin(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with run_gateway(_cors_config(fake, allow_credentials=True)) as gw:
        resp, _ = await _post(http, gw.v1, APP)
        pre, _ = await _preflight(http, gw.v1, APP)
    for answer in (resp, pre):
        assert answer.headers["Access-Control-Allow-Origin"] == APP
        assert answer.headers["Access-Control-Allow-Credentials"] == "true"


# ----- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cors", "needle"),
    [
        ({"allow_origins": ["*"], "allow_credentials": True}, "cannot be combined with '*'"),
        (
            {"allow_origins": [APP], "allow_headers": ["*"], "allow_credentials": True},
            "cannot be combined with '*'",
        ),
        ({"allow_origins": [APP + "/"]}, "server.cors: allow_origins[0]"),
        ({"allow_origins": ["app.example.com"]}, "is not an origin"),
        ({"allow_origins": [APP], "max_age": -1}, "server.cors.max_age"),
        ({"allow_origin": [APP]}, "server.cors.allow_origin: unknown key"),
    ],
)
def test_bad_cors_config_is_refused_naming_the_key(cors: dict[str, Any], needle: str) -> None:
    config = {
        "server": {"cors": cors},
        "upstreams": {"u": {"kind": "demo"}},
        "routes": [{"model": "m", "upstream": "u"}],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(config, {})
    assert needle in str(info.value)
