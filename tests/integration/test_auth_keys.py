"""Teams and API keys over HTTP: 401 without a valid key, 403 for a model not allowed."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from gateway.auth import hash_key
from gateway.testing.fake_upstream import FakeUpstream
from gateway.testing.harness import run_gateway
from tests.integration._support import CHAT, DONE, chat_body, make_probe

ML_KEY = "sk-sluice-ml-team-key-0123456789"
OPS_KEY = "sk-sluice-ops-team-key-abcdefghij"


def _config(fake: FakeUpstream) -> dict[str, Any]:
    return {
        "teams": {
            "ml": {"weight": 2, "keys": [{"name": "ci", "sha256": hash_key(ML_KEY)}]},
            "ops": {"keys": [{"name": "bot", "sha256": hash_key(OPS_KEY), "models": ["m"]}]},
        },
        "upstreams": {"fake": {"kind": "openai", "base_url": fake.base_url, "api_key": "up"}},
        "routes": [
            {"model": "m", "upstream": "fake", "retries": 0},
            {"model": "other", "upstream": "fake", "retries": 0},
        ],
        "plugins": [{"name": "probe"}],
    }


async def _post(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], model: str = "m"
) -> tuple[int, bytes]:
    async with http.post(url, json=chat_body(model=model), headers=headers) as r:
        return r.status, await r.read()


async def test_a_valid_key_is_served_and_never_forwarded(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    probe, log = make_probe()
    async with run_gateway(_config(fake), registry={"probe": probe}) as gw:
        status, raw = await _post(http, gw.v1 + CHAT, {"Authorization": f"Bearer {ML_KEY}"})
        (ctx,) = await log.wait_ends(1)
    assert status == 200
    assert raw.endswith(DONE)
    (exchange,) = fake.exchanges
    assert exchange.headers["Authorization"] == "Bearer up"
    assert ML_KEY not in str(exchange.headers)
    assert (ctx.identity.team, ctx.identity.key_id) == ("ml", "ml/ci")


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer sk-sluice-not-a-real-key-9999"}, "invalid_api_key"),
        ({"x-api-key": "nope"}, "invalid_api_key"),
    ],
)
async def test_missing_or_unknown_key_is_401_without_the_key(
    fake: FakeUpstream, http: aiohttp.ClientSession, headers: dict[str, str], code: str
) -> None:
    probe, _log = make_probe()
    async with run_gateway(_config(fake), registry={"probe": probe}) as gw:
        status, raw = await _post(http, gw.v1 + CHAT, headers)
    assert status == 401
    error = orjson.loads(raw)["error"]
    assert error["code"] == code
    assert "not-a-real-key" not in raw.decode()
    assert fake.exchanges == []


async def test_model_not_allowed_for_the_key_is_403(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    probe, _log = make_probe()
    headers = {"Authorization": f"Bearer {OPS_KEY}"}
    async with run_gateway(_config(fake), registry={"probe": probe}) as gw:
        allowed, _ = await _post(http, gw.v1 + CHAT, headers, model="m")
        denied, raw = await _post(http, gw.v1 + CHAT, headers, model="other")
    assert allowed == 200
    assert denied == 403
    assert orjson.loads(raw)["error"]["code"] == "model_not_allowed"
    assert len(fake.exchanges) == 1


async def test_anthropic_clients_authenticate_with_x_api_key(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    probe, _log = make_probe()
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    async with run_gateway(_config(fake), registry={"probe": probe}) as gw:
        async with http.post(gw.url + "/v1/messages", json=body, headers={}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["type"] == "authentication_error"
        async with http.post(
            gw.url + "/v1/messages", json=body, headers={"x-api-key": ML_KEY}
        ) as resp:
            assert resp.status == 502  # the fake's default answer is SSE, not JSON: but authed
    assert len(fake.exchanges) == 1
