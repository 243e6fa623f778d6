"""The replay cache's pure parts: what is deterministic, the key, the mark, the entry
codec and the memory store's bounds."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.config import ConfigError, RouteConfig, parse_config
from gateway.context import Endpoint, RequestContext
from gateway.replay.cache import cache_directives
from gateway.replay.config import ReplayConfig
from gateway.replay.key import cacheable, deterministic, request_key
from gateway.replay.marker import mark_body, mark_events
from gateway.replay.store import Entry, MemoryStore, StoredEvent, decode, encode
from gateway.sse import SSEEvent


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "n": 3}, True),
        ({"seed": 1, "temperature": 1.2}, True),
        ({}, False),
        ({"temperature": 0.7}, False),
        ({"temperature": True}, False),  # a bool is no number
        ({"seed": True}, False),
        ({"seed": "1"}, False),
        ({"seed": 1, "temperature": 0.5, "n": 2}, False),
    ],
)
def test_deterministic(body: dict[str, Any], expected: bool) -> None:
    assert deterministic(body) is expected


def _ctx(body: dict[str, Any], team: str = "a", **fields: Any) -> RequestContext:
    ctx = RequestContext("r", fields.pop("endpoint", Endpoint.CHAT), **fields)
    ctx.body, ctx.model = body, "m"
    ctx.route = RouteConfig(model="m", upstream="u", upstream_model="gpt")
    ctx.identity.team = team
    return ctx


def test_the_key_follows_what_shapes_the_answer() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "tools": []}
    base = request_key(_ctx(body), shared=False)
    reordered = dict(reversed(list(body.items())))
    assert request_key(_ctx(reordered), shared=False) == base  # canonical: sorted keys
    assert request_key(_ctx({**body, "max_tokens": 5}), shared=False) != base
    assert request_key(_ctx(body, team="b"), shared=False) != base
    assert request_key(_ctx(body, team="b"), shared=True) == request_key(_ctx(body), shared=True)
    assert request_key(_ctx(body, stream=True), shared=False) != base
    assert request_key(_ctx(body, client_format="anthropic"), shared=False) != base


def test_embeddings_are_not_cacheable() -> None:
    assert not cacheable(_ctx({"input": "x", "temperature": 0}, endpoint=Endpoint.EMBEDDINGS))


def test_cache_control_directives() -> None:
    assert cache_directives({"Cache-Control": "No-Cache, max-age=0"}) == {"no-cache", "max-age"}
    assert cache_directives({}) == set()


def _stored(data: bytes | None, event: str | None = None, offset: float = 0.0) -> StoredEvent:
    return StoredEvent(offset, event, data, SSEEvent(data, event=event).encode())


def test_the_last_usage_event_is_marked_and_nothing_else() -> None:
    usage = b'{"choices":[],"usage":{"total_tokens":3},"x_sluice":{"usage_source":"local"}}'
    events = [_stored(b'{"usage":{"total_tokens":1}}'), _stored(usage), _stored(b"[DONE]")]
    out = mark_events(events)
    assert out[0] == events[0]
    assert out[2] == events[2]
    marked = orjson.loads(out[1].raw.removeprefix(b"data: "))
    assert marked["x_sluice"] == {"usage_source": "cache"}  # the local mark is overridden
    anthropic = _stored(b'{"type":"message_delta","usage":{"output_tokens":2}}', "message_delta")
    (done,) = mark_events([anthropic])
    assert done.raw.startswith(b"event: message_delta\ndata: {")
    assert b'"x_sluice":{"usage_source":"cache"}' in done.raw
    plain = [_stored(b'{"choices":[{"delta":{"content":"usage"}}]}')]
    assert mark_events(plain) == plain


def test_a_unary_body_is_marked() -> None:
    assert orjson.loads(mark_body(b'{"id":"x"}')) == {
        "id": "x",
        "x_sluice": {"usage_source": "cache"},
    }
    assert mark_body(b"[1]") == b"[1]"


def test_entries_survive_the_codec() -> None:
    stream = Entry(
        True,
        (_stored(b"{}", offset=0.0), _stored(None, "ping", 0.5), _stored(b"x\ny", "e", 1.25)),
        response_model="gpt",
    )
    assert decode(encode(stream)) == stream
    unary = Entry(False, body=b'{"a":1}')
    assert decode(encode(unary)) == unary
    assert decode(b"nonsense") is None
    assert decode(encode(stream)[:-1]) is None


async def test_the_memory_store_is_bounded_in_entries_and_bytes() -> None:
    store = MemoryStore(ReplayConfig(max_entries=3, max_bytes=1024))
    big = Entry(False, body=b"x" * 400)
    for key in "abc":
        assert await store.put(key, big)
    assert len(store) == 2
    assert store.bytes == 800
    assert await store.get("a") is None
    assert await store.get("b") == big
    assert not await store.put("huge", Entry(False, body=b"x" * 2000))
    small = Entry(False, body=b"y")
    await store.put("d", small)
    await store.put("e", small)
    assert await store.get("c") is None  # b was used more recently than c
    assert await store.get("b") == big


async def test_the_memory_store_forgets_after_the_ttl() -> None:
    store = MemoryStore(ReplayConfig(ttl_seconds=1e-9))
    await store.put("a", Entry(False, body=b"x"))
    assert await store.get("a") is None
    assert len(store) == 0
    assert store.bytes == 0


@pytest.mark.parametrize(
    ("replay", "message"),
    [
        ({"pacing": "fast"}, "routes[0].replay.pacing: Input should be 'instant' or 'original'"),
        ({"nope": 1}, "routes[0].replay.nope: unknown key"),
        ("yes", "routes[0].replay: Input should be a valid dictionary"),
    ],
)
def test_a_bad_route_opt_in_names_its_key(replay: Any, message: str) -> None:
    config = {
        "upstreams": {"d": {"kind": "demo"}},
        "routes": [{"model": "m", "upstream": "d", "replay": replay}],
    }
    with pytest.raises(ConfigError) as raised:
        parse_config(config, {})
    assert message in str(raised.value)


@pytest.mark.parametrize(("replay", "on"), [(True, True), (False, False), ({}, True)])
def test_replay_true_is_every_default(replay: Any, on: bool) -> None:
    route = RouteConfig.model_validate({"model": "m", "upstream": "d", "replay": replay})
    assert (route.replay is not None) is on
    if route.replay is not None:
        assert (route.replay.pacing, route.replay.shared) == ("instant", False)


def test_the_store_block_rejects_unknown_keys() -> None:
    config = {"upstreams": {"d": {"kind": "demo"}}, "routes": [{"model": "m", "upstream": "d"}]}
    with pytest.raises(ConfigError, match=r"replay\.nope: unknown key"):
        parse_config({**config, "replay": {"nope": 1}}, {})
