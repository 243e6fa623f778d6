"""Property tests: whatever body a client sends, the gateway answers with a 4xx, never a crash.

From the raw bytes to what goes upstream: `read_json_body` (bytes -> JSON object),
`validate_body`, the Anthropic dialect's `admit` (for /v1/messages), and the request
translations for each upstream kind (OpenAI body as is, Anthropic Messages, Ollama chat and
generate), ending with the `orjson.dumps` that puts the body on the wire. Each step may
refuse with a `GatewayError` whose status is 4xx; any other exception would be a 500 and a
traceback in the log.
"""

from __future__ import annotations

import asyncio
import string
from collections.abc import Callable, Coroutine
from typing import Any
from unittest import mock

import orjson
import pytest
from aiohttp import StreamReader
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.config import DemoUpstream
from gateway.context import Endpoint, RequestContext
from gateway.dialects import DIALECTS
from gateway.errors import GatewayError
from gateway.translate.anthropic_openai import chat_request_to_messages
from gateway.translate.ollama_openai import chat_request_to_ollama, completion_request_to_ollama
from gateway.upstreams.demo import Demo
from gateway.validation import read_json_body, validate_body

LIMIT = 4096
_DEMO = Demo("demo", DemoUpstream(kind="demo", ttft_ms=0, itl_ms=0))
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# ----- JSON values as orjson.loads can produce them ----------------------------------------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT
)
JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=16,
)


_MOSTLY = st.sampled_from([True] * 9 + [False])
# One draw per example: a clean body, junk only inside messages and blocks (so it gets past
# the top-level checks), or junk anywhere.
_JUNK_MODE = st.shared(st.sampled_from(["clean", "deep", "anywhere"]), key="junk-mode")


def _or_junk(strategy: st.SearchStrategy[Any], *, top: bool = False) -> st.SearchStrategy[Any]:
    """The plausible shape, or sometimes any JSON value in its place (per the junk mode)."""
    junk = st.one_of(strategy, strategy, JSON)
    allowed = ("anywhere",) if top else ("deep", "anywhere")
    return _JUNK_MODE.flatmap(lambda mode: junk if mode in allowed else strategy)


_URLS = st.sampled_from(
    ["https://x/y.png", "data:image/png;base64,AAAA", "data:,", "data:image/png,x", "file:///etc"]
)
_SOURCE = st.fixed_dictionaries(
    {
        "type": _or_junk(st.sampled_from(["base64", "url"])),
        "media_type": _or_junk(st.sampled_from(["image/png", "text/plain"])),
        "data": _or_junk(_TEXT),
        "url": _or_junk(_URLS),
    }
)
# Each block type with the fields it needs (OpenAI parts, then Anthropic blocks).
_PART_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "text": {"text": _TEXT},
    "image_url": {"image_url": st.fixed_dictionaries({"url": _or_junk(_URLS)})},
    "input_audio": {"input_audio": JSON},
    "image": {"source": _SOURCE},
    "tool_use": {"id": _TEXT, "name": _TEXT, "input": st.dictionaries(_TEXT, JSON, max_size=2)},
    "tool_result": {"tool_use_id": _TEXT, "content": _TEXT | st.lists(JSON, max_size=2)},
    "document": {"source": _SOURCE},
    "thinking": {"thinking": _TEXT, "signature": _TEXT},
}


@st.composite
def content_parts(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["text"] * 4 + sorted(_PART_FIELDS)))
    part: dict[str, Any] = {"type": draw(_or_junk(st.just(kind)))}
    for key, value in _PART_FIELDS[kind].items():
        if draw(_MOSTLY):
            part[key] = draw(_or_junk(value))
    return part


@st.composite
def tool_calls(draw: st.DrawFn) -> dict[str, Any]:
    function = st.fixed_dictionaries(
        {
            "name": _or_junk(_TEXT),
            "arguments": _or_junk(st.sampled_from(["{}", '{"a":1}', "[", "", "[1]"])),
        }
    )
    return {
        "id": draw(_or_junk(_TEXT)),
        "type": draw(_or_junk(st.just("function"))),
        "function": draw(_or_junk(function)),
    }


_OPENAI_ROLES = ["user", "assistant", "system", "developer", "tool"]


@st.composite
def messages(draw: st.DrawFn, anthropic: bool = False) -> dict[str, Any]:
    roles = ["user", "assistant"] if anthropic else _OPENAI_ROLES
    message: dict[str, Any] = {"role": draw(_or_junk(st.sampled_from(roles)))}
    if draw(_MOSTLY):
        content = _TEXT | st.lists(content_parts(), min_size=1, max_size=3)
        message["content"] = draw(_or_junk(content))
    if not anthropic and draw(st.integers(0, 3)) == 0:
        message["tool_calls"] = draw(_or_junk(st.lists(tool_calls(), max_size=2)))
    if not anthropic and draw(st.integers(0, 3)) == 0:
        message["tool_call_id"] = draw(_or_junk(_TEXT))
    return message


_TOOLS = st.lists(
    st.fixed_dictionaries(
        {
            "type": _or_junk(st.just("function")),
            "function": _or_junk(
                st.fixed_dictionaries({"name": _or_junk(_TEXT), "parameters": JSON})
            ),
        }
    ),
    max_size=2,
)
_OPTIONAL: dict[str, st.SearchStrategy[Any]] = {
    "stream": _or_junk(st.booleans(), top=True),
    "max_tokens": _or_junk(st.integers(1, 5000), top=True),
    "max_completion_tokens": _or_junk(st.integers(1, 5000), top=True),
    "temperature": _or_junk(st.floats(0, 2), top=True),
    "top_p": _or_junk(st.floats(0, 1), top=True),
    "top_k": _or_junk(st.integers(-1, 100)),
    "n": _or_junk(st.integers(0, 4)),
    "stop": _or_junk(_TEXT | st.lists(_TEXT, max_size=3)),
    "stream_options": _or_junk(st.fixed_dictionaries({"include_usage": JSON})),
    "tools": _or_junk(_TOOLS),
    "tool_choice": _or_junk(st.sampled_from(["auto", "none", "required", "any"])),
    "response_format": _or_junk(st.sampled_from([{"type": "json_object"}, {"type": "text"}])),
    "system": _or_junk(_TEXT | st.lists(content_parts(), max_size=2)),
    "seed": _or_junk(st.integers(-(2**63), 2**63 - 1)),
    "user": JSON,
    "metadata": JSON,
    "stop_sequences": _or_junk(st.lists(_TEXT, max_size=2)),
    "prompt": _or_junk(_TEXT | st.lists(_TEXT, max_size=2)),
    "suffix": JSON,
    "input": JSON,
}


@st.composite
def request_bodies(draw: st.DrawFn, anthropic: bool = False) -> dict[str, Any]:
    """A request body as orjson.loads would return it: plausible keys, junk anywhere."""
    body: dict[str, Any] = {}
    if draw(_MOSTLY):
        models = st.sampled_from(["m", "gpt-4o", "ollama/llama3"])
        body["model"] = draw(_or_junk(models, top=True))
    if draw(_MOSTLY):
        turns = st.lists(messages(anthropic), min_size=1, max_size=4)
        body["messages"] = draw(_or_junk(turns, top=True))
    if anthropic and draw(_MOSTLY):
        body["max_tokens"] = draw(_or_junk(st.integers(1, 5000), top=True))
    for key in draw(st.lists(st.sampled_from(sorted(_OPTIONAL)), max_size=6, unique=True)):
        body[key] = draw(_OPTIONAL[key])
    body.update(draw(st.dictionaries(_TEXT, JSON, max_size=2)))
    # What arrives has been through JSON: e.g. big ints come back as floats.
    loaded: dict[str, Any] = orjson.loads(orjson.dumps(body))
    return loaded


def assert_clean_refusal(err: GatewayError) -> None:
    assert 400 <= err.status < 500, (err.status, err.message)
    assert err.message
    orjson.dumps(err.body())


def _admitted(endpoint: Endpoint, client_format: str, body: dict[str, Any]) -> dict[str, Any]:
    """What the proxy's `_admit` does with a parsed body (minus auth and routing)."""
    validate_body(endpoint, body)
    ctx = RequestContext("req_fuzz", endpoint, client_format)
    return DIALECTS[client_format].admit(ctx, body)


def _translations(endpoint: Endpoint) -> list[Callable[[dict[str, Any]], dict[str, Any]]]:
    """How each upstream kind builds its outgoing body in `Upstream.open`."""
    out: list[Callable[[dict[str, Any]], dict[str, Any]]] = [lambda body: body]  # openai, azure
    if endpoint is Endpoint.CHAT:
        out.append(lambda body: chat_request_to_messages(body, body["model"], 4096))
        out.append(lambda body: chat_request_to_ollama(body, body["model"]))
    elif endpoint is Endpoint.COMPLETIONS:
        out.append(lambda body: completion_request_to_ollama(body, body["model"]))
    return out


def run_pipeline(
    endpoint: Endpoint,
    client_format: str,
    body: dict[str, Any],
    run: Callable[[Coroutine[Any, Any, Any]], Any] = asyncio.run,
) -> None:
    """Every step a parsed body goes through before it is sent; only 4xx refusals allowed.

    `run` runs a coroutine to completion. Shared with tests/fuzz/fuzz_request.py.
    """
    try:
        admitted = _admitted(endpoint, client_format, body)
    except GatewayError as err:
        assert_clean_refusal(err)
        return
    outgoing = {**admitted, "model": "upstream-model"}  # as Proxy._outgoing builds it
    orjson.dumps(outgoing)
    chat_endpoint = Endpoint.CHAT if client_format == "anthropic" else endpoint
    for translate in _translations(chat_endpoint):
        try:
            orjson.dumps(translate(outgoing))
        except GatewayError as err:
            assert_clean_refusal(err)
    ctx = RequestContext("req_fuzz", chat_endpoint)
    try:  # the embedded demo model answers from the body itself
        run(_DEMO.open(ctx, outgoing, {}))
    except GatewayError as err:
        assert_clean_refusal(err)


@FUZZ
@given(request_bodies(), st.sampled_from(list(Endpoint)))
@example(  # found by this test: the demo model joined non-string texts (a 500)
    {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
    Endpoint.CHAT,
)
def test_any_openai_body_is_accepted_or_refused_with_a_4xx(
    body: dict[str, Any], endpoint: Endpoint
) -> None:
    run_pipeline(endpoint, "openai", body)


@FUZZ
@given(request_bodies(anthropic=True))
@example({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [5]}]})
@example({"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": 5}], "messages": []})
@example(  # found by this test: a non-string text in an assistant turn was a 500
    {
        "model": "m",
        "max_tokens": 1,
        "messages": [{"role": "assistant", "content": [{"type": "text", "text": None}]}],
    }
)
def test_any_anthropic_body_is_accepted_or_refused_with_a_4xx(body: dict[str, Any]) -> None:
    run_pipeline(Endpoint.CHAT, "anthropic", body)


# ----- raw bytes: read_json_body -------------------------------------------------------------


async def read_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """`read_json_body` on a request carrying `raw` (shared with tests/fuzz/fuzz_request.py)."""
    loop = asyncio.get_running_loop()
    payload = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=loop)
    payload.feed_data(raw)
    payload.feed_eof()
    headers = {"Content-Length": str(len(raw))}
    if content_type is not None:
        headers["Content-Type"] = content_type
    request = make_mocked_request("POST", "/v1/chat/completions", headers=headers, payload=payload)
    return await read_json_body(request, LIMIT)


_RAW = st.one_of(
    st.binary(max_size=300),
    request_bodies().map(orjson.dumps),
    JSON.map(orjson.dumps),
    # valid JSON, then damaged: cut short, a byte flipped, bytes inserted
    st.tuples(request_bodies().map(orjson.dumps), st.integers(0, 400), st.binary(max_size=4)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
    ),
    st.binary(min_size=LIMIT - 8, max_size=LIMIT + 8),
)
_CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(
        ["application/json", "application/json; charset=latin-1", "text/plain", "x/y+json", ""]
    ),
    st.text(string.printable.replace("\r", "").replace("\n", ""), max_size=30),
)


@FUZZ
@given(_RAW, _CONTENT_TYPES)
def test_any_bytes_are_a_json_object_or_a_4xx(raw: bytes, content_type: str | None) -> None:
    try:
        body = asyncio.run(read_body(raw, content_type))
    except GatewayError as err:
        assert_clean_refusal(err)
        return
    assert isinstance(body, dict)
    assert len(raw) <= LIMIT
    for endpoint in Endpoint:
        run_pipeline(endpoint, "openai", body)


@pytest.mark.parametrize(
    "raw",
    [b'{"a": "\\ud800"}', b'{"a": 1e999}', b"[" * 2000 + b"]" * 2000, b'{"a": NaN}'],
)
def test_json_that_python_would_accept_but_orjson_refuses_is_400(raw: bytes) -> None:
    """Lone surrogates, infinities, deep nesting: refused at parse time, never later."""
    with pytest.raises(GatewayError) as info:
        asyncio.run(read_body(raw, "application/json"))
    assert info.value.status == 400
