"""Upstream failures: HTTP statuses before headers, one final error event after."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.testing.fake_upstream import (
    FakeUpstream,
    Script,
    json_script,
    openai_stream,
    rechunk,
    sse,
)
from gateway.testing.harness import openai_route_config, run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
    DONE,
    SANE_ID,
    GatedUpstream,
    chat_body,
    closed_port,
    config_for,
    final_error,
    gated_script,
    json_error,
    split_events,
)

SECRET = "sk-abcdefghijklmnop"


async def _post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with asyncio.timeout(BOUND), http.post(url + CHAT, json=body) as resp:
        return resp, await resp.read()


# ----- before headers: upstream HTTP errors --------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("status", [400, 404, 422, 429])
async def test_upstream_4xx_openai_shape_keeps_status_and_message(
    fake: FakeUpstream, http: aiohttp.ClientSession, status: int, stream: bool
) -> None:
    message = f"Invalid value for 'max_tokens' (case {status})."
    fake.queue(
        json_script(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": "max_tokens",
                    "code": None,
                }
            },
            status=status,
        )
    )
    async with run_gateway(config_for(fake)) as gw:
        resp, body = await _post(http, gw.v1, chat_body(stream=stream))
    assert resp.status == status
    assert resp.content_type == "application/json"
    error = json_error(body)
    assert error["message"] == message
    assert error["type"] == "invalid_request_error"
    assert SANE_ID.match(resp.headers["X-Request-Id"])


@pytest.mark.parametrize("stream", [True, False])
async def test_upstream_4xx_vllm_shape_becomes_openai_shape(
    fake: FakeUpstream, http: aiohttp.ClientSession, stream: bool
) -> None:
    message = "This model's maximum context length is 4096 tokens. However, you requested 5000."
    fake.queue(
        json_script(
            {
                "object": "error",
                "message": message,
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
            status=400,
        )
    )
    async with run_gateway(config_for(fake)) as gw:
        resp, body = await _post(http, gw.v1, chat_body(stream=stream))
    assert resp.status == 400
    error = json_error(body)
    assert error["message"] == message
    assert "object" not in orjson.loads(body)


@pytest.mark.parametrize("status", [500, 502, 503])
@pytest.mark.parametrize("stream", [True, False])
async def test_upstream_5xx_becomes_502(
    fake: FakeUpstream, http: aiohttp.ClientSession, status: int, stream: bool
) -> None:
    fake.queue(
        json_script({"error": {"message": "CUDA out of memory", "type": "server_error"}}, status)
    )
    async with run_gateway(config_for(fake)) as gw:
        resp, body = await _post(http, gw.v1, chat_body(stream=stream))
    assert resp.status == 502
    error = json_error(body)
    assert error["type"] == "upstream_error"


async def test_upstream_non_json_error_body_becomes_openai_json(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(
        Script([b"<html><body>502 Bad Gateway</body></html>"], status=502, content_type="text/html")
    )
    async with run_gateway(config_for(fake)) as gw:
        resp, body = await _post(http, gw.v1, chat_body())
    assert resp.status == 502
    assert resp.content_type == "application/json"
    assert "<html>" not in json_error(body)["message"]


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("stream", [True, False])
async def test_upstream_auth_failure_is_502_without_details(
    fake: FakeUpstream, http: aiohttp.ClientSession, status: int, stream: bool
) -> None:
    upstream_message = "Incorrect API key provided: sk-live-9f8e7d6c5b4a. Org org-hidden-77."
    fake.queue(
        json_script(
            {
                "error": {
                    "message": upstream_message,
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                }
            },
            status=status,
        )
    )
    async with run_gateway(config_for(fake, api_key="sk-gateway-000000000")) as gw:
        resp, body = await _post(http, gw.v1, chat_body(stream=stream))
    assert resp.status == 502
    error = json_error(body)
    text = body.decode()
    for leak in ("Incorrect API key", "sk-live", "org-hidden", "invalid_api_key", "sk-gateway"):
        assert leak not in text
    assert error["type"] == "upstream_error"


@pytest.mark.parametrize("stream", [True, False])
async def test_connection_refused_is_502_json(http: aiohttp.ClientSession, stream: bool) -> None:
    config = openai_route_config(f"http://127.0.0.1:{closed_port()}/v1")
    async with run_gateway(config) as gw:
        resp, body = await _post(http, gw.v1, chat_body(stream=stream))
    assert resp.status == 502
    assert resp.content_type == "application/json"
    error = json_error(body)
    assert error["type"] == "upstream_error"
    assert isinstance(error["code"], str)


@pytest.mark.parametrize("stream", [True, False])
async def test_secrets_in_upstream_error_messages_are_redacted(
    fake: FakeUpstream, http: aiohttp.ClientSession, stream: bool
) -> None:
    fake.queue(
        json_script(
            {
                "error": {
                    "message": f"Key {SECRET} is not allowed for model gpt-test.",
                    "type": "invalid_request_error",
                }
            },
            status=400,
        )
    )
    async with run_gateway(config_for(fake)) as gw:
        resp, body = await _post(http, gw.v1, chat_body(stream=stream))
    assert resp.status == 400
    error = json_error(body)
    assert SECRET not in body.decode()
    assert "abcdefghijklmnop" not in body.decode()
    assert "is not allowed for model gpt-test" in error["message"]


# ----- a 200 stream whose first event is an error ----------------------------------------------


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        pytest.param(
            {
                "error": {
                    "message": "Prompt too long for this model.",
                    "type": "invalid_request_error",
                    "code": 400,
                }
            },
            400,
            id="openai-shape-400",
        ),
        pytest.param(
            {
                "object": "error",
                "message": "Prompt too long for this model.",
                "type": "BadRequestError",
                "code": 400,
            },
            400,
            id="vllm-shape-400",
        ),
        pytest.param(
            {"error": {"message": "Prompt too long for this model.", "type": "server_error"}},
            502,
            id="no-status-code",
        ),
    ],
)
async def test_first_event_error_becomes_http_status(
    fake: FakeUpstream, http: aiohttp.ClientSession, payload: dict[str, Any], status: int
) -> None:
    fake.queue(Script([sse(payload), DONE]))
    async with run_gateway(config_for(fake)) as gw:
        resp, body = await _post(http, gw.v1, chat_body())
    assert resp.status == status
    assert resp.content_type == "application/json"
    assert json_error(body)["message"] == "Prompt too long for this model."


async def test_first_event_error_is_redacted(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script([sse({"error": {"message": f"bad key {SECRET}", "code": 400}})]))
    async with run_gateway(config_for(fake)) as gw:
        resp, body = await _post(http, gw.v1, chat_body())
    assert resp.status == 400
    assert SECRET not in body.decode()


# ----- after headers: one final error event ----------------------------------------------------


async def test_mid_stream_error_event_ends_the_stream(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    """The error arrives after the client has the first events (so headers are out)."""
    good = openai_stream(["a", "b"], done=False)[:-1]  # no finish chunk
    bad = sse({"error": {"message": f"engine died, key {SECRET}", "type": "server_error"}})
    script, (gate,) = gated_script([*good, bad, *openai_stream(["never"])], len(good))
    gated.queue(script)
    async with (
        run_gateway(config_for(gated)) as gw,
        http.post(gw.v1 + CHAT, json=chat_body()) as resp,
    ):
        assert resp.status == 200
        async with asyncio.timeout(BOUND):
            first = await resp.content.readexactly(len(b"".join(good)))
        gate.set()
        async with asyncio.timeout(BOUND):
            raw = first + await resp.content.read()
    events = split_events(raw)
    assert events[: len(good)] == good
    assert len(events) == len(good) + 1
    error = final_error(raw)
    assert SECRET not in error["message"]
    assert "engine died" in error["message"]
    assert b"never" not in raw


@pytest.mark.parametrize("sizes", [[10_000], [3]])
async def test_truncated_stream_ends_with_upstream_truncated(
    fake: FakeUpstream, http: aiohttp.ClientSession, sizes: list[int]
) -> None:
    """Upstream closes without [DONE]: the events so far, then one error event, no [DONE]."""
    events = openai_stream(["x", "y", "z"], done=False)
    fake.queue(Script(rechunk(b"".join(events), sizes)))
    async with run_gateway(config_for(fake)) as gw:
        resp, raw = await _post(http, gw.v1, chat_body())
    assert resp.status == 200
    got = split_events(raw)
    assert got[:-1] == events
    error = final_error(raw)
    assert error["code"] == "upstream_truncated"
    assert error["type"] == "upstream_error"


async def test_stream_cut_inside_an_event_drops_the_partial_event(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    events = openai_stream(["x", "y"])
    partial = events[2][: len(events[2]) // 2]
    fake.queue(Script([*events[:2], partial]))
    async with run_gateway(config_for(fake)) as gw:
        resp, raw = await _post(http, gw.v1, chat_body())
    assert resp.status == 200
    assert split_events(raw)[:-1] == events[:2]
    assert final_error(raw)["code"] == "upstream_truncated"


async def test_connection_reset_mid_stream_ends_with_an_error_event(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    events = openai_stream(["x", "y"], done=False)
    fake.queue(Script(events, then="reset"))
    async with run_gateway(config_for(fake)) as gw:
        resp, raw = await _post(http, gw.v1, chat_body())
    assert resp.status == 200
    assert split_events(raw)[:-1] == events
    error = final_error(raw)
    assert error["type"] == "upstream_error"
    assert isinstance(error["code"], str)
    assert error["code"].startswith("upstream_")


@pytest.mark.parametrize("then", ["eof", "reset"])
async def test_upstream_gone_before_any_event_is_502(
    fake: FakeUpstream, http: aiohttp.ClientSession, then: str
) -> None:
    fake.queue(Script([], then=then))
    async with run_gateway(config_for(fake)) as gw:
        resp, body = await _post(http, gw.v1, chat_body())
    assert resp.status == 502
    assert json_error(body)["type"] == "upstream_error"


async def test_non_streaming_body_that_is_not_json_is_502(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script([b"not json at all"], content_type="application/json"))
    async with run_gateway(config_for(fake)) as gw:
        resp, body = await _post(http, gw.v1, chat_body(stream=False))
    assert resp.status == 502
    assert json_error(body)["type"] == "upstream_error"


async def test_non_streaming_200_carrying_an_error_object_is_an_error(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(json_script({"error": {"message": "Model overloaded.", "code": 503}}))
    async with run_gateway(config_for(fake)) as gw:
        resp, body = await _post(http, gw.v1, chat_body(stream=False))
    assert resp.status == 502
    assert json_error(body)["message"] == "Model overloaded."


@pytest.mark.parametrize(
    "coalesced",
    [
        pytest.param(False, id="error-in-a-later-chunk"),
        pytest.param(True, id="error-in-the-same-chunk-as-the-first-events"),
    ],
)
async def test_error_after_good_events_is_reported_the_same_however_chunked(
    gated: GatedUpstream, http: aiohttp.ClientSession, coalesced: bool
) -> None:
    """The first event is a good one, so headers commit to 200; the later error becomes the
    final event. The client's view must not depend on how TCP happened to cut the bytes."""
    good = openai_stream(["a", "b"], done=False)[:-1]
    bad = sse({"error": {"message": "engine died", "type": "server_error"}})
    if coalesced:
        script, gates = gated_script([b"".join([*good, bad])])
    else:
        script, gates = gated_script([*good, bad], len(good))
    gated.queue(script)
    async with (
        run_gateway(config_for(gated)) as gw,
        http.post(gw.v1 + CHAT, json=chat_body()) as resp,
    ):
        got = b""
        if gates:
            async with asyncio.timeout(BOUND):
                got = await resp.content.readexactly(len(b"".join(good)))
            gates[0].set()
        async with asyncio.timeout(BOUND):
            raw = got + await resp.content.read()
    assert resp.status == 200
    assert split_events(raw)[:-1] == good
    assert final_error(raw)["message"] == "engine died"
