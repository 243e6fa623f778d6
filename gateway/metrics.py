"""Prometheus metrics: one registry per gateway, filled once per request and read at scrape.

The proxy calls `observe_request(ctx)` once per request, after the plugins' `on_end` hooks
(so token counts, latency and filter figures are final), `stream_started`/`stream_ended`
around a relayed stream, and `upstream_error`/`observe_queue_wait` where those happen.
Nothing here runs per streamed event: the latency plugin counts inter-token gaps into fixed
buckets in its own per-request state (`LatencyStats.gap_buckets`), merged here at the end.
Upstream health, queues, plugin errors and the rate-limit backend are read at scrape time.

Every label value is bounded by the configuration: teams (+ "anonymous"), route names,
upstream names, plugin names and content-filter rule names; anything else is "other".
See docs/metrics.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.chain import Chain
from gateway.config import GatewayConfig
from gateway.context import RequestContext
from gateway.genai_metrics import GenAIMetrics
from gateway.plugin import Reject
from gateway.pricing import cost_of
from gateway.routing import UpstreamHealth
from plugins.content_filter import FILTER, ContentFilter
from plugins.latency import GAP_BUCKETS, LATENCY
from plugins.token_count import TOKENS, estimator_in_use

log = logging.getLogger("sluice.metrics")


class _Retired(Protocol):
    """A runtime being retired, as `GatewayMetrics.detach` sees it."""

    @property
    def all_chains(self) -> list[Chain]: ...


OTHER: Final = "other"  # any label value not named in the configuration
NO_UPSTREAM: Final = "none"  # the request never reached an upstream

TTFT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS: Final = GAP_BUCKETS  # counted by the latency plugin, per request
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
TOKEN_DIFF_BUCKETS: Final = (-100, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 100)

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
RATE_LIMIT_KINDS: Final = frozenset(
    {"requests", "tokens", "concurrency", "budget", "cost_budget", "backend"}
)
_RATE_LIMIT_CODES: Final = frozenset(
    {
        "rate_limit_exceeded",
        "budget_exhausted",
        "cost_budget_exceeded",
        "rate_limit_backend_unavailable",
    }
)
FILTER_ACTIONS: Final = frozenset(
    {"prompt_reject", "prompt_redact", "completion_redact", "completion_stop"}
)


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
    rules: frozenset[str]

    def __or__(self, other: LabelValues) -> LabelValues:
        return LabelValues(
            self.teams | other.teams,
            self.models | other.models,
            self.upstreams | other.upstreams,
            self.plugins | other.plugins,
            self.rules | other.rules,
        )

    @classmethod
    def from_config(cls, config: GatewayConfig, chains: Iterable[Chain]) -> LabelValues:
        """Teams, route names, upstreams, plugin names and content-filter rule names."""
        plugins = _plugins(chains)
        rules = {
            name
            for _, plugin in plugins
            if isinstance(plugin, ContentFilter)
            for name in plugin.scanner.names
        }
        return cls(
            teams=frozenset({*config.teams, "anonymous"}),
            models=frozenset(route.name for route in config.routes),
            upstreams=frozenset(config.upstreams),
            plugins=frozenset(name for name, _ in plugins),
            rules=frozenset(rules),
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

    def rule(self, name: str) -> str:
        return name if name in self.rules else OTHER


@dataclass
class _GapHistogram:
    """One label set of a histogram filled from pre-bucketed counts (non-cumulative)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(ITL_BUCKETS) + 1))
    total: float = 0.0

    def merge(self, counts: list[int], total: float) -> None:
        for i, n in enumerate(counts):
            self.counts[i] += n
        self.total += total

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip([*ITL_BUCKETS, float("inf")], self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class _ScrapeCollector(Collector):
    """Values read at scrape time: upstream health and queues, plugin and backend errors,
    the tokenizer fallback, and the inter-token histogram merged from finished requests."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        return list(self._families(fill=True))

    def _families(self, *, fill: bool = False) -> Iterator[Metric]:
        m = self._metrics
        itl = HistogramMetricFamily(
            "sluice_inter_token_latency_seconds",
            "Time between two consecutive streamed events after the first token "
            "(measured by the latency plugin as events leave the chain).",
            labels=["model"],
        )
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
        backend = CounterMetricFamily(
            "sluice_rate_limit_backend_failures",
            "Rate-limit backend (Redis) calls that failed or timed out.",
        )
        estimator = GaugeMetricFamily(
            "sluice_tokenizer_estimator_in_use",
            "1 once a request was token-counted with the heuristic because its tiktoken "
            "encoding is not available offline.",
        )
        if fill:
            for model, hist in sorted(m._itl.items()):
                itl.add_metric([model], hist.buckets(), hist.total)
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
            backend.add_metric([], m.retired_backend_failures + sum(m.rate_limiter_failures()))
            estimator.add_metric([], 1 if estimator_in_use() else 0)
        yield from (itl, state, ejections, depth, plugin_errors, backend, estimator)


@dataclass(frozen=True, eq=False)
class _Generation:
    """What one runtime contributes: its label values, chains and upstream health."""

    labels: LabelValues
    chains: tuple[Chain, ...]
    health: Mapping[str, UpstreamHealth]


class GatewayMetrics:
    """Every Sluice metric, in its own `CollectorRegistry` (never the global default one).

    A reload `attach`es the new runtime's config, chains and health; the replaced runtime
    stays attached (its label values stay valid for its requests still running) until it
    is `detach`ed, when its plugin error and backend failure counts are kept as totals.
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
        self.retired_backend_failures = 0
        self.chains: list[Chain] = []
        self.health: Mapping[str, UpstreamHealth] = {}
        self.labels = LabelValues(*(frozenset[str]() for _ in range(5)))
        self._limiters: list[object] = []
        self._config_sha256: str | None = None
        self.attach(config, chains, health)
        self._itl: dict[str, _GapHistogram] = {}
        self.registry = registry = CollectorRegistry()
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
        self.token_diff = Histogram(
            "sluice_token_count_difference_tokens",
            "token_count's local count minus the upstream's usage, per request.",
            ["kind"],
            buckets=TOKEN_DIFF_BUCKETS,
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
        self.rate_limited = Counter(
            "sluice_rate_limit_rejections",
            "Requests and streams refused or cut by the rate_limit plugin, by limit kind.",
            ["team", "kind"],
            registry=registry,
        )
        self.filter_actions = Counter(
            "sluice_content_filter_actions",
            "Content filter matches acted on, by rule and action.",
            ["rule", "action"],
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
        for name in sorted(self.labels.upstreams):
            self.queue_wait.labels(name)
        registry.register(_ScrapeCollector(self))
        self.genai = GenAIMetrics(registry, config) if config.server.metrics.genai_semconv else None

    def attach(
        self, config: GatewayConfig, chains: Iterable[Chain], health: Mapping[str, UpstreamHealth]
    ) -> None:
        """Count for a (new) runtime's config, chains and health from now on."""
        distinct = tuple({id(chain): chain for chain in chains}.values())
        labels = LabelValues.from_config(config, distinct)
        self._generations.append(_Generation(labels, distinct, health))
        self.health = health  # the newest runtime's upstreams are the ones reported
        self._refresh()

    def detach(self, runtime: _Retired) -> None:
        """A replaced runtime's last request ended: keep its counts, drop its label values."""
        chains = {id(chain) for chain in runtime.all_chains}
        gone = [g for g in self._generations if chains & {id(c) for c in g.chains}]
        self._generations = [g for g in self._generations if g not in gone]
        live = {id(limiter) for limiter in self._limiters_of(self._generations)}
        for generation in gone:
            for chain in generation.chains:
                for name, count in chain.errors.items():
                    label = generation.labels.plugin(name)
                    self.retired_plugin_errors[label] = (
                        self.retired_plugin_errors.get(label, 0) + count
                    )
            for limiter in self._limiters_of([generation]):
                if id(limiter) not in live:
                    self.retired_backend_failures += int(getattr(limiter, "failures", 0))
        self._refresh()

    def _refresh(self) -> None:
        labels = self._generations[0].labels
        for generation in self._generations[1:]:
            labels = labels | generation.labels
        self.labels = labels
        self.chains = [chain for g in self._generations for chain in g.chains]
        self._limiters = self._limiters_of(self._generations)

    @staticmethod
    def _limiters_of(generations: Iterable[_Generation]) -> list[object]:
        found: dict[int, object] = {}
        for generation in generations:
            for _, plugin in _plugins(generation.chains):
                limiter = getattr(plugin, "limiter", None)
                if limiter is not None and isinstance(getattr(limiter, "failures", None), int):
                    found[id(limiter)] = limiter
        return list(found.values())

    def config_loaded(self, sha256: str) -> None:
        """The running config is now the file with this sha256."""
        if self._config_sha256 is not None:
            self.config_info.remove(self._config_sha256)
        self._config_sha256 = sha256
        self.config_info.labels(sha256).set(1)

    def rate_limiter_failures(self) -> list[int]:
        """Failed backend calls of each rate limiter in the chains."""
        return [int(getattr(limiter, "failures", 0)) for limiter in self._limiters]

    # ----- called by the proxy --------------------------------------------------------------

    def stream_started(self, ctx: RequestContext) -> None:
        """A stream's headers went out."""
        self.inflight.labels(self.labels.team(ctx), self.labels.model(ctx)).inc()

    def stream_ended(self, ctx: RequestContext) -> None:
        """A stream counted by `stream_started` ended, however it ended."""
        self.inflight.labels(self.labels.team(ctx), self.labels.model(ctx)).dec()

    def upstream_error(self, upstream: str | None, kind: str) -> None:
        """One failed attempt at `upstream`."""
        kind = kind if kind in UPSTREAM_ERROR_KINDS else OTHER
        self.upstream_errors.labels(self.labels.upstream(upstream), kind).inc()

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
        self.requests.labels(team, model, upstream, str(ctx.status), outcome).inc()
        timing = ctx.timing
        if timing.ended is not None:
            self.duration.labels(team, model).observe(timing.ended - timing.received)
        if ctx.retries:
            self.retries.labels(model).inc(ctx.retries)
        usage = ctx.usage
        if usage.prompt_tokens:
            self.prompt_tokens.labels(team, model).inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self.completion_tokens.labels(team, model).inc(usage.completion_tokens)
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
        self._observe_plugins(ctx, team)
        if self.genai is not None:
            self.genai.observe(ctx)

    def _observe_stream(self, ctx: RequestContext, team: str, model: str) -> None:
        latency = ctx.get(LATENCY)
        if latency is not None:
            ttft = latency.ttft
            if latency.gap_count:
                hist = self._itl.get(model)
                if hist is None:
                    hist = self._itl[model] = _GapHistogram()
                hist.merge(latency.gap_buckets, latency.gap_total)
        else:  # without the latency plugin: the first event written, text or not
            first = ctx.timing.first_event_written
            ttft = None if first is None else first - ctx.timing.received
        if ttft is not None:
            self.ttft.labels(team, model).observe(ttft)

    def _observe_overhead(self, ctx: RequestContext, answered: float) -> None:
        self.overhead.labels("request").observe(ctx.overhead_seconds)
        if ctx.stream and ctx.events_in:
            per_event = max(0.0, ctx.overhead_seconds - answered) / ctx.events_in
            self.overhead.labels("event").observe(per_event)

    def _observe_plugins(self, ctx: RequestContext, team: str) -> None:
        tokens = ctx.get(TOKENS)
        if tokens is not None:
            if tokens.diff_prompt is not None:
                self.token_diff.labels("prompt").observe(tokens.diff_prompt)
            if tokens.diff_completion is not None:
                self.token_diff.labels("completion").observe(tokens.diff_completion)
        stats = ctx.get(FILTER)
        if stats is not None:
            for (rule, action), count in stats.counts.items():
                if count:
                    label = action if action in FILTER_ACTIONS else OTHER
                    self.filter_actions.labels(self.labels.rule(rule), label).inc(count)
        err = ctx.error
        if isinstance(err, Reject) and err.code in _RATE_LIMIT_CODES:
            kind = "backend" if err.code == "rate_limit_backend_unavailable" else err.type
            self.rate_limited.labels(team, kind if kind in RATE_LIMIT_KINDS else OTHER).inc()
