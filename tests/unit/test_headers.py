"""Which client headers are forwarded upstream."""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import parse_config
from gateway.headers import HOP_BY_HOP, SSE_RESPONSE_HEADERS, upstream_headers
from gateway.runtime import build_upstream

DROPPED = [
    "Authorization",
    "x-api-key",
    "api-key",
    "Cookie",
    "Host",
    "Content-Length",
    "Connection",
    "Keep-Alive",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
    "Proxy-Authorization",
    "Forwarded",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Real-IP",
]


def _lower_keys(headers: dict[str, str]) -> set[str]:
    return {k.lower() for k in headers}


@pytest.mark.parametrize("name", DROPPED)
def test_credentials_framing_and_hop_by_hop_are_dropped(name: str) -> None:
    out = upstream_headers(CIMultiDict({name: "secret-or-framing", "User-Agent": "ua"}), "r1")
    assert name.lower() not in _lower_keys(out)
    assert "secret-or-framing" not in out.values()
    assert out["User-Agent"] == "ua"


@pytest.mark.parametrize("name", [n.upper() for n in DROPPED] + [n.lower() for n in DROPPED])
def test_dropping_is_case_insensitive(name: str) -> None:
    out = upstream_headers({name: "v"}, "r1")
    assert _lower_keys(out) == {"x-request-id", "content-type"}


def test_end_to_end_headers_are_kept() -> None:
    client = CIMultiDict(
        {
            "OpenAI-Beta": "assistants=v2",
            "User-Agent": "OpenAI/Python 1.40",
            "Accept": "text/event-stream",
            "X-Custom": "yes",
            "Authorization": "Bearer sk-client-key-123456",
        }
    )
    out = upstream_headers(client, "r1")
    assert out == {
        "OpenAI-Beta": "assistants=v2",
        "User-Agent": "OpenAI/Python 1.40",
        "Accept": "text/event-stream",
        "X-Custom": "yes",
        "X-Request-Id": "r1",
        "Content-Type": "application/json",
    }


def test_request_id_and_content_type_are_set_by_the_gateway() -> None:
    client = CIMultiDict(
        {"X-Request-Id": "client-chosen", "Content-Type": "text/plain", "Content-Encoding": "gzip"}
    )
    out = upstream_headers(client, "req_gateway")
    assert out["X-Request-Id"] == "req_gateway"
    assert out["Content-Type"] == "application/json"
    assert _lower_keys(out) == {"x-request-id", "content-type"}


def test_request_id_header_can_be_renamed() -> None:
    client = CIMultiDict(
        {"X-Request-Id": "client-chosen", "x-correlation-id": "client-too", "X-Kept": "1"}
    )
    out = upstream_headers(client, "the-id", "X-Correlation-Id")
    assert out == {"X-Kept": "1", "X-Correlation-Id": "the-id", "Content-Type": "application/json"}


def test_request_id_header_can_be_left_out() -> None:
    client = CIMultiDict({"X-Request-Id": "client-chosen", "X-Kept": "1"})
    out = upstream_headers(client, "the-id", None)
    assert out == {"X-Kept": "1", "Content-Type": "application/json"}


def test_headers_listed_in_connection_are_dropped() -> None:
    client = CIMultiDict(
        {"Connection": "keep-alive, X-Hop-One ,x-hop-two", "X-Hop-One": "1", "X-HOP-TWO": "2"}
    )
    client["X-Kept"] = "3"
    out = upstream_headers(client, "r1")
    assert _lower_keys(out) == {"x-kept", "x-request-id", "content-type"}


def test_repeated_connection_headers_in_a_multidict() -> None:
    client: CIMultiDict[str] = CIMultiDict()
    client.add("Connection", "X-First")
    client.add("connection", "x-second, , X-Third")
    client.add("X-First", "1")
    client.add("X-Second", "2")
    client.add("x-third", "3")
    client.add("X-Fourth", "4")
    out = upstream_headers(CIMultiDictProxy(client), "r1")
    assert out == {"X-Fourth": "4", "X-Request-Id": "r1", "Content-Type": "application/json"}


def test_connection_listing_does_not_drop_everything_on_empty_tokens() -> None:
    out = upstream_headers(CIMultiDict({"Connection": " , ,", "X-Kept": "1"}), "r1")
    assert out["X-Kept"] == "1"


def test_headers_listed_in_connection_are_dropped_from_a_plain_dict() -> None:
    # The signature takes any Mapping; a plain dict spelled the usual way must work too.
    out = upstream_headers({"Connection": "X-Hop", "X-Hop": "1", "X-Kept": "2"}, "r1")
    assert "X-Hop" not in out
    assert out["X-Kept"] == "2"


def test_client_mapping_is_not_modified() -> None:
    client = CIMultiDict({"Authorization": "Bearer x", "X-A": "1"})
    upstream_headers(client, "r1")
    assert dict(client) == {"Authorization": "Bearer x", "X-A": "1"}


def test_hop_by_hop_set_covers_rfc_9110() -> None:
    assert {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"} <= (
        HOP_BY_HOP
    )
    assert all(name == name.lower() for name in HOP_BY_HOP)


def test_sse_response_headers() -> None:
    assert SSE_RESPONSE_HEADERS["Content-Type"].startswith("text/event-stream")
    assert SSE_RESPONSE_HEADERS["Cache-Control"] == "no-cache"
    assert SSE_RESPONSE_HEADERS["X-Accel-Buffering"] == "no"


_KINDS = [
    {"kind": "openai", "base_url": "http://h/v1"},
    {"kind": "azure", "endpoint": "https://r.openai.azure.com"},
    {"kind": "anthropic"},
    {"kind": "ollama"},
    {"kind": "demo"},
]


@pytest.mark.parametrize("upstream", _KINDS, ids=[k["kind"] for k in _KINDS])
@pytest.mark.parametrize("header", ["X-Trace-Id", None])
def test_every_upstream_kind_takes_its_request_id_header(
    upstream: dict[str, Any], header: str | None
) -> None:
    config = parse_config(
        {
            "upstreams": {"u": {**upstream, "request_id_header": header}},
            "routes": [{"model": "m", "upstream": "u"}],
        },
        {},
    )
    assert build_upstream("u", config.upstreams["u"]).request_id_header == header
