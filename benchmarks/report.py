"""Turning per-target results into the side-by-side table, the pass/fail list and JSON."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Results = dict[str, dict[str, Any]]
Value = float | int | str | None
Getter = Callable[[Results, str], Value]


def dig(obj: Any, *path: str) -> Any:
    """obj[p0][p1]...; None as soon as a step is missing."""
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def at(*path: str) -> Getter:
    def get(results: Results, name: str) -> Value:
        value = dig(results.get(name), *path)
        return value if isinstance(value, int | float | str) else None

    return get


def added(conc: int, metric: str, pct: str) -> Getter:
    """Through-target percentile minus the direct one (same concurrency, same percentile)."""

    def get(results: Results, name: str) -> Value:
        if name == "direct":
            return None
        mine = dig(results.get(name), "latency", f"c{conc}", metric, pct)
        base = dig(results.get("direct"), "latency", f"c{conc}", metric, pct)
        if not isinstance(mine, int | float) or not isinstance(base, int | float):
            return None
        return float(mine - base)

    return get


def startup_median(results: Results, name: str) -> Value:
    times = dig(results.get(name), "startup_ms")
    if not isinstance(times, list) or not times:
        return None
    ordered = sorted(times)
    return float(ordered[len(ordered) // 2])


SLUICE_TARGETS = ("sluice", "production")
"""The Sluice columns: the default config, and what a platform team runs."""


@dataclass(frozen=True)
class Criterion:
    """A target a Sluice column should meet."""

    text: str
    check: Callable[[float, Results], bool | None]  # None: cannot be judged in this run


def _lt(limit: float) -> Criterion:
    return Criterion(f"< {limit:g}", lambda value, _results: operator.lt(value, limit))


def _le(limit: float) -> Criterion:
    return Criterion(f"<= {limit:g}", lambda value, _results: operator.le(value, limit))


def _vs_bare(path: tuple[str, ...], factor: float, *, at_most: bool) -> Criterion:
    """The value against bare's value of the same metric: <= factor x (or >= factor x)."""

    def check(value: float, results: Results) -> bool | None:
        bare = dig(results.get("bare"), *path)
        if not isinstance(bare, int | float) or bare <= 0:
            return None
        return value <= factor * bare if at_most else value >= factor * bare

    return Criterion(f"{'<=' if at_most else '>='} {factor:g}x bare", check)


@dataclass(frozen=True)
class Row:
    label: str
    get: Getter | None = None
    fmt: str = ".2f"
    ratio: bool = True
    criteria: dict[str, Criterion] | None = None  # by Sluice column


def _both(criterion: Criterion) -> dict[str, Criterion]:
    return dict.fromkeys(SLUICE_TARGETS, criterion)


def _latency_rows(conc: int) -> list[Row]:
    rows = [
        Row(f"c={conc} TTFT p50 (ms)", at("latency", f"c{conc}", "ttft_ms", "p50")),
        Row(f"c={conc} TTFT p99 (ms)", at("latency", f"c{conc}", "ttft_ms", "p99")),
        Row(f"c={conc} gap p50 (ms)", at("latency", f"c{conc}", "gap_ms", "p50")),
        Row(f"c={conc} gap p99 (ms)", at("latency", f"c{conc}", "gap_ms", "p99")),
    ]
    big = conc >= 32
    limits = {
        "ttft_ms": {"sluice": _le(1.5), "production": _le(2.5)},
        "gap_ms": _both(_lt(1.0)),
    }
    for metric, name in (("ttft_ms", "TTFT"), ("gap_ms", "gap")):
        for pct in ("p50", "p99"):
            crit = limits[metric] if big and pct == "p99" else None
            label = f"c={conc} added {name} {pct} (ms)"
            rows.append(Row(label, added(conc, metric, pct), "+.2f", False, crit))
    paced = ("latency", f"c{conc}", "cpu_s_per_100k_events")
    cpu_crit = {
        "sluice": _vs_bare(paced, 1.3, at_most=True),
        "production": _vs_bare(paced, 1.5, at_most=True),
    }
    rows += [
        Row(f"c={conc} proxy CPU s / 100k events (direct: fake)", at(*paced), ".2f", True,
            cpu_crit if big else None),
        Row(f"c={conc} streams measured", at("latency", f"c{conc}", "streams"), "d"),
        Row(f"c={conc} streams failed", at("latency", f"c{conc}", "failed"), "d", False),
    ]  # fmt: skip
    return rows


def build_rows(latency_concurrency: tuple[int, ...]) -> list[Row]:
    sat = ("saturation",)
    mem = ("memory",)
    unary = ("unary",)
    unary_cpu = (*unary, "cpu_ms_per_request")
    rows = [
        Row("Startup", None),
        Row("spawn to /readyz 200, median (ms)", startup_median, ".0f", True, _both(_lt(1000.0))),
        Row("OpenAI stream relayed intact", at("correctness"), "s", False),
        Row("Latency (fake: TTFT 20 ms, gap 20 ms = 50 tokens/s, 50 events)", None),
    ]  # fmt: skip
    for conc in latency_concurrency:
        rows += _latency_rows(conc)
    rows += [
        Row("Non-streaming requests (c=8, back to back)", None),
        Row("requests/s", at(*unary, "requests_per_s"), ".0f"),
        Row("proxy CPU ms / request (direct: fake)", at(*unary_cpu), ".3f", True,
            {"sluice": _vs_bare(unary_cpu, 1.3, at_most=True),
             "production": _vs_bare(unary_cpu, 2.0, at_most=True)}),
        Row("requests failed", at(*unary, "failed"), "d", False),
        Row("Saturation (fake: gap 0, 2000 events/stream, c=32)", None),
        Row("events/s", at(*sat, "events_per_s"), ",.0f", True,
            {"sluice": _vs_bare((*sat, "events_per_s"), 1.0, at_most=False),
             "production": _vs_bare((*sat, "events_per_s"), 0.8, at_most=False)}),
        Row("requests/s", at(*sat, "requests_per_s"), ".1f"),
        Row("proxy CPU s / 100k events (direct: fake)", at(*sat, "cpu_s_per_100k_events")),
        Row("fake upstream CPU s / 100k events", at(*sat, "fake_cpu_s_per_100k_events")),
        Row("loadgen CPU s / 100k events", at(*sat, "loadgen_cpu_s_per_100k_events")),
        Row("cores busy (of 2, all processes)", at(*sat, "cores_busy")),
        Row("streams failed", at(*sat, "failed"), "d", False),
        Row("Memory (idle open streams; direct: fake's RSS)", None),
        Row("streams open (first event received)", at(*mem, "streams_open"), "d"),
        Row("RSS idle (MiB)", at(*mem, "rss_idle_mib"), ".1f"),
        Row("RSS with streams open (MiB)", at(*mem, "rss_open_mib"), ".1f"),
        Row("KiB per open idle stream", at(*mem, "kib_per_stream"), ".1f", True,
            _both(_lt(64.0))),
        Row("peak RSS over the run (MiB)", at("peak_rss_mib"), ".1f"),
        Row("upstream closed after client left (s)", at(*mem, "upstream_released_s")),
    ]  # fmt: skip
    return rows


def fmt_value(value: Value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value if len(value) <= 14 else value[:11] + "..."
    if spec == "d":
        return f"{int(value):d}"
    return format(value, spec)


def _ratio(row: Row, results: Results, name: str) -> str:
    if row.get is None or not row.ratio:
        return ""
    mine, bare = row.get(results, name), row.get(results, "bare")
    if not isinstance(mine, int | float) or not isinstance(bare, int | float) or not bare:
        return "-"
    return f"{mine / bare:.2f}x"


def verdict(row: Row, results: Results, name: str) -> str:
    criterion = (row.criteria or {}).get(name)
    if criterion is None or row.get is None:
        return ""
    value = row.get(results, name)
    if not isinstance(value, int | float):
        return "n/a"
    ok = criterion.check(float(value), results)
    return "n/a" if ok is None else "PASS" if ok else "FAIL"


def _target_text(row: Row) -> str:
    """The criteria of a row: one text, or each Sluice column's (`sluice <= 1.5 / ...`)."""
    if not row.criteria:
        return ""
    texts = {name: c.text for name, c in row.criteria.items()}
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return " / ".join(f"{name[:4]} {text}" for name, text in texts.items())


def render_table(results: Results, columns: list[str], rows: list[Row]) -> str:
    ours = [name for name in SLUICE_TARGETS if name in columns]
    header = ["metric", *columns, *(f"{n}/bare" for n in ours), "target", *ours]
    body: list[list[str] | str] = []
    for row in rows:
        if row.get is None:
            body.append(row.label)
            continue
        cells = [fmt_value(row.get(results, name), row.fmt) for name in columns]
        ratios = [_ratio(row, results, name) for name in ours]
        verdicts = [verdict(row, results, name) for name in ours]
        body.append([row.label, *cells, *ratios, _target_text(row), *verdicts])
    widths = [len(h) for h in header]
    for line in body:
        if isinstance(line, list):
            widths = [max(w, len(c)) for w, c in zip(widths, line, strict=True)]

    def join(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * len(join(header))
    out = [join(header), rule]
    for line in body:
        out.append(join(line) if isinstance(line, list) else f"-- {line}")
    return "\n".join(out)


PROXIES = (*SLUICE_TARGETS, "nginx", "litellm")
RATIO_ROWS = {
    "events/s": "events/s at saturation",
    "c=32 proxy CPU s / 100k events (direct: fake)": "CPU s per 100k events, paced c=32",
    "proxy CPU ms / request (direct: fake)": "CPU ms per non-streaming request",
    "proxy CPU s / 100k events (direct: fake)": "CPU s per 100k events, saturated",
    "KiB per open idle stream": "KiB per open idle stream",
    "spawn to /readyz 200, median (ms)": "spawn to ready",
}
ADDED_ROWS = (
    "c=32 added TTFT p99 (ms)",
    "c=32 added gap p99 (ms)",
)


def peer_ratios(results: Results, rows: list[Row]) -> dict[str, dict[str, Value]]:
    """Each proxy against bare for the rows that compare proxies, plus its added latency."""
    by_label = {row.label: row for row in rows if row.get is not None}
    out: dict[str, dict[str, Value]] = {}
    for label in RATIO_ROWS:
        row = by_label.get(label)
        if row is None or row.get is None:
            continue
        bare = row.get(results, "bare")
        cells: dict[str, Value] = {}
        for name in PROXIES:
            mine = row.get(results, name)
            ok = isinstance(mine, int | float) and isinstance(bare, int | float) and bare
            cells[name] = float(mine) / float(bare) if ok else None  # type: ignore[arg-type]
        out[label] = cells
    for label in ADDED_ROWS:
        row = by_label.get(label)
        if row is not None and row.get is not None:
            out[label] = {name: row.get(results, name) for name in ("bare", *PROXIES)}
    return out


def _times(value: Value) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def render_peer_ratios(results: Results, rows: list[Row], columns: list[str]) -> str:
    """The proxies side by side: ratios to bare (x) and added latency (ms, also bare's)."""
    names = [n for n in PROXIES if n in columns]
    if not names:
        return ""
    table = peer_ratios(results, rows)
    header = ["each proxy vs bare (same run)", *names]
    lines: list[list[str]] = []
    for label, cells in table.items():
        if label in ADDED_ROWS:
            bare = fmt_value(cells.get("bare"), "+.2f")
            values = [fmt_value(cells.get(n), "+.2f") for n in names]
            lines.append([f"{label} (bare {bare})", *values])
        else:
            values = [_times(cells.get(n)) for n in names]
            lines.append([f"{RATIO_ROWS[label]} / bare", *values])
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def join(cells: list[str]) -> str:
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([cells[0].ljust(widths[0]), *rest])

    text = [join(r) for r in [header, *lines]]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def criteria_summary(results: Results, rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if not row.criteria or row.get is None:
            continue
        for name, criterion in row.criteria.items():
            if name not in results:
                continue
            out.append(
                {
                    "metric": row.label,
                    "column": name,
                    "target": criterion.text,
                    "value": row.get(results, name),
                    "bare": row.get(results, "bare"),
                    "result": verdict(row, results, name),
                }
            )
    return out


def derived(results: Results, rows: list[Row]) -> dict[str, dict[str, Value]]:
    """Every table cell by metric then target, for the JSON file."""
    table: dict[str, dict[str, Value]] = {}
    for row in rows:
        if row.get is not None:
            table[row.label] = {name: row.get(results, name) for name in results}
    return table
