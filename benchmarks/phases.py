"""The measurement phases run against each target: correctness, memory, latency, saturation."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from benchmarks import procstat
from benchmarks.loadgen import (
    IdleStreams,
    LoadSpec,
    LoadStats,
    chat_body,
    check_stream,
    run_load,
    summarize_ms,
)

MIB = 1024 * 1024
CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Plan:
    """Durations and shapes of every phase; `quick()` is the CI smoke variant."""

    latency_concurrency: tuple[int, ...] = (1, 32)
    latency_events: int = 50
    latency_ttft_ms: float = 20.0
    latency_gap_ms: float = 20.0  # 50 tokens/s, a typical hosted model
    latency_warmup_s: float = 1.0
    latency_s: float = 10.0  # split over `rounds`
    saturation_concurrency: int = 32
    saturation_events: int = 2000
    saturation_warmup_s: float = 1.0
    saturation_s: float = 10.0  # split over `rounds`
    unary_concurrency: int = 8
    unary_warmup_s: float = 1.0
    unary_s: float = 6.0  # split over `rounds`
    memory_streams: int = 1000
    memory_events: int = 30
    memory_gap_ms: float = 2000.0
    memory_open_timeout_s: float = 40.0
    memory_settle_s: float = 1.0
    correctness_events: int = 20
    startup_repeats: int = 3
    rounds: int = 2

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            latency_warmup_s=0.5,
            latency_s=3.0,
            saturation_warmup_s=0.5,
            saturation_s=4.0,
            unary_warmup_s=0.5,
            unary_s=3.0,
            memory_open_timeout_s=20.0,
            memory_settle_s=0.5,
            startup_repeats=1,
            rounds=1,
        )


@dataclass
class Target:
    """A running thing to benchmark: where to send requests and which process to measure."""

    name: str
    base_url: str
    pid: int

    @property
    def chat_url(self) -> str:
        return self.base_url + CHAT_PATH


class FakeControl:
    """Talks to the fake upstream's control endpoints directly (never through a proxy)."""

    def __init__(self, base_url: str, pid: int) -> None:
        self.base_url = base_url
        self.pid = pid

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        data = None if body is None else orjson.dumps(body)
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, self.base_url + path, data=data) as resp,
        ):
            resp.raise_for_status()
            result: dict[str, Any] = orjson.loads(await resp.read())
            return result

    async def configure(self, events: int, ttft_ms: float, gap_ms: float) -> None:
        shape = {"events": events, "ttft_ms": ttft_ms, "gap_ms": gap_ms}
        await self._call("POST", "/_bench/config", shape)

    async def stats(self) -> dict[str, Any]:
        return await self._call("GET", "/_bench/stats")

    async def wait_drained(self, timeout_s: float) -> float | None:
        """Seconds until the fake has no open stream, or None if it still has some."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout_s:
            if (await self.stats())["open"] == 0:
                return time.perf_counter() - start
            await asyncio.sleep(0.05)
        return None


def progress(target: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {target:>6}: {message}", file=sys.stderr, flush=True)


async def correctness(target: Target, fake: FakeControl, plan: Plan) -> str:
    """'ok', or what is wrong with one stream relayed by the target."""
    await fake.configure(plan.correctness_events, 0.0, 0.0)
    problem = await check_stream(target.chat_url, plan.correctness_events)
    return "ok" if problem is None else problem


async def memory(target: Target, fake: FakeControl, plan: Plan) -> dict[str, Any]:
    """RSS of the target before and while `plan.memory_streams` idle streams are open."""
    await fake.wait_drained(10.0)
    await fake.configure(plan.memory_events, 0.0, plan.memory_gap_ms)
    await asyncio.sleep(0.2)
    idle = procstat.sample(target.pid)
    start = time.perf_counter()
    async with IdleStreams(target.chat_url, chat_body()) as holder:
        opened = await holder.open(plan.memory_streams, plan.memory_open_timeout_s)
        open_s = time.perf_counter() - start
        await asyncio.sleep(plan.memory_settle_s)
        loaded = procstat.sample(target.pid)
        upstream_open = (await fake.stats())["open"]
        errors = dict(holder.errors.most_common(3))
    released_s = await fake.wait_drained(15.0)
    after = procstat.sample(target.pid)
    grown = loaded.rss_bytes - idle.rss_bytes
    return {
        "streams_wanted": plan.memory_streams,
        "streams_open": opened,
        "upstream_streams_open": upstream_open,
        "open_all_s": open_s,
        "rss_idle_mib": idle.rss_bytes / MIB,
        "rss_open_mib": loaded.rss_bytes / MIB,
        "rss_after_close_mib": after.rss_bytes / MIB,
        "kib_per_stream": grown / opened / 1024 if opened else None,
        "upstream_released_s": released_s,
        "processes": loaded.processes,
        "errors": errors,
    }


def _stream_seconds(plan: Plan) -> float:
    return (plan.latency_ttft_ms + (plan.latency_events + 1) * plan.latency_gap_ms) / 1000


@dataclass
class LatencyRound:
    """One paced round: the client-side samples and the target's CPU over the window."""

    stats: LoadStats
    cpu_s: float


class _CpuWindow:
    """CPU seconds of one process between the load generator's window marks."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.end = 0.0

    def open(self) -> None:
        self.start = procstat.sample(self.pid).cpu_s

    def close(self) -> None:
        self.end = procstat.sample(self.pid).cpu_s

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)


async def latency_round(target: Target, fake: FakeControl, plan: Plan, conc: int) -> LatencyRound:
    """One round of paced streams (fake: TTFT 20 ms, gap 20 ms) at concurrency `conc`."""
    await fake.configure(plan.latency_events, plan.latency_ttft_ms, plan.latency_gap_ms)
    cpu = _CpuWindow(target.pid)
    spec = LoadSpec(
        url=target.chat_url,
        body=chat_body(),
        concurrency=conc,
        duration_s=plan.latency_s / plan.rounds,
        warmup_s=plan.latency_warmup_s,
        timed=True,
        stagger_s=_stream_seconds(plan),
        expect_events=plan.latency_events + 2,
        on_window_start=cpu.open,
        on_window_end=cpu.close,
    )
    stats = await run_load(spec)
    return LatencyRound(stats, cpu.seconds)


def latency_summary(rounds: list[LatencyRound], conc: int) -> dict[str, Any]:
    """TTFT and gap percentiles over all rounds' samples; CPU per event of paced streams."""
    stats = [r.stats for r in rounds]
    ttfts = [t for r in stats for t in r.ttfts_ns]
    gaps = [g for r in stats for g in r.gaps_ns]
    errors: Counter[str] = sum((r.errors for r in stats), Counter())
    return {
        "concurrency": conc,
        "rounds": len(rounds),
        "streams": sum(r.streams_ok for r in stats),
        "failed": sum(r.streams_failed for r in stats),
        "errors": dict(errors.most_common(3)),
        "ttft_ms": summarize_ms(ttfts),
        "gap_ms": summarize_ms(gaps),
        "cpu_s_per_100k_events": _per_100k(
            sum(r.cpu_s for r in rounds), sum(r.events for r in stats)
        ),
    }


async def unary_round(target: Target, fake: FakeControl, plan: Plan) -> LatencyRound:
    """Back-to-back non-streaming requests; the target's CPU over the window."""
    await fake.configure(plan.latency_events, 0.0, 0.0)
    cpu = _CpuWindow(target.pid)
    spec = LoadSpec(
        url=target.chat_url,
        body=chat_body(stream=False),
        concurrency=plan.unary_concurrency,
        duration_s=plan.unary_s / plan.rounds,
        warmup_s=plan.unary_warmup_s,
        timed=False,
        unary=True,
        on_window_start=cpu.open,
        on_window_end=cpu.close,
    )
    stats = await run_load(spec)
    return LatencyRound(stats, cpu.seconds)


def unary_summary(rounds: list[LatencyRound], plan: Plan) -> dict[str, Any]:
    """Requests/s and CPU ms per non-streaming request over the summed windows."""
    completed = sum(r.stats.completed_in_window for r in rounds)
    window = sum(r.stats.window_s for r in rounds) or plan.unary_s
    cpu = sum(r.cpu_s for r in rounds)
    errors: Counter[str] = sum((r.stats.errors for r in rounds), Counter())
    return {
        "concurrency": plan.unary_concurrency,
        "rounds": len(rounds),
        "requests": completed,
        "requests_per_s": completed / window,
        "cpu_ms_per_request": cpu / completed * 1000 if completed else None,
        "failed": sum(r.stats.streams_failed for r in rounds),
        "errors": dict(errors.most_common(3)),
    }


@dataclass
class SaturationRound:
    """Counts and CPU seconds (target, fake, load generator) over one measuring window."""

    events: int = 0
    completed: int = 0
    failed: int = 0
    window_s: float = 0.0
    target_cpu_s: float = 0.0
    fake_cpu_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)


async def saturation_round(target: Target, fake: FakeControl, plan: Plan) -> SaturationRound:
    """One round of gap-0 streams at the saturation concurrency."""
    await fake.configure(plan.saturation_events, 0.0, 0.0)
    marks: dict[str, tuple[float, float, float]] = {}

    def mark(name: str) -> None:
        target_cpu = procstat.sample(target.pid).cpu_s
        marks[name] = (target_cpu, procstat.sample(fake.pid).cpu_s, procstat.self_cpu_seconds())

    spec = LoadSpec(
        url=target.chat_url,
        body=chat_body(),
        concurrency=plan.saturation_concurrency,
        duration_s=plan.saturation_s / plan.rounds,
        warmup_s=plan.saturation_warmup_s,
        timed=False,
        hard_stop=True,
        expect_events=plan.saturation_events + 2,
        on_window_start=lambda: mark("start"),
        on_window_end=lambda: mark("end"),
    )
    stats = await run_load(spec)
    target_cpu, fake_cpu, loadgen_cpu = (
        end - start for start, end in zip(marks["start"], marks["end"], strict=True)
    )
    return SaturationRound(
        stats.events,
        stats.completed_in_window,
        stats.streams_failed,
        stats.window_s,
        target_cpu,
        fake_cpu,
        loadgen_cpu,
        stats.errors,
    )


def _per_100k(cpu_s: float, events: int) -> float | None:
    return cpu_s / events * 100_000 if events else None


def saturation_summary(rounds: list[SaturationRound], plan: Plan, direct: bool) -> dict[str, Any]:
    """Rates over the summed windows; CPU per 100k events for target, fake and loadgen."""
    total = SaturationRound()
    for r in rounds:
        total.events += r.events
        total.completed += r.completed
        total.failed += r.failed
        total.window_s += r.window_s
        total.target_cpu_s += r.target_cpu_s
        total.fake_cpu_s += r.fake_cpu_s
        total.loadgen_cpu_s += r.loadgen_cpu_s
        total.errors.update(r.errors)
    window = total.window_s or plan.saturation_s
    busy = total.target_cpu_s + total.loadgen_cpu_s + (0.0 if direct else total.fake_cpu_s)
    return {
        "concurrency": plan.saturation_concurrency,
        "rounds": len(rounds),
        "window_s": window,
        "events": total.events,
        "events_per_s": total.events / window,
        "requests_per_s": total.completed / window,
        "cpu_s_per_100k_events": _per_100k(total.target_cpu_s, total.events),
        "fake_cpu_s_per_100k_events": _per_100k(total.fake_cpu_s, total.events),
        "loadgen_cpu_s_per_100k_events": _per_100k(total.loadgen_cpu_s, total.events),
        "cores_busy": busy / window,
        "failed": total.failed,
        "errors": dict(total.errors.most_common(3)),
    }


def peak_rss_mib(target: Target) -> float:
    return procstat.sample(target.pid).peak_rss_bytes / MIB
