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


@dataclass(frozen=True)
class Criterion:
    """A target Sluice should meet; evaluated on the sluice column."""

    text: str
    check: Callable[[float, Results], bool | None]  # None: cannot be judged in this run


def _lt(limit: float) -> Callable[[float, Results], bool | None]:
    return lambda value, _results: operator.lt(value, limit)


def _half_of_bare(value: float, results: Results) -> bool | None:
    bare = dig(results.get("bare"), "saturation", "events_per_s")
    return value >= 0.5 * bare if isinstance(bare, int | float) and bare > 0 else None


@dataclass(frozen=True)
class Row:
    label: str
    get: Getter | None = None
    fmt: str = ".2f"
    ratio: bool = True
    criterion: Criterion | None = None


def _latency_rows(conc: int) -> list[Row]:
    rows = [
        Row(f"c={conc} TTFT p50 (ms)", at("latency", f"c{conc}", "ttft_ms", "p50")),
        Row(f"c={conc} TTFT p99 (ms)", at("latency", f"c{conc}", "ttft_ms", "p99")),
        Row(f"c={conc} gap p50 (ms)", at("latency", f"c{conc}", "gap_ms", "p50")),
        Row(f"c={conc} gap p99 (ms)", at("latency", f"c{conc}", "gap_ms", "p99")),
    ]
    big = conc >= 32
    for metric, name, limit in (("ttft_ms", "TTFT", 2.0), ("gap_ms", "gap", 1.0)):
        for pct in ("p50", "p99"):
            crit = Criterion(f"< {limit:g} ms", _lt(limit)) if big and pct == "p99" else None
            label = f"c={conc} added {name} {pct} (ms)"
            rows.append(Row(label, added(conc, metric, pct), "+.2f", False, crit))
    rows += [
        Row(f"c={conc} streams measured", at("latency", f"c{conc}", "streams"), "d"),
        Row(f"c={conc} streams failed", at("latency", f"c{conc}", "failed"), "d", False),
    ]
    return rows


def build_rows(latency_concurrency: tuple[int, ...]) -> list[Row]:
    sat = ("saturation",)
    mem = ("memory",)
    rows = [
        Row("Startup", None),
        Row("spawn to /readyz 200, median (ms)", startup_median, ".0f", True,
            Criterion("< 1000 ms", _lt(1000.0))),
        Row("OpenAI stream relayed intact", at("correctness"), "s", False),
        Row("Latency (fake: TTFT 20 ms, gap 10 ms, 50 events)", None),
    ]  # fmt: skip
    for conc in latency_concurrency:
        rows += _latency_rows(conc)
    rows += [
        Row("Saturation (fake: gap 0, 2000 events/stream, c=32)", None),
        Row("events/s", at(*sat, "events_per_s"), ",.0f", True,
            Criterion(">= 50% of bare", _half_of_bare)),
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
            Criterion("< 64 KiB", _lt(64.0))),
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


def _ratio(row: Row, results: Results) -> str:
    if row.get is None or not row.ratio:
        return ""
    mine, bare = row.get(results, "sluice"), row.get(results, "bare")
    if not isinstance(mine, int | float) or not isinstance(bare, int | float) or not bare:
        return "-"
    return f"{mine / bare:.2f}x"


def verdict(row: Row, results: Results) -> str:
    if row.criterion is None or row.get is None:
        return ""
    value = row.get(results, "sluice")
    if not isinstance(value, int | float):
        return "n/a"
    ok = row.criterion.check(float(value), results)
    return "n/a" if ok is None else "PASS" if ok else "FAIL"


def render_table(results: Results, columns: list[str], rows: list[Row]) -> str:
    header = ["metric", *columns, "sluice/bare", "target", "sluice"]
    body: list[list[str] | str] = []
    for row in rows:
        if row.get is None:
            body.append(row.label)
            continue
        cells = [fmt_value(row.get(results, name), row.fmt) for name in columns]
        target = row.criterion.text if row.criterion else ""
        body.append([row.label, *cells, _ratio(row, results), target, verdict(row, results)])
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


PROXIES = ("sluice", "nginx", "litellm")
RATIO_ROWS = {
    "events/s": "events/s at saturation",
    "proxy CPU s / 100k events (direct: fake)": "CPU s per 100k events",
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
        if row.criterion is None or row.get is None:
            continue
        out.append(
            {
                "metric": row.label,
                "target": row.criterion.text,
                "sluice": row.get(results, "sluice"),
                "bare": row.get(results, "bare"),
                "result": verdict(row, results),
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
