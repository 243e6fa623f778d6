"""OpenAI-shaped errors: sanitising, rendering, and mapping upstream error bodies."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import (
    GatewayError,
    bad_request,
    internal_error,
    sanitise_message,
    timeout_error,
    upstream_error,
)
from gateway.upstreams.errors import client_status, error_from_event, error_from_upstream

# --- sanitise_message ----------------------------------------------------------------------

SECRETS = [
    "sk-abcdefghijklmnop",
    "sk-proj-AbC_123-xyz789QRS",
    "sk-ant-api03-AbCdEfGh_ijkl-mnop",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_" + "A1b2C3d4" * 5,
    "gho_" + "z" * 36,
    "xoxb-1234567890-abcdefgh",
]


@pytest.mark.parametrize("secret", SECRETS)
def test_secrets_are_redacted(secret: str) -> None:
    out = sanitise_message(f"Incorrect API key provided: {secret}. See docs.")
    assert secret not in out
    assert "[redacted]" in out
    assert out.startswith("Incorrect API key provided: ")
    assert out.endswith(". See docs.")


def test_bearer_token_is_redacted() -> None:
    out = sanitise_message("header was Authorization: Bearer eyJhbGciOi.JIUzI1Ni-Isw_x")
    assert "eyJhbGciOi" not in out
    assert out == "header was Authorization: [redacted]"


def test_several_secrets_in_one_message() -> None:
    out = sanitise_message("a=sk-aaaaaaaaaaaa b=AKIAABCDEFGHIJKLMNOP")
    assert out == "a=[redacted] b=[redacted]"


def test_ordinary_text_is_unchanged() -> None:
    text = "The model `gpt-4o` does not exist or you do not have access to it (sk-short)."
    assert sanitise_message(text) == text


def test_long_messages_are_truncated() -> None:
    out = sanitise_message("x" * 10_000)
    assert len(out) == 500
    assert out.endswith("...")


def test_message_at_the_limit_is_kept_whole() -> None:
    assert sanitise_message("y" * 500) == "y" * 500


def test_secret_past_the_cut_is_still_redacted_before_truncation() -> None:
    secret = "sk-" + "s" * 600
    out = sanitise_message(secret)
    assert "sss" not in out
    assert out == "[redacted]"


def test_control_characters_are_removed() -> None:
    out = sanitise_message("line1\nline2\r\x00\x1b[31mred\x7f\ttab")
    assert out == "line1 line2   [31mred  tab"
    assert all(ch.isprintable() for ch in out)


@settings(database=None)
@given(st.text(max_size=2000))
def test_sanitised_output_is_short_and_printable(text: str) -> None:
    out = sanitise_message(text)
    assert len(out) <= 500
    assert all(ch.isprintable() for ch in out)


# --- GatewayError --------------------------------------------------------------------------


def test_body_shape() -> None:
    err = GatewayError(404, "No such model.", code="model_not_found", param="model")
    assert err.body() == {
        "error": {
            "message": "No such model.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert str(err) == "No such model."


def test_body_defaults_to_nulls() -> None:
    assert GatewayError(400, "m").body() == {
        "error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}
    }


def test_to_response_renders_json_with_headers() -> None:
    err = GatewayError(429, "slow", type="rate_limit_error", headers={"Retry-After": "3"})
    resp = err.to_response({"X-Request-Id": "r1"})
    assert resp.status == 429
    assert resp.content_type == "application/json"
    assert resp.headers["Retry-After"] == "3"
    assert resp.headers["X-Request-Id"] == "r1"
    assert isinstance(resp.body, bytes)
    assert orjson.loads(resp.body) == err.body()


def test_helpers() -> None:
    bad = bad_request("nope", param="x", code="c")
    assert (bad.status, bad.type, bad.param, bad.code) == (400, "invalid_request_error", "x", "c")
    up = upstream_error("down")
    assert (up.status, up.type, up.code) == (502, "upstream_error", "upstream_error")
    slow = timeout_error("idle")
    assert (slow.status, slow.type, slow.code) == (504, "timeout_error", "upstream_idle_timeout")
    assert "idle" in slow.message
    bug = internal_error()
    assert (bug.status, bug.code) == (500, "internal_error")


# --- error_from_upstream -------------------------------------------------------------------


def _upstream(status: int, payload: Any) -> GatewayError:
    return error_from_upstream(status, orjson.dumps(payload))


def test_openai_error_shape() -> None:
    err = _upstream(
        400,
        {
            "error": {
                "message": "This model's maximum context length is 8192 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    )
    assert err.status == 400
    assert err.message == "This model's maximum context length is 8192 tokens."
    assert err.type == "invalid_request_error"


def test_vllm_error_shape() -> None:
    payload = {"object": "error", "message": "max_tokens too large", "type": "BadRequestError"}
    err = _upstream(400, {**payload, "param": None, "code": 400})
    assert err.status == 400
    assert err.message == "max_tokens too large"
    assert err.type == "BadRequestError"


def test_tgi_error_shape() -> None:
    err = _upstream(
        422, {"error": "Input validation error: inputs too long", "error_type": "validation"}
    )
    assert err.status == 422
    assert err.message == "Input validation error: inputs too long"
    assert err.type == "validation"


def test_anthropic_error_shape() -> None:
    payload = {"type": "error", "error": {"type": "not_found_error", "message": "model: x"}}
    err = _upstream(404, payload)
    assert err.status == 404
    assert err.message == "model: x"
    assert err.type == "not_found_error"


@pytest.mark.parametrize("body", [b"<html>Bad Gateway</html>", b"", b"[1,2]", b'{"detail": 1}'])
def test_unrecognised_bodies_get_a_generic_message(body: bytes) -> None:
    err = error_from_upstream(503, body)
    assert err.status == 502
    assert err.message == "The upstream answered HTTP 503."
    assert err.type == "upstream_error"
    assert err.code == "upstream_error"


def test_non_json_4xx_keeps_status() -> None:
    err = error_from_upstream(404, b"Not Found")
    assert err.status == 404
    assert err.message == "The upstream answered HTTP 404."


@pytest.mark.parametrize("status", [401, 403, 407])
def test_auth_failures_become_502_without_upstream_text(status: int) -> None:
    leaked = "Incorrect API key provided: sk-gatewaykey123456. Ask admin@corp."
    err = _upstream(status, {"error": {"message": leaked, "type": "invalid_request_error"}})
    assert err.status == 502
    assert err.code == "upstream_auth_error"
    assert err.type == "upstream_error"
    assert "Incorrect API key" not in err.message
    assert "admin@corp" not in err.message
    assert str(status) in err.message


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_upstream_5xx_becomes_502(status: int) -> None:
    err = _upstream(status, {"error": {"message": "engine overloaded", "type": "server_error"}})
    assert err.status == 502
    assert err.type == "upstream_error"
    assert err.code == "upstream_error"
    assert err.message == "engine overloaded"


def test_429_stays_429() -> None:
    err = _upstream(429, {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}})
    assert err.status == 429
    assert err.type == "rate_limit_error"
    assert err.message == "Rate limit reached"


def test_upstream_messages_are_sanitised() -> None:
    err = _upstream(400, {"error": {"message": "bad key sk-abcdefghijklmnop\n" + "z" * 900}})
    assert "sk-abcdefghijklmnop" not in err.message
    assert "\n" not in err.message
    assert len(err.message) <= 500


@pytest.mark.parametrize(
    ("upstream", "client"),
    [
        (400, 400),
        (404, 404),
        (422, 422),
        (429, 429),
        (401, 502),
        (403, 502),
        (407, 502),
        (500, 502),
        (301, 502),
        (200, 502),
    ],
)
def test_client_status(upstream: int, client: int) -> None:
    assert client_status(upstream) == client


# --- error_from_event ----------------------------------------------------------------------

CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
}


@pytest.mark.parametrize(
    "payload",
    [
        CHUNK,
        {**CHUNK, "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
        {"error": None, **CHUNK},
        "[DONE]",
        None,
        [1, 2],
    ],
)
def test_error_from_event_ignores_normal_chunks(payload: Any) -> None:
    assert error_from_event(payload) is None


def test_in_band_openai_error_event() -> None:
    err = error_from_event(
        {"error": {"message": "overloaded", "type": "server_error", "code": 503}}
    )
    assert err is not None
    assert err.status == 502
    assert err.message == "overloaded"
    assert err.type == "upstream_error"


def test_in_band_vllm_error_keeps_4xx() -> None:
    err = error_from_event(
        {"object": "error", "message": "bad input", "type": "BadRequestError", "code": 400}
    )
    assert err is not None
    assert err.status == 400
    assert err.type == "BadRequestError"


def test_in_band_error_without_code_is_502() -> None:
    err = error_from_event({"error": "stream broke sk-abcdefghijklmnop"})
    assert err is not None
    assert err.status == 502
    assert "sk-abcdefghijklmnop" not in err.message
