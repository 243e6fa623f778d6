"""Plugin-declared metrics: bounded labels, one registration per gateway across reloads,
clear errors, retired instances' read counters kept."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway.app import build_state
from gateway.config import ConfigError, parse_config
from gateway.context import Endpoint, Identity, Outcome, RequestContext
from gateway.plugin import Instrument, NoOptions, Plugin, PluginMetrics, Reject
from gateway.plugin_metrics import PluginMetricsStore
from gateway.testing import PluginRunner, request_context
from plugins.content_filter import ContentFilter, ContentFilterOptions


class Counting(Plugin):
    """Counts requests by team, route, outcome and a declared colour."""

    name = "counting"
    seen: Instrument[Counter] | None = None
    failures = 0

    def declare_metrics(self, metrics: PluginMetrics) -> None:
        self.seen = metrics.counter(
            "sluice_counting_requests",
            "Requests seen.",
            ["team", "model", "outcome", "colour"],
            values={"colour": ["red", "blue"]},
        )
        metrics.read_counter("sluice_counting_failures", "Failures.", lambda: self.failures)

    async def on_end(self, ctx: RequestContext) -> None:
        assert self.seen is not None
        self.seen.labels(ctx, colour=str(ctx.body.get("colour"))).inc()


def _config(**plugin: Any) -> dict[str, Any]:
    return {
        "upstreams": {"up": {"kind": "demo"}},
        "routes": [{"model": "m", "upstream": "up"}],
        "teams": {"ml": {"keys": [{"name": "k", "sha256": "0" * 64}]}},
        "plugins": [{"name": "counting", **plugin}],
    }


def _ctx(team: str, model: str, colour: str) -> RequestContext:
    ctx = RequestContext("r", Endpoint.CHAT, body={"colour": colour}, model=model)
    ctx.identity = Identity(team=team)
    ctx.outcome = Outcome.COMPLETED
    return ctx


async def test_labels_are_bounded_by_the_config_and_the_declared_values() -> None:
    state = build_state(parse_config(_config(), {}), {"counting": Counting})
    plugin = state.default_chain.entries[0].plugin
    ctx = _ctx("intruder", "secret-model", "green")
    ctx.route = None
    await plugin.on_end(ctx)
    ok = _ctx("ml", "m", "red")
    ok.route = state.router.resolve("m")
    await plugin.on_end(ok)
    registry = state.metrics.registry
    name = "sluice_counting_requests_total"
    other = {"team": "other", "model": "other", "outcome": "completed", "colour": "other"}
    assert registry.get_sample_value(name, other) == 1
    known = {"team": "ml", "model": "m", "outcome": "completed", "colour": "red"}
    assert registry.get_sample_value(name, known) == 1


async def test_a_new_instance_after_a_reload_keeps_counting_into_the_same_series() -> None:
    state = build_state(parse_config(_config(), {}), {"counting": Counting})
    first = state.default_chain.entries[0].plugin
    ctx = _ctx("ml", "m", "blue")
    await first.on_end(ctx)
    first.failures = 2
    # A changed spec (fail: closed) builds a new instance: it re-declares, nothing twice.
    from gateway.runtime import build_runtime

    new = build_runtime(
        parse_config(_config(fail="closed"), {}),
        {"counting": Counting},
        state.runtime.source,
        previous=state.runtime,
    )
    second = new.default_chain.entries[0].plugin
    assert second is not first
    state.metrics.attach(new.config, new.all_chains, new.health)
    await second.on_end(ctx)
    second.failures = 1
    labels = {"team": "ml", "model": "other", "outcome": "completed", "colour": "blue"}
    registry = state.metrics.registry
    assert registry.get_sample_value("sluice_counting_requests_total", labels) == 2
    assert registry.get_sample_value("sluice_counting_failures_total") == 3
    state.metrics.detach(state.runtime)  # the old instance retires: its count is kept
    first.failures = 100  # no longer read
    assert registry.get_sample_value("sluice_counting_failures_total") == 3


class Clashing(Plugin):
    name = "clashing"

    def declare_metrics(self, metrics: PluginMetrics) -> None:
        metrics.counter("sluice_requests", "Takes a core metric's name.")


class Unbounded(Plugin):
    name = "unbounded"

    def declare_metrics(self, metrics: PluginMetrics) -> None:
        metrics.counter("sluice_unbounded_x", "A free-form label.", ["user"])


@pytest.mark.parametrize(
    ("cls", "message"),
    [(Clashing, "sluice_requests"), (Unbounded, "label 'user' needs its values listed")],
)
def test_bad_declarations_refuse_the_config_naming_the_plugin(
    cls: type[Plugin], message: str
) -> None:
    config = _config()
    config["plugins"] = [{"name": cls.name}]
    with pytest.raises(ConfigError, match=message) as info:
        build_state(parse_config(config, {}), {cls.name: cls})
    assert repr(cls.name) in str(info.value)


def test_another_plugin_cannot_take_a_declared_name() -> None:
    store = PluginMetricsStore(CollectorRegistry())
    store.declare("counting", Counting(NoOptions()))
    thief = Counting(NoOptions())
    with pytest.raises(ValueError, match="already declared by plugin 'counting'"):
        store.declare("thief", thief)


async def test_content_filter_rules_bound_its_rule_label() -> None:
    rules = [{"name": "banned", "words": ["foo"]}]
    options = ContentFilterOptions.model_validate({"rules": rules})
    runner = PluginRunner(ContentFilter(options))
    with pytest.raises(Reject):
        await runner.request({"model": "m", "messages": [{"role": "user", "content": "a foo"}]})
    await runner.end(Outcome.REJECTED)
    name = "sluice_content_filter_actions_total"
    assert runner.sample(name, rule="banned", action="prompt_reject") == 1


async def test_the_runner_runs_on_end_exactly_once() -> None:
    runner = PluginRunner(Counting(NoOptions()))
    await runner.request(ctx=request_context({"colour": "red"}))
    await runner.end()
    with pytest.raises(RuntimeError, match="already ended"):
        await runner.end()
    labels = {"team": "anonymous", "model": "m", "outcome": "completed", "colour": "red"}
    assert runner.sample("sluice_counting_requests_total", **labels) == 1
