"""Request body checks: validate_body's rules and read_json_body over a real aiohttp server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from gateway.context import Endpoint
from gateway.errors import GatewayError
from gateway.validation import read_json_body, validate_body

MSGS = [{"role": "user", "content": "hi"}]


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSGS, **fields}


def _reject(endpoint: Endpoint, body: dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        validate_body(endpoint, body)
    assert info.value.status == 400
    assert info.value.type == "invalid_request_error"
    return info.value


# --- validate_body -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        (Endpoint.CHAT, _chat()),
        (Endpoint.CHAT, _chat(stream=True, max_tokens=1, stream_options={"include_usage": True})),
        (Endpoint.CHAT, _chat(stream=None, max_tokens=None, unknown_field=[1, 2])),
        (Endpoint.CHAT, _chat(max_completion_tokens=5)),
        (Endpoint.CHAT, {"model": "m", "messages": [{"role": "system"}, {"role": "user"}]}),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": "Say hi"}),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": ["a", "b"], "stream": False}),
        (Endpoint.EMBEDDINGS, {"model": "m", "input": "text"}),
        (Endpoint.EMBEDDINGS, {"model": "m", "input": [[1, 2, 3]]}),
    ],
)
def test_valid_bodies_pass(endpoint: Endpoint, body: dict[str, Any]) -> None:
    before = orjson.dumps(body)
    validate_body(endpoint, body)
    assert orjson.dumps(body) == before  # nothing is changed


@pytest.mark.parametrize("model", [None, "", 7, ["m"], True])
def test_model_is_required_non_empty_string(model: Any) -> None:
    body = _chat(model=model)
    assert _reject(Endpoint.CHAT, body).param == "model"


def test_missing_model_is_rejected() -> None:
    err = _reject(Endpoint.EMBEDDINGS, {"input": "x"})
    assert err.param == "model"
    assert "`model`" in err.message


def test_stream_true_is_accepted() -> None:
    validate_body(
        Endpoint.CHAT, orjson.loads(b'{"model":"m","messages":[{"role":"u"}],"stream":true}')
    )


@pytest.mark.parametrize("stream", [1, 0, "true", "yes", [True]])
def test_stream_must_be_a_boolean(stream: Any) -> None:
    err = _reject(Endpoint.CHAT, _chat(stream=stream))
    assert err.param == "stream"
    assert err.code == "invalid_type"


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [True, False, 1.5, "10", [10]])
def test_token_limits_must_be_integers(name: str, value: Any) -> None:
    err = _reject(Endpoint.CHAT, _chat(**{name: value}))
    assert err.param == name
    assert err.code == "invalid_type"


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, -1])
def test_token_limits_must_be_at_least_one(name: str, value: int) -> None:
    err = _reject(Endpoint.CHAT, _chat(**{name: value}))
    assert err.param == name
    assert err.code == "invalid_value"


@pytest.mark.parametrize("name", ["temperature", "top_p"])
@pytest.mark.parametrize("value", ["0.7", True, [0.7], {"value": 1}])
def test_sampling_numbers_must_be_numbers(name: str, value: Any) -> None:
    err = _reject(Endpoint.CHAT, _chat(**{name: value}))
    assert err.param == name
    assert err.code == "invalid_type"


@pytest.mark.parametrize("name", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [0, 1, 0.7, 2.5, -1, None])
def test_sampling_numbers_pass_through_unchecked_for_range(name: str, value: Any) -> None:
    validate_body(Endpoint.CHAT, _chat(**{name: value}))


def test_stream_options_must_be_an_object() -> None:
    err = _reject(Endpoint.CHAT, _chat(stream_options=True))
    assert err.param == "stream_options"


@pytest.mark.parametrize("messages", [None, "hi", {"role": "user"}])
def test_chat_messages_must_be_a_list(messages: Any) -> None:
    body: dict[str, Any] = {"model": "m"}
    if messages is not None:
        body["messages"] = messages
    assert _reject(Endpoint.CHAT, body).param == "messages"


def test_chat_messages_must_not_be_empty() -> None:
    err = _reject(Endpoint.CHAT, _chat(messages=[]))
    assert err.param == "messages"
    assert "at least one" in err.message


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (["hello"], "messages[0]"),
        ([{"content": "no role"}], "messages[0]"),
        ([{"role": "user"}, {"role": 3}], "messages[1]"),
        ([{"role": "user"}, {"role": "user"}, None], "messages[2]"),
    ],
)
def test_chat_messages_must_be_objects_with_string_role(messages: Any, param: str) -> None:
    assert _reject(Endpoint.CHAT, _chat(messages=messages)).param == param


def test_completions_require_prompt() -> None:
    assert _reject(Endpoint.COMPLETIONS, {"model": "m"}).param == "prompt"


def test_completions_do_not_require_messages() -> None:
    validate_body(Endpoint.COMPLETIONS, {"model": "m", "prompt": ""})


def test_embeddings_require_input() -> None:
    assert _reject(Endpoint.EMBEDDINGS, {"model": "m", "prompt": "x"}).param == "input"


def test_model_is_checked_before_endpoint_fields() -> None:
    assert _reject(Endpoint.CHAT, {"messages": []}).param == "model"


# --- read_json_body over real HTTP -----------------------------------------------------------

LIMIT = 64


async def _echo(request: web.Request) -> web.Response:
    try:
        body = await read_json_body(request, LIMIT)
    except GatewayError as err:
        return err.to_response()
    return web.json_response({"got": body})


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> TestClient[web.Request, web.Application]:
    app = web.Application()
    app.router.add_post("/", _echo)
    return await aiohttp_client(app)


async def _error_of(resp: Any) -> dict[str, Any]:
    payload = await resp.json()
    assert isinstance(payload, dict)
    error = payload["error"]
    assert isinstance(error, dict)
    return error


async def test_json_object_is_returned(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.post(
        "/", data=b'{"model":"m"}', headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200
    assert await resp.json() == {"got": {"model": "m"}}


@pytest.mark.parametrize(
    "ctype", ["application/json; charset=utf-8", "application/vnd.api+json", "Application/JSON"]
)
async def test_json_content_types_are_accepted(
    client: TestClient[web.Request, web.Application], ctype: str
) -> None:
    resp = await client.post("/", data=b"{}", headers={"Content-Type": ctype})
    assert resp.status == 200


async def test_missing_content_type_is_accepted(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.post("/", data=b'{"a":1}', skip_auto_headers=["Content-Type"])
    assert resp.status == 200
    assert await resp.json() == {"got": {"a": 1}}


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded"])
async def test_non_json_content_type_is_415(
    client: TestClient[web.Request, web.Application], ctype: str
) -> None:
    resp = await client.post("/", data=b'{"a":1}', headers={"Content-Type": ctype})
    assert resp.status == 415
    error = await _error_of(resp)
    assert error["code"] == "unsupported_media_type"
    assert ctype in error["message"]


async def test_body_over_limit_with_content_length_is_413(
    client: TestClient[web.Request, web.Application],
) -> None:
    body = orjson.dumps({"pad": "x" * LIMIT})
    resp = await client.post("/", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 413
    error = await _error_of(resp)
    assert error["code"] == "request_too_large"
    assert str(LIMIT) in error["message"]


async def test_body_over_limit_chunked_is_413(
    client: TestClient[web.Request, web.Application],
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"pad": "'
        for _ in range(10):
            yield b"x" * 16
        yield b'"}'

    resp = await client.post("/", data=chunks(), headers={"Content-Type": "application/json"})
    assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
    assert resp.status == 413
    assert (await _error_of(resp))["code"] == "request_too_large"


async def test_body_exactly_at_limit_is_accepted(
    client: TestClient[web.Request, web.Application],
) -> None:
    prefix, suffix = b'{"p":"', b'"}'
    body = prefix + b"x" * (LIMIT - len(prefix) - len(suffix)) + suffix
    assert len(body) == LIMIT
    resp = await client.post("/", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 200


async def test_chunked_body_under_limit_is_accepted(
    client: TestClient[web.Request, web.Application],
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"a":'
        yield b"1}"

    resp = await client.post("/", data=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status == 200
    assert await resp.json() == {"got": {"a": 1}}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"a": "\xff\xfe"}', "not valid UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"", "empty"),
    ],
)
async def test_bad_bodies_are_400(
    client: TestClient[web.Request, web.Application], body: bytes, needle: str
) -> None:
    resp = await client.post("/", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    error = await _error_of(resp)
    assert needle in error["message"]
    assert error["type"] == "invalid_request_error"
