"""Runs every phase against every target, phase by phase.

All targets are started first (each one's spawn-to-ready timed) and stay up until the end.
Each phase then visits the targets one after the other, so the columns being compared were
measured minutes apart at most; latency and saturation are split into rounds visited in
alternating order (A B C, then C B A) so a slow drift of the machine does not favour one column.
A target that fails is marked with an error and skipped by later phases; the others go on.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.phases import (
    FakeControl,
    LatencyRound,
    Plan,
    SaturationRound,
    Target,
    correctness,
    latency_round,
    latency_summary,
    memory,
    peak_rss_mib,
    progress,
    saturation_round,
    saturation_summary,
    unary_round,
    unary_summary,
)
from benchmarks.targets import (
    LITELLM_READY_PATH,
    LOOPBACK,
    ManagedProcess,
    ProcessFactory,
    StartError,
    bare_process,
    launch_repeatedly,
    litellm_binary,
    litellm_process,
    nginx_binary,
    nginx_process,
    production_process,
    sluice_process,
)

READY_TIMEOUT_S = 30.0
PEERS: dict[str, Callable[[], object | None]] = {"nginx": nginx_binary, "litellm": litellm_binary}
"""Optional targets: measured when found, else skipped with a line saying so."""
SLOW_START_S = {"litellm": 180.0}  # a large Python app: imports alone take seconds
READY_PATHS = {"litellm": LITELLM_READY_PATH}
PHASE_ERRORS = (
    StartError,
    TimeoutError,
    aiohttp.ClientError,
    OSError,
    ValueError,
    KeyError,
    AssertionError,
)


@dataclass
class Context:
    """What starting and measuring targets needs."""

    plan: Plan
    workdir: Path
    fake: FakeControl
    fake_port: int
    config: Path | None
    redis_url: str | None = None  # the run's own redis-server, for the production target


@dataclass
class Running:
    """One target over the run: its process (None for direct) and its growing result."""

    name: str
    target: Target | None = None
    proc: ManagedProcess | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.target is not None and "error" not in self.result and not self.skipped

    @property
    def skipped(self) -> bool:
        return "skipped" in self.result


def _factory(name: str, ctx: Context) -> ProcessFactory:
    if name == "bare":
        return lambda port: bare_process(ctx.workdir, port, ctx.fake_port)
    if name == "sluice":
        return lambda port: sluice_process(ctx.workdir, port, ctx.fake_port, ctx.config)
    if name == "production":
        redis_url = ctx.redis_url
        if redis_url is None:
            raise StartError("production: no redis-server for its rate limits")
        return lambda port: production_process(ctx.workdir, port, ctx.fake_port, redis_url)
    if name == "nginx":
        return lambda port: nginx_process(ctx.workdir, port, ctx.fake_port)
    if name == "litellm":
        return lambda port: litellm_process(ctx.workdir, port, ctx.fake_port)
    raise ValueError(f"unknown target {name!r}")


class Run:
    """The targets of one benchmark run and the phases applied to them."""

    def __init__(self, ctx: Context, names: list[str]) -> None:
        self.ctx = ctx
        self.targets = [Running(name) for name in names]

    @property
    def active(self) -> list[Running]:
        return [t for t in self.targets if t.ok]

    async def start(self) -> None:
        for running in self.targets:
            await self._start_one(running)

    async def _start_one(self, running: Running) -> None:
        name, ctx = running.name, self.ctx
        if name == "direct":
            running.target = Target(name, ctx.fake.base_url, ctx.fake.pid)
            return
        if name in PEERS and PEERS[name]() is None:
            progress(name, "not installed (python -m benchmarks.peers setup), skipped")
            running.result["skipped"] = "not installed"
            return
        repeats = ctx.plan.startup_repeats
        ready = READY_PATHS.get(name, "/readyz")
        progress(name, f"starting ({repeats}x to time spawn -> {ready} 200)")
        try:
            proc, port, times = await launch_repeatedly(
                _factory(name, ctx), repeats, SLOW_START_S.get(name, READY_TIMEOUT_S), ready
            )
        except StartError as exc:
            running.result["error"] = f"failed to start: {exc}"
            return
        running.proc = proc
        running.target = Target(name, f"http://{LOOPBACK}:{port}", proc.pid)
        running.result["startup_ms"] = [t * 1000 for t in times]

    def stop(self) -> None:
        for running in self.targets:
            if running.proc is not None:
                running.proc.stop()

    async def _guard(self, running: Running, label: str, step: Awaitable[None]) -> None:
        """Await `step`; a failure (or a dead process) becomes the target's error."""
        proc = running.proc
        try:
            await step
        except PHASE_ERRORS as exc:
            running.result["error"] = f"{label}: {type(exc).__name__}: {exc}"
        if proc is not None and proc.exit_code() is not None and "error" not in running.result:
            code = proc.exit_code()
            running.result["error"] = f"exited with code {code} during {label}:\n{proc.log_tail()}"

    async def each(self, label: str, body: Callable[[Running, Target], Awaitable[None]]) -> None:
        for running in self.active:
            assert running.target is not None
            progress(running.name, label)
            await self._guard(running, label, body(running, running.target))

    async def rounds(self, label: str, body: Callable[[Running, Target], Awaitable[None]]) -> None:
        """Run `body` for every target, `plan.rounds` times, alternating the order."""
        for index in range(self.ctx.plan.rounds):
            order = self.active if index % 2 == 0 else self.active[::-1]
            for running in order:
                assert running.target is not None
                progress(running.name, f"{label} (round {index + 1}/{self.ctx.plan.rounds})")
                await self._guard(running, label, body(running, running.target))

    async def measure(self) -> None:
        """Every phase, in order: correctness, memory, latency per concurrency, non-streaming
        requests, saturation."""
        plan, fake = self.ctx.plan, self.ctx.fake

        async def check(running: Running, target: Target) -> None:
            running.result["correctness"] = await correctness(target, fake, plan)

        async def mem(running: Running, target: Target) -> None:
            running.result["memory"] = await memory(target, fake, plan)

        await self.each("correctness check", check)
        await self.each(f"memory: {plan.memory_streams} idle streams", mem)
        for conc in plan.latency_concurrency:
            await self._latency(conc)
        await self._unary()
        await self._saturation()
        for running in self.active:
            assert running.target is not None
            running.result["peak_rss_mib"] = peak_rss_mib(running.target)

    async def _latency(self, conc: int) -> None:
        plan, fake = self.ctx.plan, self.ctx.fake
        samples: dict[str, list[LatencyRound]] = {}

        async def one(running: Running, target: Target) -> None:
            samples.setdefault(running.name, []).append(
                await latency_round(target, fake, plan, conc)
            )

        seconds = plan.latency_s / plan.rounds
        await self.rounds(f"latency c={conc} ({seconds:.0f}s)", one)
        for running in self.targets:
            if running.name in samples:
                latency = running.result.setdefault("latency", {})
                latency[f"c{conc}"] = latency_summary(samples[running.name], conc)

    async def _unary(self) -> None:
        plan, fake = self.ctx.plan, self.ctx.fake
        samples: dict[str, list[LatencyRound]] = {}

        async def one(running: Running, target: Target) -> None:
            samples.setdefault(running.name, []).append(await unary_round(target, fake, plan))

        seconds = plan.unary_s / plan.rounds
        await self.rounds(f"non-streaming c={plan.unary_concurrency} ({seconds:.0f}s)", one)
        for running in self.targets:
            if running.name in samples:
                running.result["unary"] = unary_summary(samples[running.name], plan)

    async def _saturation(self) -> None:
        plan, fake = self.ctx.plan, self.ctx.fake
        samples: dict[str, list[SaturationRound]] = {}

        async def one(running: Running, target: Target) -> None:
            samples.setdefault(running.name, []).append(await saturation_round(target, fake, plan))

        seconds = plan.saturation_s / plan.rounds
        label = f"saturation c={plan.saturation_concurrency} ({seconds:.0f}s)"
        await self.rounds(label, one)
        for running in self.targets:
            if running.name in samples:
                direct = running.name == "direct"
                summary = saturation_summary(samples[running.name], plan, direct)
                running.result["saturation"] = summary

    def results(self) -> dict[str, dict[str, Any]]:
        return {t.name: t.result for t in self.targets}


async def run_targets(ctx: Context, names: list[str]) -> dict[str, dict[str, Any]]:
    """Start all targets, measure them, always stop them."""
    run = Run(ctx, names)
    started = time.perf_counter()
    try:
        await run.start()
        await run.measure()
    finally:
        run.stop()
    progress("all", f"measured in {time.perf_counter() - started:.0f}s")
    return run.results()
