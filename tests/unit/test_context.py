"""Request context: request ids, typed plugin state, usage accounting."""

from __future__ import annotations

import re
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.context import (
    Endpoint,
    Identity,
    RequestContext,
    StateKey,
    Timing,
    Usage,
    request_id_from,
    upstream_request_id,
)

GENERATED = re.compile(r"req_[0-9a-f]{32}")


# --- request_id_from -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    ["abc", "req_123", "0f8e-4a2b.trace:span_9", "A" * 128, "x", "a-b_c.d:e"],
)
def test_sane_request_ids_are_kept(header: str) -> None:
    assert request_id_from(header) == header


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "has space",
        "A" * 129,
        "line\nbreak",
        "\nleading",
        "trailing\n",
        "crlf\r\nX-Injected: 1",
        "tab\there",
        "semi;colon",
        "slash/path",
        "naïve",
        'quote"d',
    ],
)
def test_insane_request_ids_are_replaced(header: str | None) -> None:
    out = request_id_from(header)
    assert out != header
    assert GENERATED.fullmatch(out)


def test_generated_ids_are_unique() -> None:
    assert len({request_id_from(None) for _ in range(100)}) == 100


@settings(database=None)
@given(st.one_of(st.none(), st.text(st.characters(exclude_characters="\n"), max_size=200)))
def test_request_id_is_always_header_safe(header: str | None) -> None:
    # (a trailing "\n" is covered by test_insane_request_ids_are_replaced)
    out = request_id_from(header)
    assert re.fullmatch(r"[A-Za-z0-9._:\-]{1,128}", out)
    assert out == header or GENERATED.fullmatch(out)


# --- upstream_request_id -------------------------------------------------------------------


def test_a_generated_id_goes_upstream_as_its_own_uuid() -> None:
    request_id = request_id_from(None)
    out = upstream_request_id(request_id)
    assert uuid.UUID(out).version == 4
    assert out.replace("-", "") == request_id.removeprefix("req_")


@pytest.mark.parametrize(
    "client",
    [
        "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
        "3F2504E0-4F89-11D3-9A0C-0305E82C3301",
        "urn:uuid:3f2504e0-4f89-11d3-9a0c-0305e82c3301",
    ],
)
def test_a_client_uuid_goes_upstream_unchanged(client: str) -> None:
    assert upstream_request_id(client) == "3f2504e0-4f89-11d3-9a0c-0305e82c3301"


@settings(database=None)
@given(st.from_regex(r"[A-Za-z0-9._:\-]{1,128}", fullmatch=True))
def test_any_client_id_goes_upstream_as_a_stable_uuid4(client: str) -> None:
    out = upstream_request_id(client)
    assert str(uuid.UUID(out)) == out
    assert upstream_request_id(client) == out
    try:
        uuid.UUID(client.removeprefix("req_"))
    except ValueError:
        assert uuid.UUID(out).version == 4


def test_different_client_ids_go_upstream_as_different_uuids() -> None:
    assert upstream_request_id("client-42") != upstream_request_id("client-43")


# --- StateKey ------------------------------------------------------------------------------


def _ctx() -> RequestContext:
    return RequestContext("req_1", Endpoint.CHAT)


def test_state_get_returns_default_when_unset() -> None:
    key: StateKey[int] = StateKey("count")
    ctx = _ctx()
    assert ctx.get(key) is None
    assert ctx.get(key, 5) == 5


def test_state_set_then_get_and_require() -> None:
    key: StateKey[list[str]] = StateKey("seen")
    ctx = _ctx()
    value = ["a"]
    ctx.set(key, value)
    assert ctx.get(key) is value
    assert ctx.require(key) is value


def test_state_keys_are_distinct_by_identity_not_name() -> None:
    first: StateKey[str] = StateKey("same")
    second: StateKey[str] = StateKey("same")
    ctx = _ctx()
    ctx.set(first, "one")
    assert ctx.get(second) is None
    ctx.set(second, "two")
    assert ctx.require(first) == "one"
    assert ctx.require(second) == "two"


def test_state_is_per_request() -> None:
    key: StateKey[int] = StateKey("n")
    a, b = _ctx(), _ctx()
    a.set(key, 1)
    assert b.get(key) is None


def test_require_missing_key_raises_key_error_naming_it() -> None:
    key: StateKey[int] = StateKey("budget")
    with pytest.raises(KeyError, match="budget"):
        _ctx().require(key)


def test_state_key_repr() -> None:
    assert repr(StateKey("latency")) == "StateKey('latency')"


def test_plugin_state_is_not_in_context_repr() -> None:
    key: StateKey[str] = StateKey("k")
    ctx = _ctx()
    ctx.set(key, "private-value")
    assert "private-value" not in repr(ctx)


def test_context_defaults() -> None:
    ctx = _ctx()
    assert ctx.status == 200
    assert ctx.outcome is None
    assert ctx.identity == Identity()
    assert ctx.identity.team == "anonymous"
    assert ctx.usage == Usage()
    assert isinstance(ctx.timing, Timing)
    assert ctx.timing.ended is None
    assert ctx.body == {}


# --- Usage ---------------------------------------------------------------------------------


def test_usage_from_upstream_with_total() -> None:
    usage = Usage()
    usage.set_from_upstream({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 5, 15)
    assert usage.source == "upstream"


def test_usage_computes_total_when_missing() -> None:
    usage = Usage()
    usage.set_from_upstream({"prompt_tokens": 7, "completion_tokens": 3})
    assert usage.total_tokens == 10


def test_usage_takes_the_latest_cumulative_values() -> None:
    usage = Usage()
    usage.set_from_upstream({"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11})
    usage.set_from_upstream({"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14})
    usage.set_from_upstream({"prompt_tokens": 10, "completion_tokens": 9})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 9, 19)


def test_usage_partial_update_keeps_earlier_fields() -> None:
    usage = Usage()
    usage.set_from_upstream({"prompt_tokens": 12})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (12, None, None)
    usage.set_from_upstream({"completion_tokens": 2})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (12, 2, 14)


def test_usage_ignores_non_integer_values() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    usage.set_from_upstream({"prompt_tokens": "many", "completion_tokens": None})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 4, 7)


def test_endpoint_values() -> None:
    assert Endpoint.CHAT.value == "chat.completions"
    assert Endpoint("embeddings") is Endpoint.EMBEDDINGS
