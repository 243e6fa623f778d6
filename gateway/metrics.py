"""Prometheus metrics: one registry per gateway, filled once per request and read at scrape.

The proxy calls `observe_request(ctx)` once per request, after the plugins' `on_end` hooks
(so token counts are final), `stream_started`/`stream_ended` around a relayed stream, and
`upstream_error`/`observe_queue_wait` where those happen. Nothing here runs per streamed
event. Upstream health, queues and plugin errors are read at scrape time.

Plugins declare and update their own metrics (`gateway.plugin_metrics`: the latency
plugin's inter-token histogram, the content filter's actions, the rate limiter's refusals):
`attach` calls each new plugin instance's `declare_metrics` once, `detach` retires the
instances no runtime uses any more.

Every label value is bounded by the configuration: teams (+ "anonymous"), route names,
upstream names and plugin names; anything else is "other". See docs/metrics.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.chain import Chain
from gateway.config import ConfigError, GatewayConfig
from gateway.context import STREAM_LATENCY, RequestContext
from gateway.genai_metrics import GenAIMetrics
from gateway.plugin_metrics import PluginMetricsStore
from gateway.pricing import cost_of
from gateway.routing import UpstreamHealth

_M = TypeVar("_M", Counter, Gauge, Histogram)

log = logging.getLogger("sluice.metrics")


class _Retired(Protocol):
    """A runtime being retired, as `GatewayMetrics.detach` sees it."""

    @property
    def all_chains(self) -> list[Chain]: ...


OTHER: Final = "other"  # any label value not named in the configuration
NO_UPSTREAM: Final = "none"  # the request never reached an upstream

TTFT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DURATION_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS: Final = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)
QUEUE_WAIT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

UPSTREAM_ERROR_KINDS: Final = frozenset(
    {
        "connect",  # no answer: connection refused, reset or failed before a status line
        "timeout",  # connect, first-byte, idle or total timeout
        "status_429",
        "status_5xx",
        "status_4xx",  # includes requests the upstream refused as invalid
        "in_band",  # an error object inside a 200 response or stream
        "truncated",  # the stream closed before its final event
        "malformed",  # not SSE, not JSON, or an event over the size limits
        "broken",  # the connection broke while the body was being read
        "too_large",  # a non-streaming body over server.max_response_bytes
        "queue_full",  # the upstream's concurrency queue was full (max_queue)
        "queue_timeout",  # waited queue_timeout seconds for a slot
    }
)
BREAKER_STATES: Final = {"closed": 0, "half_open": 1, "open": 2}


def _plugins(chains: Iterable[Chain]) -> list[tuple[str, object]]:
    """(name, instance) of every distinct plugin instance in `chains`."""
    seen: set[int] = set()
    out: list[tuple[str, object]] = []
    for chain in chains:
        for entry in chain.entries:
            if id(entry.plugin) not in seen:
                seen.add(id(entry.plugin))
                out.append((entry.name, entry.plugin))
    return out


@dataclass(frozen=True)
class LabelValues:
    """The allowed value of every label, from the configuration; the rest map to "other"."""

    teams: frozenset[str]
    models: frozenset[str]
    upstreams: frozenset[str]
    plugins: frozenset[str]

    def __or__(self, other: LabelValues) -> LabelValues:
        return LabelValues(
            self.teams | other.teams,
            self.models | other.models,
            self.upstreams | other.upstreams,
            self.plugins | other.plugins,
        )

    @classmethod
    def from_config(cls, config: GatewayConfig, chains: Iterable[Chain]) -> LabelValues:
        """Teams, route names, upstreams and plugin names."""
        return cls(
            teams=frozenset({*config.teams, "anonymous"}),
            models=frozenset(route.name for route in config.routes),
            upstreams=frozenset(config.upstreams),
            plugins=frozenset(name for name, _ in _plugins(chains)),
        )

    def team(self, ctx: RequestContext) -> str:
        team = ctx.identity.team
        return team if team in self.teams else OTHER

    def model(self, ctx: RequestContext) -> str:
        """The route's name (never what the client sent): "other" before routing succeeded."""
        route = ctx.route
        return route.name if route is not None and route.name in self.models else OTHER

    def upstream(self, name: str | None) -> str:
        if name is None:
            return NO_UPSTREAM
        return name if name in self.upstreams else OTHER

    def plugin(self, name: str) -> str:
        return name if name in self.plugins else OTHER


class _ScrapeCollector(Collector):
    """Values read at scrape time: upstream health and queues, plugin errors."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        return list(self._families(fill=True))

    def _families(self, *, fill: bool = False) -> Iterator[Metric]:
        m = self._metrics
        state = GaugeMetricFamily(
            "sluice_upstream_breaker_state",
            "Circuit breaker of each upstream: 0 closed, 1 half_open, 2 open (ejected).",
            labels=["upstream"],
        )
        ejections = CounterMetricFamily(
            "sluice_upstream_ejections",
            "Times each upstream's circuit breaker opened (ejected it).",
            labels=["upstream"],
        )
        depth = GaugeMetricFamily(
            "sluice_upstream_queue_depth",
            "Requests waiting for a concurrency slot at each upstream (max_concurrent).",
            labels=["upstream"],
        )
        plugin_errors = CounterMetricFamily(
            "sluice_plugin_errors",
            "Exceptions raised by each plugin's hooks (logged; fail: closed also fails the "
            "request).",
            labels=["plugin"],
        )
        if fill:
            for name, health in m.health.items():
                state.add_metric([name], BREAKER_STATES[health.breaker.state])
                ejections.add_metric([name], health.breaker.times_opened)
                depth.add_metric([name], health.gate.waiting if health.gate is not None else 0)
            errors: dict[str, int] = dict.fromkeys(sorted(m.labels.plugins), 0)
            for name, count in m.retired_plugin_errors.items():
                errors[name] = errors.get(name, 0) + count
            for chain in m.chains:
                for name, count in chain.errors.items():
                    label = m.labels.plugin(name)
                    errors[label] = errors.get(label, 0) + count
            for name, count in errors.items():
                plugin_errors.add_metric([name], count)
        yield from (state, ejections, depth, plugin_errors)


@dataclass(frozen=True, eq=False)
class _Generation:
    """What one runtime contributes: its label values, chains and upstream health."""

    labels: LabelValues
    chains: tuple[Chain, ...]
    health: Mapping[str, UpstreamHealth]


class GatewayMetrics:
    """Every Sluice metric, in its own `CollectorRegistry` (never the global default one).

    A reload `attach`es the new runtime's config, chains and health (declaring the metrics
    of its new plugin instances); the replaced runtime stays attached (its label values stay
    valid for its requests still running) until it is `detach`ed, when its plugin error
    counts are kept as totals and its plugin instances no other runtime uses are retired.
    """

    def __init__(
        self,
        config: GatewayConfig,
        chains: Iterable[Chain],
        health: Mapping[str, UpstreamHealth],
        version: str = __version__,
    ) -> None:
        self._generations: list[_Generation] = []
        self.retired_plugin_errors: dict[str, int] = {}
        self.chains: list[Chain] = []
        self.health: Mapping[str, UpstreamHealth] = {}
        self.labels = LabelValues(*(frozenset[str]() for _ in range(4)))
        # (metric, label values) -> its child: a dict hit instead of `.labels()` per request.
        # Bounded: every label value is a configured name, "other", a status or an outcome.
        self._children: dict[tuple[object, ...], object] = {}
        self._config_sha256: str | None = None
        self.registry = registry = CollectorRegistry()
        self.plugin_metrics = PluginMetricsStore(registry, lambda: self.labels)
        tm = ["team", "model"]
        self.requests = Counter(
            "sluice_requests",
            "Requests by team, route (model), upstream, HTTP status sent and outcome.",
            ["team", "model", "upstream", "status", "outcome"],
            registry=registry,
        )
        self.ttft = Histogram(
            "sluice_time_to_first_token_seconds",
            "Streams: request received to the first generated text leaving the gateway.",
            tm,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "sluice_request_duration_seconds",
            "Request received to its end (last byte written or failure), every request.",
            tm,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "sluice_gateway_overhead_seconds",
            'Time the gateway spent itself, not waiting on upstream or client: kind="request" '
            'per answered request, kind="event" the per-event mean of each stream.',
            ["kind"],
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.plugin_seconds = Counter(
            "sluice_plugin_event_seconds",
            "Time spent in each plugin's on_event hook.",
            ["plugin"],
            registry=registry,
        )
        self.plugin_events = Counter(
            "sluice_plugin_events",
            "Upstream events of the streams each plugin's on_event hook ran on.",
            ["plugin"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "sluice_prompt_tokens",
            "Prompt tokens (the upstream's usage, else the token_count plugin's count).",
            tm,
            registry=registry,
        )
        self.completion_tokens = Counter(
            "sluice_completion_tokens",
            "Completion tokens (the upstream's usage, else the local, possibly partial, count).",
            tm,
            registry=registry,
        )
        self.cost = Counter(
            "sluice_cost",
            "What requests cost, in the pricing currency (pricing.currency), from their final "
            "usage and the price table; unknown models count 0.",
            tm,
            registry=registry,
        )
        self.inflight = Gauge(
            "sluice_inflight_streams",
            "Streams being relayed now (headers sent, not ended).",
            tm,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "sluice_upstream_errors",
            "Failed upstream attempts (retried ones included) by upstream and kind.",
            ["upstream", "kind"],
            registry=registry,
        )
        self.retries = Counter(
            "sluice_retries",
            "Attempts after the first, before a byte reached the client.",
            ["model"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "sluice_upstream_queue_wait_seconds",
            "Wait for a concurrency slot at an upstream (granted slots).",
            ["upstream"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.heals = Counter(
            "sluice_stream_heals",
            'Streams that broke mid-answer on a route with `heal:`, by result: "ok" a '
            'continuation finished the answer, "failed" the stream ended in error anyway.',
            ["route", "result"],
            registry=registry,
        )
        self.heal_gap = Histogram(
            "sluice_stream_heal_gap_seconds",
            "Healed streams: from the break to the continuation's first event.",
            ["route"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        build = Gauge(
            "sluice_build_info", "Always 1; the running version.", ["version"], registry=registry
        )
        build.labels(version).set(1)
        self.reloads = Counter(
            "sluice_config_reloads",
            'Config reloads (SIGHUP or a changed file) by result: "ok" applied, "invalid" '
            'refused (the running config stays), "error" failed while applying.',
            ["result"],
            registry=registry,
        )
        for result in ("ok", "invalid", "error"):
            self.reloads.labels(result)
        self.config_info = Gauge(
            "sluice_config_info",
            "Always 1; the sha256 of the running config file's bytes.",
            ["sha256"],
            registry=registry,
        )
        registry.register(_ScrapeCollector(self))
        self.genai = GenAIMetrics(registry, config) if config.server.metrics.genai_semconv else None
        self.attach(config, chains, health)
        for name in sorted(self.labels.upstreams):
            self.queue_wait.labels(name)

    def attach(
        self, config: GatewayConfig, chains: Iterable[Chain], health: Mapping[str, UpstreamHealth]
    ) -> None:
        """Count for a (new) runtime's config, chains and health from now on, after calling
        `declare_metrics` of each plugin instance not seen before (ConfigError if one fails:
        a bad name, labels without values, a name another plugin owns)."""
        distinct = tuple({id(chain): chain for chain in chains}.values())
        for name, plugin in _plugins(distinct):
            try:
                self.plugin_metrics.declare(name, plugin)
            except Exception as err:
                raise ConfigError(f"plugin {name!r}: declare_metrics failed: {err}") from err
        labels = LabelValues.from_config(config, distinct)
        self._generations.append(_Generation(labels, distinct, health))
        self.health = health  # the newest runtime's upstreams are the ones reported
        self._refresh()

    def detach(self, runtime: _Retired) -> None:
        """A replaced runtime's last request ended: keep its counts, drop its label values."""
        chains = {id(chain) for chain in runtime.all_chains}
        gone = [g for g in self._generations if chains & {id(c) for c in g.chains}]
        self._generations = [g for g in self._generations if g not in gone]
        live = {id(p) for g in self._generations for _, p in _plugins(g.chains)}
        for generation in gone:
            for chain in generation.chains:
                for name, count in chain.errors.items():
                    label = generation.labels.plugin(name)
                    self.retired_plugin_errors[label] = (
                        self.retired_plugin_errors.get(label, 0) + count
                    )
            for _, plugin in _plugins(generation.chains):
                if id(plugin) not in live:
                    self.plugin_metrics.retire(plugin)
        self._refresh()

    def _refresh(self) -> None:
        labels = self._generations[0].labels
        for generation in self._generations[1:]:
            labels = labels | generation.labels
        self.labels = labels
        self.chains = [chain for g in self._generations for chain in g.chains]

    def config_loaded(self, sha256: str) -> None:
        """The running config is now the file with this sha256."""
        if self._config_sha256 is not None:
            self.config_info.remove(self._config_sha256)
        self._config_sha256 = sha256
        self.config_info.labels(sha256).set(1)

    # ----- called by the proxy --------------------------------------------------------------

    def _child(self, metric: _M, *values: str) -> _M:
        """`metric.labels(*values)`, looked up once per distinct set of values."""
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child  # type: ignore[return-value]

    def stream_started(self, ctx: RequestContext) -> None:
        """A stream's headers went out."""
        self._child(self.inflight, self.labels.team(ctx), self.labels.model(ctx)).inc()

    def stream_ended(self, ctx: RequestContext) -> None:
        """A stream counted by `stream_started` ended, however it ended."""
        self._child(self.inflight, self.labels.team(ctx), self.labels.model(ctx)).dec()

    def upstream_error(self, upstream: str | None, kind: str) -> None:
        """One failed attempt at `upstream`."""
        kind = kind if kind in UPSTREAM_ERROR_KINDS else OTHER
        self.upstream_errors.labels(self.labels.upstream(upstream), kind).inc()

    def stream_heal(self, route: str, result: str, gap_seconds: float | None) -> None:
        """A stream that broke mid-answer on a healing route ended (`gateway.heal`)."""
        self.heals.labels(route, result).inc()
        if gap_seconds is not None:
            self.heal_gap.labels(route).observe(gap_seconds)

    def observe_queue_wait(self, upstream: str, seconds: float) -> None:
        """A slot was granted at `upstream` after `seconds` in its queue (0 if none)."""
        self.queue_wait.labels(self.labels.upstream(upstream)).observe(seconds)

    def observe_request(self, ctx: RequestContext, answered_overhead: float | None) -> None:
        """Everything known at a request's end (after `on_end`); never raises.

        `answered_overhead`: the gateway's own time when the response (or a stream's
        headers) went out; None if no upstream answer was relayed.
        """
        try:
            self._observe(ctx, answered_overhead)
        except Exception:
            log.exception("recording metrics failed (request %s)", ctx.request_id)

    def _observe(self, ctx: RequestContext, answered_overhead: float | None) -> None:
        team, model = self.labels.team(ctx), self.labels.model(ctx)
        outcome = ctx.outcome.value if ctx.outcome is not None else "error"
        upstream = self.labels.upstream(ctx.upstream_name)
        self._child(self.requests, team, model, upstream, str(ctx.status), outcome).inc()
        timing = ctx.timing
        if timing.ended is not None:
            self._child(self.duration, team, model).observe(timing.ended - timing.received)
        if ctx.retries:
            self.retries.labels(model).inc(ctx.retries)
        usage = ctx.usage
        if usage.prompt_tokens:
            self._child(self.prompt_tokens, team, model).inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self._child(self.completion_tokens, team, model).inc(usage.completion_tokens)
        cost = cost_of(ctx)
        if cost is not None and cost.amount > 0:
            self.cost.labels(team, model).inc(float(cost.amount))
        if ctx.stream:
            self._observe_stream(ctx, team, model)
        if answered_overhead is not None:
            self._observe_overhead(ctx, answered_overhead)
        for name, seconds in ctx.plugin_seconds.items():
            plugin = self.labels.plugin(name)
            self.plugin_seconds.labels(plugin).inc(seconds)
            self.plugin_events.labels(plugin).inc(ctx.events_in)
        if self.genai is not None:
            self.genai.observe(ctx)

    def _observe_stream(self, ctx: RequestContext, team: str, model: str) -> None:
        latency = ctx.get(STREAM_LATENCY)
        if latency is not None:  # a plugin (latency) saw the first generated text leave
            ttft = latency.ttft
        else:  # without the latency plugin: the first event written, text or not
            first = ctx.timing.first_event_written
            ttft = None if first is None else first - ctx.timing.received
        if ttft is not None:
            self._child(self.ttft, team, model).observe(ttft)

    def _observe_overhead(self, ctx: RequestContext, answered: float) -> None:
        self._child(self.overhead, "request").observe(ctx.overhead_seconds)
        if ctx.stream and ctx.events_in:
            per_event = max(0.0, ctx.overhead_seconds - answered) / ctx.events_in
            self._child(self.overhead, "event").observe(per_event)
