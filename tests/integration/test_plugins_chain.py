"""Plugins over real HTTP: rewriting, dropping, splitting, holding back, failing, ending early."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from pydantic import BaseModel, ConfigDict

from gateway.context import Outcome, RequestContext
from gateway.plugin import EndStream, Plugin, Reject
from gateway.sse import SSEEvent
from gateway.testing.fake_upstream import (
    FakeUpstream,
    Script,
    json_script,
    openai_chunk,
    openai_completion,
    openai_stream,
)
from gateway.testing.harness import run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
    DONE,
    GatedUpstream,
    chat_body,
    chat_contents,
    config_for,
    event_json,
    final_error,
    gated_script,
    json_error,
    make_probe,
    split_events,
)


def _map_content(event: SSEEvent, fn: Callable[[str], str]) -> SSEEvent | None:
    """A copy of a chat chunk with fn applied to each non-empty delta content (None: no change)."""
    if event.is_done:
        return None
    payload = event.json()
    choices = []
    changed = False
    for choice in payload.get("choices") or []:
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if isinstance(content, str) and content:
            choice = {**choice, "delta": {**delta, "content": fn(content)}}
            changed = True
        choices.append(choice)
    return SSEEvent.from_json({**payload, "choices": choices}) if changed else None


def _content(event: SSEEvent) -> str | None:
    if event.is_done:
        return None
    choices = event.json().get("choices") or []
    if not choices:
        return None
    content = choices[0].get("delta", {}).get("content")
    return content if isinstance(content, str) else None


class Upper(Plugin):
    name = "upper"

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        changed = _map_content(event, str.upper)
        return None if changed is None else [changed]


class DropSplit(Plugin):
    """Drops `drop-me` tokens and splits `left|right` tokens into two events."""

    name = "drop_split"

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        content = _content(event)
        if content == "drop-me":
            return []
        if content is not None and "|" in content:
            left, right = content.split("|", 1)
            first = _map_content(event, lambda _: left)
            second = _map_content(event, lambda _: right)
            assert first is not None
            assert second is not None
            return [first, second]
        return None


class HoldBack(Plugin):
    """Holds every content event and releases them all in on_flush."""

    name = "hold_back"

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        if _content(event):
            held: list[SSEEvent] = ctx.body.setdefault("_held_for_test", [])
            held.append(event)
            return []
        return None

    def on_flush(self, ctx: RequestContext) -> list[SSEEvent] | None:
        held: list[SSEEvent] = ctx.body.pop("_held_for_test", [])
        return held


class TagOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    suffix: str


class Tag(Plugin):
    name = "tag"
    Options = TagOptions

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        assert isinstance(self.options, TagOptions)
        suffix = self.options.suffix
        changed = _map_content(event, lambda text: text + suffix)
        return None if changed is None else [changed]


class Boom(Plugin):
    """Raises on the token `boom`."""

    name = "boom"

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        if _content(event) == "boom":
            raise RuntimeError("plugin bug")
        return None


STOP_NOTE: dict[str, Any] = openai_chunk("[stopped by policy]", cid="chatcmpl-policy")


class Stopper(Plugin):
    """Ends the stream at the token `stop-here` with a note of its own."""

    name = "stopper"

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        if _content(event) == "stop-here":
            raise EndStream([SSEEvent.from_json(STOP_NOTE)])
        return None


class Gate(Plugin):
    """Rejects after the upstream answered; adds a header when it lets the response through."""

    name = "gate"

    async def on_response_start(self, ctx: RequestContext) -> None:
        if ctx.body.get("user") == "blocked":
            raise Reject(451, "Unavailable for legal reasons.", code="blocked")
        ctx.response_headers["X-Gate"] = "passed"


class Rewrite(Plugin):
    """Changes the request body before it goes upstream, and non-streaming answers after."""

    name = "rewrite"

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.body = {**ctx.body, "temperature": 0, "metadata": {"via": "sluice"}}

    async def on_response(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any] | None:
        return {**body, "rewritten": True}


REGISTRY: dict[str, type[Any]] = {
    cls.name: cls for cls in (Upper, DropSplit, HoldBack, Tag, Boom, Stopper, Gate, Rewrite)
}


async def _stream(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any] | None = None
) -> tuple[int, bytes]:
    async with asyncio.timeout(BOUND), http.post(url + CHAT, json=body or chat_body()) as resp:
        return resp.status, await resp.read()


# ----- rewriting events ------------------------------------------------------------------------


async def test_events_are_rewritten_dropped_and_split(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    tokens = ["Hello", "drop-me", " big|world", " \u00e9t\u00e9"]
    fake.queue(Script(openai_stream(tokens)))
    config = config_for(fake, plugins=[{"name": "drop_split"}, {"name": "upper"}])
    async with run_gateway(config, registry=REGISTRY) as gw:
        status, raw = await _stream(http, gw.v1)
    assert status == 200
    assert chat_contents(raw) == ["HELLO", " BIG", "WORLD", " \u00c9T\u00c9"]
    events = split_events(raw)
    assert events[-1] == DONE
    # role chunk, 4 content events (one dropped, one split into two), finish chunk, [DONE]
    assert len(events) == 1 + 4 + 1 + 1
    for event in events[:-1]:
        assert event_json(event)["object"] == "chat.completion.chunk"


async def test_unchanged_events_keep_their_original_bytes(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """A plugin that returns None for an event must not re-serialise it."""
    upstream = openai_stream(["keep", "drop-me", "keep too"])
    # Odd spacing that a re-serialisation would normalise away.
    upstream[1] = upstream[1].replace(b'"content":"keep"', b'"content" :  "keep"')
    fake.queue(Script(upstream))
    config = config_for(fake, plugins=[{"name": "drop_split"}])
    async with run_gateway(config, registry=REGISTRY) as gw:
        status, raw = await _stream(http, gw.v1)
    assert status == 200
    assert raw == b"".join(upstream[:2] + upstream[3:])


async def test_held_back_events_are_flushed_before_done(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """hold_back runs first; what it flushes still goes through the later `upper`."""
    upstream = openai_stream(["one", " two", " three"])
    fake.queue(Script(upstream))
    config = config_for(fake, plugins=[{"name": "hold_back"}, {"name": "upper"}])
    async with run_gateway(config, registry=REGISTRY) as gw:
        status, raw = await _stream(http, gw.v1)
    assert status == 200
    events = split_events(raw)
    assert events[0] == upstream[0]  # role chunk passes
    assert events[1] == upstream[4]  # the finish chunk was not held
    assert chat_contents(b"".join(events[2:-1])) == ["ONE", " TWO", " THREE"]
    assert events[-1] == DONE
    assert len(events) == len(upstream)


async def test_route_plugins_run_after_global_and_skip_plugins_is_honoured(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream = openai_stream(["Hello", " world"])
    fake.default = Script(upstream)
    config = config_for(fake, plugins=[{"name": "upper"}], route={"skip_plugins": ["upper"]})
    config["routes"] += [
        {
            "model": "tagged",
            "upstream": "fake",
            "plugins": [{"name": "tag", "options": {"suffix": "[tag]"}}],
        },
        {"model": "plain-global", "upstream": "fake"},
    ]
    async with run_gateway(config, registry=REGISTRY) as gw:
        _, skipped = await _stream(http, gw.v1, chat_body(model="m"))
        _, tagged = await _stream(http, gw.v1, chat_body(model="tagged"))
        _, global_only = await _stream(http, gw.v1, chat_body(model="plain-global"))
    assert skipped == b"".join(upstream)
    assert chat_contents(tagged) == ["HELLO[tag]", " WORLD[tag]"]
    assert chat_contents(global_only) == ["HELLO", " WORLD"]


async def test_on_request_changes_reach_the_upstream_and_on_response_the_client(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(json_script(openai_completion("answer")))
    config = config_for(fake, plugins=[{"name": "rewrite"}])
    async with run_gateway(config, registry=REGISTRY) as gw:
        status, raw = await _stream(http, gw.v1, chat_body(stream=False, temperature=1.5))
    assert status == 200
    (exchange,) = fake.exchanges
    assert exchange.body["temperature"] == 0
    assert exchange.body["metadata"] == {"via": "sluice"}
    assert exchange.body["model"] == "gpt-test"
    answer = orjson.loads(raw)
    assert answer["rewritten"] is True
    assert answer["choices"][0]["message"]["content"] == "answer"


# ----- failing plugins -------------------------------------------------------------------------


async def test_fail_open_plugin_error_leaves_the_stream_unchanged(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream = openai_stream(["ok", "boom", "after"])
    fake.queue(Script(upstream))
    config = config_for(fake, plugins=[{"name": "boom", "fail": "open"}])
    async with run_gateway(config, registry=REGISTRY) as gw:
        status, raw = await _stream(http, gw.v1)
        errors = gw.state.chains["m"].errors["boom"]
    assert status == 200
    assert raw == b"".join(upstream)
    assert errors == 1


async def test_fail_closed_plugin_error_mid_stream_ends_with_plugin_error_event(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    """The failing event comes after headers were sent: one final error event."""
    upstream = openai_stream(["ok", "boom", "after"])
    script, (gate,) = gated_script(upstream, 2)
    gated.queue(script)
    probe, log = make_probe()
    config = config_for(gated, plugins=[{"name": "probe"}, {"name": "boom", "fail": "closed"}])
    async with run_gateway(config, registry={**REGISTRY, "probe": probe}) as gw:
        async with http.post(gw.v1 + CHAT, json=chat_body()) as resp:
            assert resp.status == 200
            async with asyncio.timeout(BOUND):
                head = await resp.content.readexactly(len(upstream[0] + upstream[1]))
            gate.set()
            try:
                async with asyncio.timeout(2.0):
                    raw = head + await resp.content.read()
            except TimeoutError:
                pytest.fail("the stream did not end after the plugin failed")
        await log.wait_ends(1)
    assert split_events(raw)[:2] == upstream[:2]
    error = final_error(raw)
    assert error["code"] == "plugin_error"
    assert b"after" not in raw
    assert log.outcomes != [Outcome.COMPLETED]
    assert len(log.outcomes) == 1


async def test_fail_closed_plugin_error_on_first_event_is_a_clean_error(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """Either a 500 JSON error or a 200 stream ending in the error event; never a broken
    HTTP response."""
    fake.queue(Script([b"".join(openai_stream(["boom", "after"]))]))
    config = config_for(fake, plugins=[{"name": "boom", "fail": "closed"}])
    async with run_gateway(config, registry=REGISTRY) as gw:
        status, raw = await _stream(http, gw.v1)
    if status == 200:
        assert final_error(raw)["code"] == "plugin_error"
    else:
        assert status == 500
        assert json_error(raw)["code"] == "plugin_error"


# ----- ending and rejecting --------------------------------------------------------------------


@pytest.mark.parametrize(
    "coalesced",
    [
        pytest.param(False, id="trigger-in-its-own-chunk"),
        pytest.param(True, id="trigger-in-the-same-chunk-as-earlier-events"),
    ],
)
async def test_end_stream_sends_earlier_events_plugin_events_then_done(
    gated: GatedUpstream, http: aiohttp.ClientSession, coalesced: bool
) -> None:
    """Events before the one that ends the stream still reach the client, however the
    upstream happened to chunk them; then the plugin's events, [DONE], and the upstream
    connection is closed."""
    upstream = openai_stream(["a", "b", "stop-here", "never"], done=False)
    if coalesced:
        script, gates = gated_script([b"".join(upstream)], then="hang")
    else:
        script, gates = gated_script(upstream, 3, then="hang")
    gated.queue(script)
    probe, log = make_probe()
    config = config_for(gated, plugins=[{"name": "probe"}, {"name": "stopper"}])
    async with run_gateway(config, registry={**REGISTRY, "probe": probe}) as gw:
        async with http.post(gw.v1 + CHAT, json=chat_body()) as resp:
            assert resp.status == 200
            got = b""
            if gates:
                async with asyncio.timeout(BOUND):
                    got = await resp.content.readexactly(len(b"".join(upstream[:3])))
                gates[0].set()
            async with asyncio.timeout(BOUND):
                raw = got + await resp.content.read()
        (exchange,) = gated.exchanges
        async with asyncio.timeout(BOUND):
            await exchange.finished.wait()
        await log.wait_ends(1)
    events = split_events(raw)
    assert events[:3] == upstream[:3]  # role, a, b
    assert event_json(events[3]) == STOP_NOTE
    assert events[4:] == [DONE]
    assert exchange.closed_by_peer, "the upstream connection must be closed"
    assert log.outcomes == [Outcome.COMPLETED]


async def test_reject_in_on_response_start_gives_http_status(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    probe, log = make_probe()
    config = config_for(fake, plugins=[{"name": "probe"}, {"name": "gate"}])
    async with run_gateway(config, registry={**REGISTRY, "probe": probe}) as gw:
        status, raw = await _stream(http, gw.v1, chat_body(user="blocked"))
        await log.wait_ends(1)
    assert status == 451
    error = json_error(raw)
    assert error["message"] == "Unavailable for legal reasons."
    assert error["code"] == "blocked"
    assert log.outcomes == [Outcome.REJECTED]


class Censor(Plugin):
    """Rejects the stream at the token `forbidden`."""

    name = "censor"

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        if _content(event) == "forbidden":
            raise Reject(400, "Output blocked by content policy.", code="content_filter")
        return None


async def test_reject_in_on_event_mid_stream_ends_with_its_error_event(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    upstream = openai_stream(["fine", "forbidden", "rest"])
    script, (gate,) = gated_script(upstream, 2)
    gated.queue(script)
    config = config_for(gated, plugins=[{"name": "censor"}])
    async with (
        run_gateway(config, registry={**REGISTRY, "censor": Censor}) as gw,
        http.post(gw.v1 + CHAT, json=chat_body()) as resp,
    ):
        assert resp.status == 200
        async with asyncio.timeout(BOUND):
            got = await resp.content.readexactly(len(upstream[0] + upstream[1]))
        gate.set()
        async with asyncio.timeout(BOUND):
            raw = got + await resp.content.read()
    assert split_events(raw)[:2] == upstream[:2]
    error = final_error(raw)
    assert error["code"] == "content_filter"
    assert error["message"] == "Output blocked by content policy."


async def test_reject_in_on_event_on_the_first_event_is_a_clean_error(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """Either the Reject's own status as JSON, or a 200 stream ending in its error event;
    never a broken HTTP response."""
    fake.queue(Script([b"".join(openai_stream(["forbidden"]))]))
    config = config_for(fake, plugins=[{"name": "censor"}])
    async with run_gateway(config, registry={**REGISTRY, "censor": Censor}) as gw:
        status, raw = await _stream(http, gw.v1)
    if status == 200:
        assert final_error(raw)["code"] == "content_filter"
    else:
        assert status == 400
        assert json_error(raw)["code"] == "content_filter"


async def test_on_response_start_can_add_response_headers(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config = config_for(fake, plugins=[{"name": "gate"}])
    async with (
        run_gateway(config, registry=REGISTRY) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body()) as resp,
    ):
        raw = await resp.read()
    assert resp.status == 200
    assert resp.headers["X-Gate"] == "passed"
    assert raw.endswith(DONE)


async def test_end_stream_raised_on_a_flushed_event(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """hold_back flushes at the end; `stopper` (after it) ends the stream on a flushed event:
    the stream still ends cleanly with the plugin's events and [DONE]."""
    upstream = openai_stream(["stop-here", "b"])
    fake.queue(Script(upstream))
    probe, log = make_probe()
    plugins = [{"name": "probe"}, {"name": "hold_back"}, {"name": "stopper"}]
    config = config_for(fake, plugins=plugins)
    async with run_gateway(config, registry={**REGISTRY, "probe": probe}) as gw:
        async with (
            asyncio.timeout(BOUND),
            http.post(gw.v1 + CHAT, json=chat_body()) as resp,
        ):
            assert resp.status == 200
            raw = await resp.read()
        await log.wait_ends(1)
    events = split_events(raw)
    assert events[0] == upstream[0]  # role chunk
    assert events[1] == upstream[3]  # finish chunk (not held)
    assert event_json(events[2]) == STOP_NOTE
    assert events[3:] == [DONE]
    assert log.outcomes == [Outcome.COMPLETED]
