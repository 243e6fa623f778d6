"""Soak: thousands of streams with faults through a real `sluice serve`, then a leak check.

Opt-in (`SLUICE_SOAK=1`); see docs/streaming.md, "Soak and load tests". The gateway runs
as a subprocess (so RSS and file descriptors are its own) with every built-in plugin,
rate limits (the Redis backend at its default settings, on a redis-server of its own;
generous limits), an upstream concurrency gate and short timeouts, in front of a
FakeUpstream. Each request's client says, in its prompt, what the
fake must do (so a retry replays the same fault): a normal stream, a stream split at
awkward byte boundaries, an HTTP 500 or 429, a reset before headers, an in-band error
first or mid-stream, a reset mid-stream, a truncated stream, a stall before the first
event or mid-stream (hitting `first_byte` or `idle`), or a normal stream the client
leaves mid-way or before the headers. Start times are a seeded Poisson process; the seed
is printed, and `SLUICE_SOAK_SEED` replays a run.

Afterwards, once idle, nothing may have leaked: asyncio tasks, file descriptors and live
gateway objects back to their baseline (taken after a warm-up, so lazy imports, caches and
metric series exist already), upstream and rate-limit concurrency slots all released
(no member left in any concurrency set in Redis, no open lease),
`sluice_inflight_streams` at 0, RSS within RSS_GROWTH_BOUND of the baseline, and every
request counted once in `sluice_requests_total` with the outcome its fault implies; the
gateway exits 0 on SIGTERM and logged no error, lost task exception or unclosed resource.

Shape: SLUICE_SOAK_STREAMS (2000) over SLUICE_SOAK_SECONDS (60); run with `-s` to see
the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from gateway.auth import hash_key
from gateway.testing.fake_upstream import (
    Exchange,
    FakeUpstream,
    Script,
    openai_stream,
    rechunk,
    sse,
)
from tests.integration._process import (
    GatewayProcess,
    gateway_process,
    parse_metrics,
    raise_nofile_limit,
)
from tests.integration._support import CHAT, DONE, chat_contents, final_error, json_error
from tests.unit.test_ratelimit import running_redis

STREAMS = int(os.environ.get("SLUICE_SOAK_STREAMS", "2000"))
SECONDS = float(os.environ.get("SLUICE_SOAK_SECONDS", "60"))
WARMUP = int(os.environ.get("SLUICE_SOAK_WARMUP", "260"))
# The upstream's concurrency gate: low enough that bursts queue (and some clients leave
# while queued), high enough that the queue drains between bursts.
MAX_CONCURRENT = int(os.environ.get("SLUICE_SOAK_MAX_CONCURRENT", "8"))
SEED = int(os.environ.get("SLUICE_SOAK_SEED", str(random.SystemRandom().randrange(1 << 32))))

# Resident memory may end this much above the post-warm-up baseline. Freed Python objects
# go back to pymalloc's arenas, which return to the OS only when completely empty, so a
# process that ran ~100 streams at once keeps some of that high-water mark; a real leak
# grows with the number of requests instead (2,000 leaked contexts with their events and
# buffers would be tens of MB), and the live-object check below catches it exactly.
RSS_GROWTH_BOUND = 30 << 20
# Objects the collector tracks may grow this much: lazily filled caches (the ABCs'
# subclass caches, for one) add a few hundred once after the warm-up, while a leak of even
# one object per request adds STREAMS. The per-type check of the gateway's and plugins'
# own objects is exact.
GC_GROWTH_BOUND = max(1000, STREAMS // 2)
SETTLE_SECONDS = 20.0  # the longest wait for the gateway to go idle after the last stream
KEEPALIVE = 1.0  # the fake closes idle upstream connections after this long
ADMIN_KEY = "soak-admin-key"
CLIENT_KEY = "sk-soak-0123456789abcdefghijklmnopqrstuvwxyz"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
BURST_EVERY = 150
CLIENT_BOUND = 30.0  # any single request taking longer is a hang
TIMEOUTS = {"connect": 2.0, "first_byte": 1.5, "idle": 1.0, "total": 30.0}

# Kinds of request, their weights, and the outcome the gateway must record for each.
KINDS: dict[str, tuple[int, str]] = {
    "normal": (40, "completed"),
    "split": (8, "completed"),
    "status_500": (5, "upstream_error"),
    "status_429": (4, "upstream_error"),
    "reset_before_headers": (3, "upstream_error"),
    "error_first": (3, "upstream_error"),
    "error_mid": (5, "upstream_error"),
    "reset_mid": (5, "upstream_error"),
    "truncated": (3, "upstream_error"),
    "stall_first": (3, "timeout"),
    "stall_mid": (5, "timeout"),
    "leave_mid": (12, "client_disconnected"),
    "leave_early": (4, "client_disconnected"),
}
WORDS = ["alpha", " beta", " gamma", " delta", " é", " 漢字", " token", " stream", "\n", " 🙂"]
UPSTREAM_ERROR = {"error": {"message": "The server is overloaded.", "type": "server_error"}}


@dataclass(frozen=True)
class Plan:
    """One request: its kind, the tokens the fake streams, pacing, and where faults hit."""

    index: int
    kind: str
    tokens: tuple[str, ...]
    delay: float  # before each upstream chunk
    cut: int  # events sent before a mid-stream fault; events the client reads before leaving
    sizes: tuple[int, ...]  # rechunking of "split" streams

    @property
    def prompt(self) -> str:
        return f"soak {self.index}"


def make_plan(seed: int, index: int, kind: str | None = None) -> Plan:
    """The plan of request `index`, a pure function of the seed (and `kind`, if given)."""
    rng = random.Random(f"{seed}:{index}")
    weights = [weight for weight, _ in KINDS.values()]
    drawn = rng.choices(list(KINDS), weights=weights)[0]
    kind = drawn if kind is None else kind
    count = rng.randint(30, 60) if kind.startswith("leave") else rng.randint(3, 40)
    tokens = tuple(rng.choice(WORDS) for _ in range(count))
    delay = 0.03 if kind == "leave_mid" else rng.choice([0.0, 0.0, 0.002, 0.01])
    cut = rng.randint(1, 5) if kind == "leave_mid" else rng.randint(2, max(2, count))
    sizes = tuple(rng.randint(1, 97) for _ in range(7))
    return Plan(index, kind, tokens, delay, cut, sizes)


def script_for(plan: Plan) -> Script:
    """What the fake upstream does for this plan (the same on a retry)."""
    usage = {"prompt_tokens": 9, "completion_tokens": len(plan.tokens), "total_tokens": 0}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    events = openai_stream(plan.tokens, usage=usage)
    error = orjson.dumps(UPSTREAM_ERROR)
    kind, cut = plan.kind, plan.cut
    if kind == "split":
        return Script(rechunk(b"".join(events), plan.sizes))
    if kind in ("status_500", "status_429"):
        status = 500 if kind == "status_500" else 429
        return Script([error], status=status, content_type="application/json")
    if kind == "reset_before_headers":
        return Script(reset_before_headers=True)
    if kind == "error_first":
        return Script([sse(UPSTREAM_ERROR)])
    if kind == "error_mid":
        return Script([*events[:cut], sse(UPSTREAM_ERROR)], delays=plan.delay)
    if kind == "reset_mid":
        return Script(events[:cut], delays=plan.delay, then="reset")
    if kind == "truncated":
        return Script(events[:cut], delays=plan.delay)
    if kind == "stall_first":
        return Script([], then="hang")
    if kind == "stall_mid":
        return Script(events[:cut], delays=plan.delay, then="hang")
    if kind == "leave_early":  # the client leaves while the gateway waits for event one
        return Script(events, delays=[1.0, *[0.01] * len(events)])
    return Script(events, delays=plan.delay)


def responder(plans: dict[int, Plan]) -> Callable[[Exchange], Script]:
    def respond(exchange: Exchange) -> Script:
        prompt = exchange.body["messages"][0]["content"]
        return script_for(plans[int(prompt.removeprefix("soak "))])

    return respond


# ----- the client side -------------------------------------------------------------------------


async def run_client(http: aiohttp.ClientSession, v1: str, plan: Plan) -> str | None:
    """Send one request as planned; None if what came back is right, else what was wrong."""
    body = {
        "model": "m",
        "stream": True,
        "messages": [{"role": "user", "content": plan.prompt}],
    }
    url = v1 + CHAT
    try:
        async with asyncio.timeout(CLIENT_BOUND):
            if plan.kind == "leave_early":
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2), http.post(url, json=body, headers=AUTH):
                        return "headers arrived before the first upstream event"
                return None
            async with http.post(url, json=body, headers=AUTH) as resp:
                if plan.kind == "leave_mid":
                    if resp.status != 200:
                        return f"status {resp.status}"
                    for _ in range(plan.cut):
                        await resp.content.readuntil(b"\n\n")
                    resp.close()
                    return None
                raw = await resp.read()
                return check_answer(plan, resp.status, raw)
    except (AssertionError, aiohttp.ClientError, ValueError, TimeoutError) as err:
        return f"{type(err).__name__}: {err}"


def check_answer(plan: Plan, status: int, raw: bytes) -> str | None:
    """None if a fully read answer is what `plan` must produce, else why not."""
    kind = plan.kind
    if kind in ("normal", "split"):
        if status != 200 or not raw.endswith(DONE):
            return f"status {status}, body ends {raw[-80:]!r}"
        got = chat_contents(raw)
        return None if "".join(got) == "".join(plan.tokens) else f"content {got!r}"
    expected_status = {
        "status_500": 502,
        "status_429": 429,
        "reset_before_headers": 502,
        "error_first": 502,
        "stall_first": 504,
    }.get(kind, 200)
    if status != expected_status:
        return f"status {status}, expected {expected_status}: {raw[:200]!r}"
    if status != 200:
        code = json_error(raw)["code"]
        wanted = "upstream_first_byte_timeout" if kind == "stall_first" else None
        return None if wanted is None or code == wanted else f"code {code}"
    code = final_error(raw)["code"]
    wanted_codes = {
        "error_mid": {"upstream_error"},
        "reset_mid": {"upstream_error", "upstream_truncated"},
        "truncated": {"upstream_truncated"},
        "stall_mid": {"upstream_idle_timeout"},
    }[kind]
    return None if code in wanted_codes else f"final error code {code}"


# ----- looking at the gateway ------------------------------------------------------------------


@dataclass
class Snapshot:
    """The gateway at one moment."""

    rss: int
    fds: list[str]
    stats: dict[str, Any]
    metrics: dict[str, list[tuple[dict[str, str], float]]]
    upstreams: dict[str, Any]

    @property
    def tasks(self) -> int:
        return int(self.stats["tasks"])

    def outcomes(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for labels, value in self.metrics["sluice_requests_total"]:
            totals[labels["outcome"]] += int(value)
        return totals

    def statuses(self) -> Counter[tuple[str, str]]:
        totals: Counter[tuple[str, str]] = Counter()
        for labels, value in self.metrics["sluice_requests_total"]:
            totals[(labels["status"], labels["outcome"])] += int(value)
        return totals

    def queued(self) -> tuple[int, int]:
        """(slots granted, of which after waiting over 1 ms) at the upstream's gate."""
        count = sum(v for _, v in self.metrics.get("sluice_upstream_queue_wait_seconds_count", []))
        fast = sum(
            v
            for labels, v in self.metrics.get("sluice_upstream_queue_wait_seconds_bucket", [])
            if labels["le"] == "0.001"
        )
        return int(count), int(count - fast)

    def inflight(self) -> float:
        return sum(value for _, value in self.metrics.get("sluice_inflight_streams", []))

    def fd_kinds(self) -> Counter[str]:
        return Counter(target.split(":", 1)[0] if ":" in target else "file" for target in self.fds)


async def snapshot(gw: GatewayProcess) -> Snapshot:
    """Read /proc first, then the side channel, then the HTTP endpoints (fresh connections)."""
    rss, fds = gw.rss(), gw.fd_targets()
    stats = await gw.stats()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/metrics") as resp:
            metrics = parse_metrics(await resp.text())
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with http.get(f"{gw.url}/admin/upstreams", headers=admin) as resp:
            assert resp.status == 200, await resp.text()
            upstreams = (await resp.json())["upstreams"]
    return Snapshot(rss, fds, stats, metrics, upstreams)


async def settle(gw: GatewayProcess, baseline: Snapshot | None) -> Snapshot:
    """Wait until the gateway is idle: idle upstream connections closed by the fake, file
    descriptors steady (and, after the soak, back at the baseline's count)."""
    await asyncio.sleep(KEEPALIVE + 0.5)
    deadline = time.monotonic() + SETTLE_SECONDS
    steady, last = 0, -1
    while time.monotonic() < deadline:
        count = len(gw.fd_targets())
        steady = steady + 1 if count == last else 0
        last = count
        at_baseline = baseline is None or count <= len(baseline.fds)
        if steady >= 3 and at_baseline:
            break
        await asyncio.sleep(0.25)
    return await snapshot(gw)


# ----- the run -------------------------------------------------------------------------------


@dataclass
class Load:
    """Requests sent, what went wrong with them, and the gateway's RSS/fds while running."""

    plans: dict[int, Plan]
    sent: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    samples: list[tuple[float, int, int]] = field(default_factory=list)


def arrivals(count: int, seconds: float, rng: random.Random) -> list[float]:
    """Start times over `seconds`: a Poisson process, plus bursts of 20-40 requests at once
    (on average one burst per BURST_EVERY requests) that fill the upstream's queue."""
    times, at, left = [], 0.0, 0
    for _ in range(count):
        if left:
            left -= 1
        else:
            at += rng.expovariate(1.0)
            if rng.random() < 1 / BURST_EVERY:
                left = rng.randint(19, 39)
        times.append(at)
    scale = seconds / times[-1] if times and times[-1] > 0 else 0.0
    return [t * scale for t in times]


async def drive(gw: GatewayProcess, load: Load, indexes: list[int], seconds: float) -> float:
    """Start `indexes` at `arrivals` times over about `seconds`; wait for all to end."""
    rng = random.Random(f"{SEED}:arrivals:{indexes[0]}")
    connector = aiohttp.TCPConnector(limit=0)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(index: int) -> None:
            plan = load.plans[index]
            load.sent[plan.kind] += 1
            problem = await run_client(http, gw.v1, plan)
            if problem is not None:
                load.wrong.append(f"#{index} {plan.kind}: {problem}")

        async with asyncio.TaskGroup() as group:
            next_sample = 0.0
            for index, at in zip(indexes, arrivals(len(indexes), seconds, rng), strict=True):
                while (now := time.perf_counter() - started) < at:
                    if now >= next_sample:
                        load.samples.append((now, gw.rss(), len(gw.fd_targets())))
                        next_sample = now + 2.0
                    await asyncio.sleep(min(0.05, at - now))
                group.create_task(one(index))
    return time.perf_counter() - started


def soak_config(upstream: FakeUpstream, log_dir: Path, redis_url: str) -> dict[str, Any]:
    generous = {
        "requests_per_minute": 1_000_000,
        "tokens_per_minute": 1_000_000_000,
        "concurrent_streams": 10_000,
        "tokens_per_day": 1_000_000_000_000,
    }
    return {
        "server": {"admin_key": ADMIN_KEY, "drain_seconds": 5},
        "upstreams": {
            "fake": {
                "kind": "openai",
                "base_url": upstream.base_url,
                "timeouts": TIMEOUTS,
                "max_concurrent": MAX_CONCURRENT,
                "max_queue": 10_000,
                "failure_threshold": 1_000_000,  # faults are planned; no ejections
            }
        },
        "routes": [{"model": "m", "upstream": "fake", "upstream_model": "gpt-test", "retries": 1}],
        "teams": {
            "soak": {
                "limits": generous,
                "model_limits": {"m": {"requests_per_minute": 1_000_000}},
                "keys": [
                    {
                        "name": "load",
                        "sha256": hash_key(CLIENT_KEY),
                        "limits": {"concurrent_streams": 10_000},
                    }
                ],
            }
        },
        "plugins": [
            {"name": "token_count"},
            {"name": "rate_limit", "options": {"backend": "redis", "redis_url": redis_url}},
            {"name": "content_filter"},
            {"name": "access_log", "options": {"stream": str(log_dir / "access.log")}},
            {"name": "latency"},
        ],
    }


@pytest.mark.soak
@pytest.mark.timeout(int(SECONDS * 3 + 300))
async def test_soak_no_leaks(tmp_path: Path) -> None:
    print(f"\nsoak: seed {SEED} (SLUICE_SOAK_SEED={SEED} replays it), {STREAMS} streams")
    raise_nofile_limit(4096)
    warmup = list(range(-WARMUP, 0))
    main = list(range(STREAMS))
    # The warm-up cycles through every kind, so every code path and metric series exists
    # before the baseline.
    plans = {index: make_plan(SEED, index, list(KINDS)[index % len(KINDS)]) for index in warmup}
    plans.update({index: make_plan(SEED, index) for index in main})
    upstream = FakeUpstream(responder=responder(plans), keepalive_timeout=KEEPALIVE)
    await upstream.start()
    try:
        async with running_redis() as redis_server:
            config = soak_config(upstream, tmp_path, redis_server.url)
            async with gateway_process(config, tmp_path, probe=True, log_level="WARNING") as gw:
                warm = Load(plans)
                await drive(gw, warm, warmup, max(2.0, WARMUP / 40))
                assert not warm.wrong, "warm-up:\n" + "\n".join(warm.wrong[:20])
                before = await settle(gw, None)
                load = Load(plans)
                duration = await drive(gw, load, main, SECONDS)
                after = await settle(gw, before)
                held = await redis_slots(redis_server.url)
                report(load, before, after, duration, held)
                check(load, before, after, held)
                exit_code = await gw.stop()
                log_text = gw.log_text()
            assert await redis_slots(redis_server.url) == RedisSlots({}, 0), "after shutdown"
        assert exit_code == 0, log_text[-3000:]
        # Nothing went wrong unnoticed: no unhandled error, lost task exception or unclosed
        # resource reported by asyncio or aiohttp.
        for needle in ("Traceback", " ERROR ", "never retrieved", "nclosed"):
            assert needle not in log_text, log_text[log_text.find(needle) - 500 :][:3000]
    finally:
        await upstream.close()


@dataclass(frozen=True)
class RedisSlots:
    """What the Redis rate-limit backend holds: members of each concurrency set, leases."""

    slots: dict[str, int]  # concurrency key -> slots held (only keys holding some)
    leases: int  # admission markers not finished

    def __str__(self) -> str:
        return f"{sum(self.slots.values())} concurrency slots held, {self.leases} open leases"


async def redis_slots(url: str) -> RedisSlots:
    """Read the rate limiter's keys in Redis (the default prefix, sluice:rl:)."""
    client = Redis.from_url(url, decode_responses=True)
    try:
        slots = {}
        async for key in client.scan_iter(match="sluice:rl:s:*:conc"):
            if held := int(await client.zcard(key)):
                slots[key] = held
        leases = len([k async for k in client.scan_iter(match="sluice:rl:lease:*")])
    finally:
        await client.aclose()
    return RedisSlots(slots, leases)


def expected_outcomes(load: Load) -> Counter[str]:
    expected: Counter[str] = Counter()
    for kind, count in load.sent.items():
        expected[KINDS[kind][1]] += count
    return expected


def object_growth(before: Snapshot, after: Snapshot, *prefixes: str) -> dict[str, int]:
    """Types (whose names start with one of `prefixes`, if given) with more live objects."""
    grown = {}
    for name, count in after.stats["objects"].items():
        extra = count - before.stats["objects"].get(name, 0)
        if extra > 0 and (not prefixes or name.startswith(prefixes)):
            grown[name] = extra
    return dict(sorted(grown.items(), key=lambda item: -item[1]))


def report(
    load: Load, before: Snapshot, after: Snapshot, duration: float, held: RedisSlots
) -> None:
    outcomes = after.outcomes() - before.outcomes()
    statuses = after.statuses() - before.statuses()
    peak_rss = max((rss for _, rss, _ in load.samples), default=0)
    peak_fds = max((fds for _, _, fds in load.samples), default=0)
    mib = 1 << 20
    granted = after.queued()[0] - before.queued()[0]
    waited = after.queued()[1] - before.queued()[1]
    lines = [
        f"soak: seed {SEED}, {sum(load.sent.values())} streams in {duration:.1f} s; "
        f"{granted} upstream slots granted, {waited} after queueing (limit {MAX_CONCURRENT})",
        "sent by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(load.sent.items())),
        "gateway outcomes: " + ", ".join(f"{k} {n}" for k, n in sorted(outcomes.items())),
        "status/outcome: " + ", ".join(f"{s}/{o} {n}" for (s, o), n in sorted(statuses.items())),
        f"tasks {before.tasks} -> {after.tasks} ({after.stats['task_names']})",
        f"fds {len(before.fds)} -> {len(after.fds)} (peak {peak_fds}; "
        f"{dict(before.fd_kinds())} -> {dict(after.fd_kinds())})",
        f"RSS {before.rss / mib:.1f} MiB -> {after.rss / mib:.1f} MiB (peak {peak_rss / mib:.1f})",
        f"gc objects {before.stats['gc_objects']} -> {after.stats['gc_objects']}; "
        f"most grown: {dict(list(object_growth(before, after).items())[:12])}",
        f"rate limits in Redis: {held}; upstream fake: "
        f"outstanding {after.upstreams['fake']['outstanding']}, "
        f"queue {after.upstreams['fake']['queue']}",
    ]
    print("\n".join(lines))


def check(load: Load, before: Snapshot, after: Snapshot, held: RedisSlots) -> None:
    seed = f"(seed {SEED})"
    assert not load.wrong, f"{len(load.wrong)} wrong answers {seed}:\n" + "\n".join(load.wrong[:20])
    outcomes = after.outcomes() - before.outcomes()
    assert sum(outcomes.values()) == STREAMS, f"requests counted {outcomes} {seed}"
    assert outcomes == expected_outcomes(load), seed
    assert after.inflight() == 0
    fake = after.upstreams["fake"]
    assert fake["outstanding"] == 0
    assert fake["queue"]["in_use"] == 0
    assert fake["queue"]["waiting"] == 0
    assert held == RedisSlots({}, 0), str(held)
    assert after.stats["rate_limiters"] == [], "the rate limits were not on Redis"
    assert after.tasks <= before.tasks, (before.stats["task_names"], after.stats["task_names"])
    assert len(after.fds) <= len(before.fds), (before.fd_kinds(), after.fd_kinds())
    assert after.stats["objects"].get("gateway.context.RequestContext", 0) == 0
    assert not object_growth(before, after, "gateway.", "plugins."), seed
    gc_growth = after.stats["gc_objects"] - before.stats["gc_objects"]
    assert gc_growth < GC_GROWTH_BOUND, (object_growth(before, after), seed)
    assert after.rss - before.rss < RSS_GROWTH_BOUND, seed
