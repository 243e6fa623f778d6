"""Prometheus metrics that plugins declare and update themselves.

A plugin with a ``declare_metrics(metrics: PluginMetrics)`` method gets it called once per
gateway for each of its instances, before the instance serves a request: it creates its
instruments there (`counter`, `gauge`, `histogram`, `bucket_counts`, `read_counter`,
`read_gauge`), keeps them on ``self`` and updates them from its hooks (in ``on_end``, not
per event). Instruments live in the gateway's registry and are shown on ``/metrics``.

- Names start with ``sluice_`` (by convention ``sluice_<plugin>_``); a name belongs to the
  first plugin that declares it. Another instance of the same plugin (a reload that built a
  new one, or the plugin on two routes) declaring the same name with the same kind and labels
  gets the same instrument back, so counts carry on and nothing is registered twice.
- Labels are bounded: the context labels ``team``, ``model`` (the route's name),
  ``upstream`` and ``outcome`` are filled from the request context and mapped to "other"
  outside the configuration, like the core's; any other label must list its values
  (``values={"rule": names}``), and a value outside them is counted as "other".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from gateway.context import Outcome, RequestContext

OTHER: Final = "other"
CONTEXT_LABELS: Final = frozenset({"team", "model", "upstream", "outcome"})
_NAME: Final = re.compile(r"^sluice_[a-z][a-z0-9_]*$")
_OUTCOMES: Final = frozenset(o.value for o in Outcome)

M = TypeVar("M", Counter, Gauge, Histogram)


class LabelBounds(Protocol):
    """The gateway's bounded values of the context labels (`gateway.metrics.LabelValues`)."""

    def team(self, ctx: RequestContext) -> str: ...

    def model(self, ctx: RequestContext) -> str: ...

    def upstream(self, name: str | None) -> str: ...


class _Unbounded:
    """Context labels as they are (a plugin tested on its own, without a gateway)."""

    def team(self, ctx: RequestContext) -> str:
        return ctx.identity.team

    def model(self, ctx: RequestContext) -> str:
        return ctx.route.name if ctx.route is not None else OTHER

    def upstream(self, name: str | None) -> str:
        return "none" if name is None else name


class _Labels:
    """Turns (ctx, declared label values) into the bounded label values, in order."""

    __slots__ = ("_bounds", "enums", "names")

    def __init__(
        self, names: Sequence[str], enums: dict[str, set[str]], bounds: Callable[[], LabelBounds]
    ) -> None:
        self.names = tuple(names)
        self.enums = enums
        self._bounds = bounds

    def values(self, ctx: RequestContext | None, given: Mapping[str, str]) -> list[str]:
        out: list[str] = []
        bounds = self._bounds() if ctx is not None else None
        for name in self.names:
            if name in CONTEXT_LABELS and name not in given:
                if ctx is None or bounds is None:
                    raise ValueError(f"label {name!r} needs the request context")
                out.append(_context_value(bounds, ctx, name))
                continue
            try:
                value = given[name]
            except KeyError:
                raise ValueError(f"label {name!r} has no value") from None
            allowed = self.enums.get(name)
            out.append(value if allowed is None or value in allowed else OTHER)
        return out


def _context_value(bounds: LabelBounds, ctx: RequestContext, name: str) -> str:
    if name == "team":
        return bounds.team(ctx)
    if name == "model":
        return bounds.model(ctx)
    if name == "upstream":
        return bounds.upstream(ctx.upstream_name)
    outcome = ctx.outcome.value if ctx.outcome is not None else "error"
    return outcome if outcome in _OUTCOMES else OTHER


class Instrument(Generic[M]):
    """A declared Counter, Gauge or Histogram: `labels(ctx, **values)` is the child to update.

    Context labels come from `ctx`; the others are given by keyword. Without labels,
    `labels()` is the metric itself.
    """

    __slots__ = ("_labels", "metric")

    def __init__(self, metric: M, labels: _Labels) -> None:
        self.metric: M = metric
        self._labels = labels

    def labels(self, ctx: RequestContext | None = None, **values: str) -> M:
        """The child of this label set (created on first use)."""
        if not self._labels.names:
            return self.metric
        return self.metric.labels(*self._labels.values(ctx, values))


@dataclass(slots=True)
class _Bucketed:
    counts: list[int]
    total: float = 0.0


class BucketCounts(Collector):
    """A histogram filled from counts a plugin bucketed itself (one bisect per observation
    in its own per-request state), merged once per request with `merge`."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], labels: _Labels):
        self.name = name
        self.documentation = documentation
        self.buckets = tuple(float(b) for b in buckets)
        self._labels = labels
        self._series: dict[tuple[str, ...], _Bucketed] = {}

    def merge(
        self,
        ctx: RequestContext | None,
        counts: Sequence[int],
        total: float,
        **values: str,
    ) -> None:
        """Add per-bucket counts (not cumulative; one more than `buckets`: the +Inf one)."""
        if len(counts) != len(self.buckets) + 1:
            raise ValueError(f"{self.name}: {len(self.buckets) + 1} counts expected")
        key = tuple(self._labels.values(ctx, values)) if self._labels.names else ()
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Bucketed([0] * len(counts))
        mine = series.counts
        for i, n in enumerate(counts):
            mine[i] += n
        series.total += total

    def describe(self) -> Iterable[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self._labels.names)]

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self._labels.names)
        bounds = [*(repr(b) for b in self.buckets), "+Inf"]
        for key, series in sorted(self._series.items()):
            running, cumulative = 0, []
            for bound, n in zip(bounds, series.counts, strict=True):
                running += n
                cumulative.append((bound, float(running)))
            family.add_metric(list(key), cumulative, series.total)
        return [family]


@dataclass(eq=False)
class _Read(Collector):
    """A counter or gauge read at scrape time from each live plugin instance."""

    name: str
    documentation: str
    kind: str  # "counter": retired totals kept, live ones summed; "gauge": the largest live one
    readers: dict[int, Callable[[], float]] = field(default_factory=dict)
    retired: float = 0.0

    def _family(self) -> CounterMetricFamily | GaugeMetricFamily:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.documentation)
        return GaugeMetricFamily(self.name, self.documentation)

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        family = self._family()
        values = [read() for read in list(self.readers.values())]
        if self.kind == "counter":
            family.add_metric([], self.retired + sum(values))
        else:
            family.add_metric([], max(values, default=0.0))
        yield family

    def retire(self, instance: int) -> None:
        read = self.readers.pop(instance, None)
        if read is not None and self.kind == "counter":
            self.retired += read()


@dataclass(frozen=True, slots=True)
class _Declared:
    owner: str  # plugin name
    kind: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...]
    thing: Instrument[Any] | BucketCounts | _Read
    enums: dict[str, set[str]]


class PluginMetricsStore:
    """Every plugin-declared metric of one gateway (held by `GatewayMetrics`)."""

    def __init__(
        self, registry: CollectorRegistry, bounds: Callable[[], LabelBounds] | None = None
    ) -> None:
        self.registry = registry
        self._bounds: Callable[[], LabelBounds] = bounds or _Unbounded
        self._declared: dict[str, _Declared] = {}
        self._instances: dict[int, object] = {}  # declared instances (kept so ids stay unique)

    def declare(self, plugin: str, instance: object) -> bool:
        """Call `instance.declare_metrics` once; False if it was declared before."""
        if id(instance) in self._instances:
            return False
        self._instances[id(instance)] = instance
        declare = getattr(instance, "declare_metrics", None)
        if declare is not None:
            declare(PluginMetrics(self, plugin, id(instance)))
        return True

    def retire(self, instance: object) -> None:
        """`instance` serves no more: keep its read counters' totals, drop its readers."""
        if self._instances.pop(id(instance), None) is None:
            return
        for declared in self._declared.values():
            if isinstance(declared.thing, _Read):
                declared.thing.retire(id(instance))

    def _get(
        self,
        plugin: str,
        name: str,
        kind: str,
        labels: Sequence[str],
        values: Mapping[str, Iterable[str]] | None,
        buckets: Sequence[float] = (),
    ) -> _Declared | None:
        """The existing declaration of `name` (its enums extended), or None if new."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"metric name {name!r}: must match {_NAME.pattern}")
        values = values or {}
        for label in labels:
            if label not in CONTEXT_LABELS and label not in values:
                raise ValueError(
                    f"metric {name}: label {label!r} needs its values listed (values=...); "
                    f"context labels are {', '.join(sorted(CONTEXT_LABELS))}"
                )
        unknown = set(values) - set(labels)
        if unknown:
            raise ValueError(f"metric {name}: values for undeclared labels {sorted(unknown)}")
        found = self._declared.get(name)
        if found is None:
            return None
        if (found.owner, found.kind, found.labels) != (plugin, kind, tuple(labels)) or (
            found.buckets != tuple(float(b) for b in buckets)
        ):
            raise ValueError(
                f"metric {name} is already declared by plugin {found.owner!r} as a {found.kind} "
                f"with labels {list(found.labels)}"
            )
        for label, allowed in values.items():
            found.enums[label].update(allowed)
        return found

    def _add(self, plugin: str, name: str, declared: _Declared) -> None:
        thing = declared.thing
        collector = thing.metric if isinstance(thing, Instrument) else thing
        try:
            self.registry.register(collector)
        except ValueError as err:  # a core metric's name, or another registration
            raise ValueError(f"metric {name} of plugin {plugin!r}: {err}") from None
        self._declared[name] = declared

    def _labels(self, labels: Sequence[str], values: Mapping[str, Iterable[str]] | None) -> _Labels:
        enums = {label: set(allowed) for label, allowed in (values or {}).items()}
        return _Labels(labels, enums, self._bounds)


class PluginMetrics:
    """What `declare_metrics` receives: creates this plugin's instruments (see the module)."""

    def __init__(self, store: PluginMetricsStore, plugin: str, instance: int) -> None:
        self._store = store
        self.plugin = plugin
        self._instance = instance

    @property
    def prefix(self) -> str:
        """The conventional start of this plugin's metric names: `sluice_<plugin>_`."""
        return f"sluice_{self.plugin}_"

    def _metric(
        self,
        kind: str,
        name: str,
        labels: Sequence[str],
        values: Mapping[str, Iterable[str]] | None,
        make: Callable[[tuple[str, ...]], M],
        buckets: Sequence[float] = (),
    ) -> Instrument[M]:
        store = self._store
        found = store._get(self.plugin, name, kind, labels, values, buckets)
        if found is not None:
            return cast(Instrument[M], found.thing)  # same name, kind and labels
        bound = store._labels(labels, values)
        instrument = Instrument(make(tuple(labels)), bound)
        floats = tuple(float(b) for b in buckets)
        declared = _Declared(self.plugin, kind, tuple(labels), floats, instrument, bound.enums)
        store._add(self.plugin, name, declared)
        return instrument

    def counter(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        *,
        values: Mapping[str, Iterable[str]] | None = None,
    ) -> Instrument[Counter]:
        """A counter (shown with `_total`); `values` lists the values of non-context labels."""

        def make(names: tuple[str, ...]) -> Counter:
            return Counter(name, documentation, names, registry=None)

        return self._metric("counter", name, labels, values, make)

    def gauge(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        *,
        values: Mapping[str, Iterable[str]] | None = None,
    ) -> Instrument[Gauge]:
        """A gauge; `values` lists the values of non-context labels."""

        def make(names: tuple[str, ...]) -> Gauge:
            return Gauge(name, documentation, names, registry=None)

        return self._metric("gauge", name, labels, values, make)

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        values: Mapping[str, Iterable[str]] | None = None,
    ) -> Instrument[Histogram]:
        """A histogram with these bucket upper bounds."""

        def make(names: tuple[str, ...]) -> Histogram:
            return Histogram(name, documentation, names, buckets=buckets, registry=None)

        return self._metric("histogram", name, labels, values, make, buckets)

    def bucket_counts(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        values: Mapping[str, Iterable[str]] | None = None,
    ) -> BucketCounts:
        """A histogram the plugin fills with per-request bucket counts (`BucketCounts.merge`)."""
        store = self._store
        found = store._get(self.plugin, name, "bucket_counts", labels, values, buckets)
        if found is not None:
            assert isinstance(found.thing, BucketCounts)
            return found.thing
        bound = store._labels(labels, values)
        collector = BucketCounts(name, documentation, buckets, bound)
        declared = _Declared(
            self.plugin, "bucket_counts", tuple(labels), collector.buckets, collector, bound.enums
        )
        store._add(self.plugin, name, declared)
        return collector

    def read_counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A counter read at scrape time from this instance (e.g. failures it counts); the
        total of a retired instance is kept."""
        self._read("counter", name, documentation, read)

    def read_gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge read at scrape time: the largest value of the live instances (0 if none)."""
        self._read("gauge", name, documentation, read)

    def _read(self, kind: str, name: str, documentation: str, read: Callable[[], float]) -> None:
        store = self._store
        found = store._get(self.plugin, name, f"read_{kind}", (), None)
        if found is None:
            found = _Declared(
                self.plugin, f"read_{kind}", (), (), _Read(name, documentation, kind), {}
            )
            store._add(self.plugin, name, found)
        assert isinstance(found.thing, _Read)
        found.thing.readers[self._instance] = read
