"""GatewayMetrics without a network: names, label mapping, gap buckets, config checks."""

from __future__ import annotations

from bisect import bisect_left
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import build_state
from gateway.config import ConfigError, parse_config
from gateway.context import (
    STREAM_LATENCY,
    Endpoint,
    Identity,
    Outcome,
    RequestContext,
    StreamLatency,
)
from gateway.metrics import GatewayMetrics
from plugins.latency import GAP_BUCKETS, LATENCY, LatencyMeter, LatencyStats

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"

# The exact families (sample names without _total/_bucket/...) the dashboards rely on, with
# every built-in plugin enabled (each declares its own).
FAMILIES = {
    "sluice_requests": "counter",
    "sluice_replay_cache": "counter",
    "sluice_time_to_first_token_seconds": "histogram",
    "sluice_inter_token_latency_seconds": "histogram",
    "sluice_request_duration_seconds": "histogram",
    "sluice_gateway_overhead_seconds": "histogram",
    "sluice_plugin_event_seconds": "counter",
    "sluice_plugin_events": "counter",
    "sluice_prompt_tokens": "counter",
    "sluice_completion_tokens": "counter",
    "sluice_cost": "counter",
    "sluice_token_count_difference_tokens": "histogram",
    "sluice_inflight_streams": "gauge",
    "sluice_upstream_errors": "counter",
    "sluice_retries": "counter",
    "sluice_stream_heals": "counter",
    "sluice_stream_heal_gap_seconds": "histogram",
    "sluice_upstream_breaker_state": "gauge",
    "sluice_upstream_ejections": "counter",
    "sluice_upstream_queue_depth": "gauge",
    "sluice_upstream_queue_wait_seconds": "histogram",
    "sluice_rate_limit_rejections": "counter",
    "sluice_content_filter_actions": "counter",
    "sluice_tokenizer_estimator_in_use": "gauge",
    "sluice_rate_limit_backend_failures": "counter",
    "sluice_plugin_errors": "counter",
    "sluice_build_info": "gauge",
    "sluice_config_reloads": "counter",
    "sluice_config_info": "gauge",
}


def _config(**extra: Any) -> dict[str, Any]:
    return {
        "upstreams": {"up": {"kind": "demo"}},
        "routes": [{"model": "m", "upstream": "up"}, {"model_prefix": "x/", "upstream": "up"}],
        "teams": {"ml": {"keys": [{"name": "k", "sha256": "0" * 64}]}},
        "plugins": [{"name": "latency"}],
        **extra,
    }


def _metrics() -> GatewayMetrics:
    return build_state(parse_config(_config(), {})).metrics


ALL_PLUGINS = [
    {"name": "token_count"},
    {"name": "rate_limit"},
    {"name": "content_filter"},
    {"name": "access_log", "options": {"stream": "stderr"}},
    {"name": "latency"},
]


def test_every_metric_is_declared_with_its_type() -> None:
    state = build_state(parse_config(_config(plugins=ALL_PLUGINS), {}))
    declared = {m.name: m.type for m in state.metrics.registry.collect()}
    assert declared == FAMILIES


def test_a_plugins_metrics_exist_only_when_it_is_enabled() -> None:
    declared = {m.name for m in _metrics().registry.collect()}  # latency only
    assert "sluice_inter_token_latency_seconds" in declared
    assert "sluice_content_filter_actions" not in declared
    assert "sluice_rate_limit_backend_failures" not in declared


def test_docs_list_every_metric() -> None:
    text = DOCS.read_text("utf-8")
    for name in FAMILIES:
        shown = f"{name}_total" if FAMILIES[name] == "counter" else name
        assert f"`{shown}`" in text, shown


def test_label_values_are_bounded_by_the_config() -> None:
    labels = _metrics().labels
    ctx = RequestContext("r", Endpoint.CHAT, model="secret-model{}")
    assert labels.model(ctx) == "other"
    assert labels.team(ctx) == "anonymous"
    ctx.identity = Identity(team="intruder")
    assert labels.team(ctx) == "other"
    ctx.identity = Identity(team="ml")
    assert labels.team(ctx) == "ml"
    assert labels.upstream(None) == "none"
    assert labels.upstream("up") == "up"
    assert labels.upstream("nope") == "other"
    assert labels.plugin("latency") == "latency"
    assert labels.plugin("unknown") == "other"


def test_a_prefix_route_is_labelled_with_its_name_not_the_model_sent() -> None:
    state = build_state(parse_config(_config(), {}))
    ctx = RequestContext("r", Endpoint.CHAT, model="x/some-user-string")
    ctx.route = state.router.resolve(ctx.model)
    assert state.metrics.labels.model(ctx) == "x/*"


async def test_gaps_are_bucketed_like_prometheus_le() -> None:
    state = build_state(parse_config(_config(), {}))
    metrics = state.metrics
    (entry,) = state.default_chain.entries
    assert isinstance(entry.plugin, LatencyMeter)
    stats = LatencyStats()
    for gap in (0.0005, 0.001, 0.0011, 5.0, 7.0):
        stats.gap_buckets[bisect_left(GAP_BUCKETS, gap)] += 1
        stats.gap_count += 1
        stats.gap_total += gap
    ctx = RequestContext("r", Endpoint.CHAT, stream=True)
    ctx.set(LATENCY, stats)
    ctx.route = state.router.resolve("m")
    ctx.outcome = Outcome.COMPLETED
    await entry.plugin.on_end(ctx)  # the latency plugin merges its gaps into its histogram
    metrics.observe_request(ctx, None)
    text = generate_latest(metrics.registry).decode()
    (family,) = [
        f
        for f in text_string_to_metric_families(text)
        if f.name == "sluice_inter_token_latency_seconds"
    ]
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets["0.001"] == 2  # le is inclusive
    assert buckets["0.0025"] == 3
    assert buckets["5.0"] == 4
    assert buckets["+Inf"] == 5
    (count,) = [s.value for s in family.samples if s.name.endswith("_count")]
    (total,) = [s.value for s in family.samples if s.name.endswith("_sum")]
    assert count == 5
    assert total == pytest.approx(12.0026)


def test_observe_request_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    metrics = _metrics()
    ctx = RequestContext("r", Endpoint.CHAT, stream=True)
    ctx.set(STREAM_LATENCY, cast(StreamLatency, "not stats"))
    metrics.observe_request(ctx, None)
    assert "recording metrics failed" in caplog.text


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"metrics": {"require_admin_key": True}}, "needs server.admin_key"),
        ({"port": 9000, "metrics": {"port": 9000}}, "must differ from server.port"),
        ({"metrics": {"port": 70000}}, "metrics.port"),
        ({"metrics": {"path": "/m"}}, "unknown key"),
    ],
)
def test_metrics_config_errors_name_the_key(server: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_config(server=server), {})


def test_each_gateway_has_its_own_registry() -> None:
    first, second = _metrics(), _metrics()
    assert first.registry is not second.registry


def test_requests_are_counted_per_label_set_across_repeats() -> None:
    """Each label set keeps its own series, however often it is seen (children are reused)."""
    state = build_state(parse_config(_config(), {}))
    metrics = state.metrics
    for team, status, times in (("ml", 200, 3), (None, 200, 2), ("ml", 429, 1)):
        for _ in range(times):
            ctx = RequestContext("r", Endpoint.CHAT, model="m", stream=True)
            ctx.route = state.router.resolve("m")
            if team is not None:
                ctx.identity = Identity(team=team)
            ctx.status, ctx.outcome = status, Outcome.COMPLETED
            metrics.stream_started(ctx)
            metrics.stream_ended(ctx)
            metrics.observe_request(ctx, 0.001)
    text = generate_latest(metrics.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counts = {
        (s.labels["team"], s.labels["status"]): s.value
        for s in families["sluice_requests"].samples
        if s.name == "sluice_requests_total"
    }
    assert counts == {("ml", "200"): 3, ("anonymous", "200"): 2, ("ml", "429"): 1}
    inflight = [s.value for s in families["sluice_inflight_streams"].samples]
    assert inflight
    assert all(v == 0 for v in inflight)
    (requests,) = [
        s.value
        for s in families["sluice_gateway_overhead_seconds"].samples
        if s.name.endswith("_count") and s.labels["kind"] == "request"
    ]
    assert requests == 6
