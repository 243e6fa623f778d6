"""The plugin chain: building from config, hook detection, and each hook's failure policy."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict, Field

from gateway.chain import Chain, PluginFailed, build_chain, discover_plugins
from gateway.config import ConfigError, PluginConfig
from gateway.context import Endpoint, RequestContext
from gateway.plugin import EndStream, Plugin, Reject
from gateway.sse import SSEEvent
from plugins.latency import LatencyMeter

# --- test plugins --------------------------------------------------------------------------


class Recorder(Plugin):
    """Records every hook call into a shared log as (plugin label, hook, detail)."""

    name = "recorder"
    log: ClassVar[list[tuple[str, str, str]]] = []

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        label: str = "rec"

    @property
    def label(self) -> str:
        options = self.options
        assert isinstance(options, Recorder.Options)
        return options.label

    async def on_request(self, ctx: RequestContext) -> None:
        self.log.append((self.label, "on_request", ""))

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        self.log.append((self.label, "on_event", event.data or ""))
        return None

    async def on_end(self, ctx: RequestContext) -> None:
        self.log.append((self.label, "on_end", ""))


class Suffix(Plugin):
    """Appends its `text` to every event's data."""

    name = "suffix"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        text: str
        times: int = Field(1, ge=1)

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        options = self.options
        assert isinstance(options, Suffix.Options)
        return [event.replace(data=(event.data or "") + options.text * options.times)]


class Splitter(Plugin):
    """Splits each event into one event per character."""

    name = "splitter"

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        return [SSEEvent(ch) for ch in event.data or ""]


class Dropper(Plugin):
    """Drops every event."""

    name = "dropper"

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        return []


class Holder(Plugin):
    """Holds every event back and releases them, tagged, at flush."""

    name = "holder"

    def __init__(self, options: BaseModel) -> None:
        super().__init__(options)
        self.held: list[SSEEvent] = []

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        self.held.append(event)
        return []

    def on_flush(self, ctx: RequestContext) -> list[SSEEvent] | None:
        out = [e.replace(data=f"held:{e.data}") for e in self.held]
        self.held.clear()
        return out


class Trailer(Plugin):
    """Only flushes: adds one trailing event at the end of a stream; sees no events."""

    name = "trailer"

    def on_flush(self, ctx: RequestContext) -> list[SSEEvent] | None:
        return [SSEEvent("trailer")]


class Broken(Plugin):
    """Raises from every hook."""

    name = "broken"

    async def on_request(self, ctx: RequestContext) -> None:
        raise RuntimeError("on_request broke")

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        raise RuntimeError("on_event broke")

    def on_flush(self, ctx: RequestContext) -> list[SSEEvent] | None:
        raise RuntimeError("on_flush broke")

    async def on_response(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("on_response broke")

    async def on_end(self, ctx: RequestContext) -> None:
        Recorder.log.append(("broken", "on_end", ""))
        raise RuntimeError("on_end broke")


class Gatekeeper(Plugin):
    """Rejects every request and ends every stream."""

    name = "gatekeeper"

    async def on_request(self, ctx: RequestContext) -> None:
        raise Reject(403, "nope", code="forbidden")

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        raise EndStream([SSEEvent("bye")])


class SyncRequest:
    def __init__(self, options: Any) -> None:
        self.options = options

    def on_request(self, ctx: RequestContext) -> None:
        pass


class AsyncEvent:
    def __init__(self, options: Any) -> None:
        self.options = options

    async def on_event(self, ctx: RequestContext, event: SSEEvent) -> None:
        pass


class Bare:
    """No Options model: receives the raw options mapping."""

    def __init__(self, options: Any) -> None:
        self.options = options


REGISTRY: dict[str, type[Any]] = {
    "recorder": Recorder,
    "suffix": Suffix,
    "splitter": Splitter,
    "dropper": Dropper,
    "holder": Holder,
    "trailer": Trailer,
    "broken": Broken,
    "gatekeeper": Gatekeeper,
    "sync-request": SyncRequest,
    "async-event": AsyncEvent,
    "bare": Bare,
}


@pytest.fixture(autouse=True)
def _clear_log() -> None:
    Recorder.log.clear()


def _chain(*specs: dict[str, Any]) -> Chain:
    return build_chain(
        [(f"plugins[{i}]", PluginConfig.model_validate(s)) for i, s in enumerate(specs)], REGISTRY
    )


def _ctx() -> RequestContext:
    return RequestContext("req_test", Endpoint.CHAT)


def _data(events: list[SSEEvent]) -> list[str | None]:
    return [e.data for e in events]


# --- building ------------------------------------------------------------------------------


def test_order_is_preserved() -> None:
    chain = _chain({"name": "suffix", "options": {"text": "a"}}, {"name": "recorder"})
    assert chain.names == ["suffix", "recorder"]
    assert chain.has_event_hooks


def test_hooks_run_in_config_order() -> None:
    chain = _chain(
        {"name": "suffix", "options": {"text": "1"}},
        {"name": "suffix", "options": {"text": "2"}},
        {"name": "suffix", "options": {"text": "3"}},
    )
    assert _data(chain.run_events(_ctx(), [SSEEvent("x")])) == ["x123"]


def test_empty_chain_has_no_event_hooks() -> None:
    chain = _chain()
    assert chain.names == []
    assert not chain.has_event_hooks
    events = [SSEEvent("x")]
    assert chain.run_events(_ctx(), events) == events


def test_sync_on_request_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"'sync-request'.*on_request must be async"):
        _chain({"name": "sync-request"})


def test_async_on_event_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"'async-event'.*on_event must be a plain"):
        _chain({"name": "async-event"})


def test_options_are_validated_by_the_plugin_model() -> None:
    chain = _chain({"name": "suffix", "options": {"text": "!", "times": 2}})
    assert _data(chain.run_events(_ctx(), [SSEEvent("hi")])) == ["hi!!"]


def test_missing_option_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^plugins\[0\]\.options\.text: "):
        _chain({"name": "suffix"})


def test_invalid_option_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^plugins\[1\]\.options\.times: .*greater than"):
        _chain({"name": "recorder"}, {"name": "suffix", "options": {"text": "a", "times": 0}})


def test_unknown_option_is_rejected_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^plugins\[0\]\.options\.colour: unknown key$"):
        _chain({"name": "recorder", "options": {"colour": "red"}})


def test_plugin_without_options_rejects_any_option() -> None:
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.options\.x: unknown key"):
        _chain({"name": "dropper", "options": {"x": 1}})


def test_plugin_without_options_model_gets_raw_mapping() -> None:
    chain = _chain({"name": "bare", "options": {"anything": [1, 2]}})
    assert chain.entries[0].plugin.options == {"anything": [1, 2]}


def test_route_location_is_used_in_errors() -> None:
    spec = PluginConfig(name="suffix")
    with pytest.raises(ConfigError, match=r"^routes\[2\]\.plugins\[0\]\.options\.text"):
        build_chain([("routes[2].plugins[0]", spec)], REGISTRY)


def test_unknown_plugin_lists_installed_ones() -> None:
    with pytest.raises(ConfigError) as info:
        _chain({"name": "recorder"}, {"name": "nosuch"})
    message = str(info.value)
    assert message.startswith("plugins[1].name: unknown plugin 'nosuch'")
    assert "dropper, gatekeeper, holder" in message


def test_unknown_plugin_with_empty_registry() -> None:
    with pytest.raises(ConfigError, match="none installed"):
        build_chain([("plugins[0]", PluginConfig(name="x"))], {})


def test_discover_plugins_finds_builtin_latency() -> None:
    found = discover_plugins()
    assert found["latency"] is LatencyMeter


# --- run_events ----------------------------------------------------------------------------


def test_none_passes_the_same_object_through() -> None:
    chain = _chain({"name": "recorder"})
    event = SSEEvent(b'{"a":1}', raw=b'data: {"a":1}\n\n')
    out = chain.run_events(_ctx(), [event])
    assert len(out) == 1
    assert out[0] is event
    assert out[0].encode() == b'data: {"a":1}\n\n'


def test_empty_list_drops_and_later_plugins_never_see_it() -> None:
    chain = _chain({"name": "dropper"}, {"name": "recorder"})
    assert chain.run_events(_ctx(), [SSEEvent("a"), SSEEvent("b")]) == []
    assert Recorder.log == []


def test_list_splits_and_later_plugins_see_each_part() -> None:
    chain = _chain({"name": "splitter"}, {"name": "recorder"})
    out = chain.run_events(_ctx(), [SSEEvent("ab"), SSEEvent("c")])
    assert _data(out) == ["a", "b", "c"]
    assert [d for _, _, d in Recorder.log] == ["a", "b", "c"]


def test_comment_events_skip_plugins() -> None:
    chain = _chain({"name": "dropper"}, {"name": "broken", "fail": "closed"})
    ping = SSEEvent(data=None, comments=(" ping",))
    out = chain.run_events(_ctx(), [ping])
    assert out == [ping]
    assert out[0] is ping
    assert not chain.errors


def test_comment_events_keep_their_place_among_data_events() -> None:
    chain = _chain({"name": "suffix", "options": {"text": "!"}})
    ping = SSEEvent(data=None, comments=(" ping",))
    out = chain.run_events(_ctx(), [SSEEvent("a"), ping, SSEEvent("b")])
    assert _data(out) == ["a!", None, "b!"]
    assert out[1] is ping


def test_fail_open_exception_is_counted_and_event_passes(caplog: pytest.LogCaptureFixture) -> None:
    chain = _chain({"name": "broken"}, {"name": "suffix", "options": {"text": "!"}})
    with caplog.at_level(logging.ERROR, logger="sluice.chain"):
        out = chain.run_events(_ctx(), [SSEEvent("a"), SSEEvent("b")])
    assert _data(out) == ["a!", "b!"]
    assert chain.errors["broken"] == 2
    assert "req_test" in caplog.text


def test_fail_closed_raises_plugin_failed() -> None:
    chain = _chain({"name": "broken", "fail": "closed"})
    with pytest.raises(PluginFailed) as info:
        chain.run_events(_ctx(), [SSEEvent("a")])
    err = info.value
    assert err.status == 500
    assert err.code == "plugin_error"
    assert err.type == "server_error"
    assert "broken" in err.message
    assert "on_event broke" not in err.message  # details stay in the log
    assert chain.errors["broken"] == 1


def test_end_stream_propagates_even_when_fail_open() -> None:
    chain = _chain({"name": "gatekeeper"})
    with pytest.raises(EndStream) as info:
        chain.run_events(_ctx(), [SSEEvent("a")])
    assert _data(info.value.events) == ["bye"]
    assert not chain.errors


# --- run_request / run_response / run_end --------------------------------------------------


async def test_run_request_runs_in_order() -> None:
    chain = _chain(
        {"name": "recorder", "options": {"label": "one"}},
        {"name": "recorder", "options": {"label": "two"}},
    )
    await chain.run_request(_ctx())
    assert Recorder.log == [("one", "on_request", ""), ("two", "on_request", "")]


async def test_reject_propagates_from_run_request() -> None:
    chain = _chain({"name": "gatekeeper"}, {"name": "recorder"})
    with pytest.raises(Reject) as info:
        await chain.run_request(_ctx())
    assert info.value.status == 403
    assert info.value.code == "forbidden"
    assert Recorder.log == []  # later plugins never ran
    assert not chain.errors


async def test_run_request_fail_open_continues() -> None:
    chain = _chain({"name": "broken"}, {"name": "recorder"})
    await chain.run_request(_ctx())
    assert Recorder.log == [("rec", "on_request", "")]
    assert chain.errors["broken"] == 1


async def test_run_request_fail_closed_raises_plugin_failed() -> None:
    chain = _chain({"name": "broken", "fail": "closed"}, {"name": "recorder"})
    with pytest.raises(PluginFailed):
        await chain.run_request(_ctx())
    assert Recorder.log == []


async def test_run_response_fail_open_keeps_body() -> None:
    chain = _chain({"name": "broken"})
    body = {"id": "x"}
    assert await chain.run_response(_ctx(), body) == {"id": "x"}
    assert chain.errors["broken"] == 1


async def test_run_end_calls_every_on_end_even_if_one_raises() -> None:
    chain = _chain(
        {"name": "recorder", "options": {"label": "first"}},
        {"name": "broken", "fail": "closed"},
        {"name": "recorder", "options": {"label": "last"}},
    )
    await chain.run_end(_ctx())  # never raises, even for fail-closed plugins
    assert Recorder.log == [
        ("first", "on_end", ""),
        ("broken", "on_end", ""),
        ("last", "on_end", ""),
    ]
    assert chain.errors["broken"] == 1


# --- run_flush -----------------------------------------------------------------------------


def test_flush_with_nothing_held_is_empty() -> None:
    chain = _chain({"name": "holder"}, {"name": "recorder"})
    assert chain.run_flush(_ctx()) == []


def test_flushed_events_pass_through_later_plugins_in_order() -> None:
    chain = _chain(
        {"name": "suffix", "options": {"text": "-before"}},
        {"name": "holder"},
        {"name": "suffix", "options": {"text": "-after"}},
    )
    ctx = _ctx()
    assert chain.run_events(ctx, [SSEEvent("a"), SSEEvent("b")]) == []
    out = chain.run_flush(ctx)
    # the earlier plugin already saw them on the way in; only the later one sees the flush
    assert _data(out) == ["held:a-before-after", "held:b-before-after"]


def test_flushed_events_can_be_held_again_by_a_later_plugin() -> None:
    chain = _chain({"name": "holder"}, {"name": "holder"})
    ctx = _ctx()
    assert chain.run_events(ctx, [SSEEvent("x")]) == []
    out = chain.run_flush(ctx)
    # the first holder's flush is held again by the second, which releases it in its flush
    assert _data(out) == ["held:held:x"]


def test_flush_of_first_plugin_precedes_flush_of_second() -> None:
    chain = _chain({"name": "holder"}, {"name": "trailer"}, {"name": "recorder"})
    ctx = _ctx()
    chain.run_events(ctx, [SSEEvent("x")])
    out = chain.run_flush(ctx)
    assert _data(out) == ["held:x", "trailer"]


def test_flush_only_plugin_output_passes_through_later_plugins() -> None:
    # A plugin with on_flush but no on_event still sits at its place in the chain:
    # what it flushes must go through the on_event hooks of the plugins after it.
    chain = _chain({"name": "trailer"}, {"name": "suffix", "options": {"text": "!"}})
    assert _data(chain.run_flush(_ctx())) == ["trailer!"]


def test_fail_open_on_flush_is_counted() -> None:
    chain = _chain({"name": "broken"}, {"name": "trailer"})
    out = chain.run_flush(_ctx())
    assert _data(out) == ["trailer"]
    assert chain.errors["broken"] == 1


def test_fail_closed_on_flush_raises_plugin_failed() -> None:
    chain = _chain({"name": "broken", "fail": "closed"})
    with pytest.raises(PluginFailed):
        chain.run_flush(_ctx())


def test_fail_open_on_event_during_flush_is_counted_and_event_passes() -> None:
    # The failure policy must hold for flushed events too, not only for live ones.
    chain = _chain({"name": "holder"}, {"name": "broken"})
    ctx = _ctx()
    chain.run_events(ctx, [SSEEvent("a")])
    out = chain.run_flush(ctx)
    assert _data(out) == ["held:a"]
    # once in on_event (for the flushed event), once in its own on_flush
    assert chain.errors["broken"] == 2


def test_fail_closed_on_event_during_flush_raises_plugin_failed() -> None:
    chain = _chain({"name": "holder"}, {"name": "broken", "fail": "closed"})
    ctx = _ctx()
    chain.run_events(ctx, [SSEEvent("a")])
    with pytest.raises(PluginFailed):
        chain.run_flush(ctx)


# --- batch hooks (on_events) -----------------------------------------------------------------


class Batcher(Plugin):
    """Has both hooks: the chain calls `on_events` once per batch, never `on_event`."""

    name = "batcher"
    calls: ClassVar[list[int]] = []

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        raise AssertionError("on_events is used when a plugin has it")

    def on_events(self, ctx: RequestContext, events: list[SSEEvent]) -> list[SSEEvent] | None:
        self.calls.append(len(events))
        if all(e.data_bytes is None or e.data != "x" for e in events):
            return None
        return [e if e.data_bytes is None else e.replace(data=f"{e.data}!") for e in events]


class BatchEnder(Plugin):
    """Lets the first event of a batch through, then ends the stream with its own."""

    name = "batch-ender"

    def on_events(self, ctx: RequestContext, events: list[SSEEvent]) -> list[SSEEvent] | None:
        raise EndStream([events[0], SSEEvent("bye")])


class BatchBroken(Plugin):
    name = "batch-broken"

    def on_events(self, ctx: RequestContext, events: list[SSEEvent]) -> list[SSEEvent] | None:
        raise RuntimeError("on_events broke")


class AsyncBatch:
    def __init__(self, options: Any) -> None:
        self.options = options

    async def on_events(self, ctx: RequestContext, events: list[SSEEvent]) -> None:
        pass


REGISTRY.update(
    {
        "batcher": Batcher,
        "batch-ender": BatchEnder,
        "batch-broken": BatchBroken,
        "async-batch": AsyncBatch,
    }
)


def test_batch_hook_is_called_once_per_batch_with_comments_in_place() -> None:
    Batcher.calls.clear()
    chain = _chain({"name": "batcher"}, {"name": "suffix", "options": {"text": "s"}})
    ping = SSEEvent(comments=("ping",))
    events = [SSEEvent("a"), ping, SSEEvent("b")]
    out = chain.run_events(_ctx(), events)
    assert Batcher.calls == [3]
    assert _data(out) == ["as", None, "bs"]
    assert out[1] is ping
    assert chain.has_event_hooks


def test_batch_hook_returning_none_passes_the_same_objects() -> None:
    chain = _chain({"name": "batcher"})
    events = [SSEEvent("a"), SSEEvent("b")]
    out = chain.run_events(_ctx(), events)
    assert all(o is e for o, e in zip(out, events, strict=True))
    assert _data(chain.run_events(_ctx(), [SSEEvent("x")])) == ["x!"]


def test_end_stream_from_a_batch_hook_passes_later_plugins() -> None:
    chain = _chain({"name": "batch-ender"}, {"name": "suffix", "options": {"text": "s"}})
    with pytest.raises(EndStream) as ended:
        chain.run_events(_ctx(), [SSEEvent("a"), SSEEvent("b")])
    assert _data(ended.value.events) == ["as", "byes"]


def test_fail_open_batch_hook_passes_the_batch_and_fail_closed_fails() -> None:
    chain = _chain({"name": "batch-broken"}, {"name": "suffix", "options": {"text": "s"}})
    assert _data(chain.run_events(_ctx(), [SSEEvent("a"), SSEEvent("b")])) == ["as", "bs"]
    assert chain.errors["batch-broken"] == 1
    closed = _chain({"name": "batch-broken", "fail": "closed"})
    with pytest.raises(PluginFailed):
        closed.run_events(_ctx(), [SSEEvent("a")])


def test_async_on_events_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="on_events must be a plain"):
        _chain({"name": "async-batch"})


def test_flushed_events_pass_later_batch_hooks() -> None:
    Batcher.calls.clear()
    chain = _chain({"name": "holder"}, {"name": "batcher"})
    ctx = _ctx()
    chain.run_events(ctx, [SSEEvent("x")])
    assert Batcher.calls == [], "no call for the empty batch the holder left"
    assert _data(chain.run_flush(ctx)) == ["held:x"]
    assert Batcher.calls == [1]


def test_every_bad_option_of_a_plugin_is_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        _chain({"name": "suffix", "options": {"times": 0, "colour": "red"}})
    assert [line.split(":")[0] for line in info.value.problems] == [
        "plugins[0].options.text",
        "plugins[0].options.times",
        "plugins[0].options.colour",
    ]


def test_every_plugin_problem_of_a_chain_is_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        _chain({"name": "suffix"}, {"name": "nosuch"}, {"name": "recorder", "options": {"x": 1}})
    assert [line.split(":")[0] for line in info.value.problems] == [
        "plugins[0].options.text",
        "plugins[1].name",
        "plugins[2].options.x",
    ]
