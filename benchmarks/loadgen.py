"""Streaming load generator: C concurrent OpenAI chat streams, repeated for a duration.

For every stream it records the time to first event (from just before the request is sent to
the first complete `data:` event decoded, perf_counter_ns) and every inter-event gap. SSE is
parsed cheaply: the body is split on blank lines (b"\\n\\n") and blocks starting with `data:`
are counted; `data: [DONE]` ends a stream and is not counted as an event. Events that arrive in
the same read share a timestamp, so a proxy that coalesces events shows gaps of 0 followed by
one long gap - which is exactly what a client would see.
"""

from __future__ import annotations

import asyncio
import math
import time
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from benchmarks.fake_upstream import expected_text

HEADERS = {
    "Content-Type": "application/json",
    "Accept": "text/event-stream",
    "Authorization": "Bearer sk-bench-not-a-key",
}
ERROR_BACKOFF_S = 0.01


def chat_body(model: str = "bench", **extra: Any) -> bytes:
    """A minimal streaming chat completion request."""
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": "Say something for the benchmark."}],
    }
    body.update(extra)
    return orjson.dumps(body)


class SSECounter:
    """Counts complete `data:` events in a byte stream; remembers whether [DONE] was seen."""

    __slots__ = ("_buf", "done")

    def __init__(self) -> None:
        self._buf = b""
        self.done = False

    def feed(self, chunk: bytes) -> int:
        buf = self._buf + chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        if b"\n\n" not in buf:
            self._buf = buf
            return 0
        parts = buf.split(b"\n\n")
        self._buf = parts.pop()
        count = 0
        for part in parts:
            if part.startswith(b"data:"):
                if part[5:].strip() == b"[DONE]":
                    self.done = True
                else:
                    count += 1
        return count


@dataclass
class LoadStats:
    """What one load phase observed."""

    ttfts_ns: list[int] = field(default_factory=list)
    gaps_ns: array[int] = field(default_factory=lambda: array("q"))
    events: int = 0
    streams_ok: int = 0
    streams_failed: int = 0
    streams_cut: int = 0
    completed_in_window: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    recording: bool = False
    window_start: float = 0.0
    window_s: float = 0.0

    def open_window(self) -> None:
        self.recording = True
        self.window_start = time.perf_counter()

    def close_window(self) -> None:
        if self.recording:
            self.recording = False
            self.window_s = time.perf_counter() - self.window_start

    def error(self, key: str) -> None:
        self.streams_failed += 1
        self.errors[key[:160]] += 1


@dataclass(frozen=True)
class LoadSpec:
    """One load phase: who to hit, how hard and for how long."""

    url: str
    body: bytes
    concurrency: int
    duration_s: float
    warmup_s: float = 0.0
    timed: bool = True
    hard_stop: bool = False
    stagger_s: float = 0.0
    stream_timeout_s: float = 60.0
    expect_events: int | None = None  # data: events per complete stream, if known
    unary: bool = False  # non-streaming requests: one JSON answer each
    on_window_start: Callable[[], None] | None = None
    on_window_end: Callable[[], None] | None = None


@asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A session with no connection cap and no overall timeout (streams are long)."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        yield session


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    try:
        body = (await resp.content.read(300)).decode("utf-8", "replace")
    except (TimeoutError, aiohttp.ClientError):
        body = ""
    return f"HTTP {resp.status}: {' '.join(body.split())}"


async def _consume(
    resp: aiohttp.ClientResponse, t_send: int, stats: LoadStats, timed: bool
) -> tuple[bool, int]:
    """Read one SSE response: (ended with [DONE], number of data: events)."""
    sse = SSECounter()
    total = 0
    ttft = -1
    prev = 0
    gaps = array("q")
    async for chunk in resp.content.iter_any():
        now = time.perf_counter_ns()
        n = sse.feed(chunk)
        if not n:
            continue
        total += n
        if stats.recording:
            stats.events += n
        if timed:
            if ttft < 0:
                ttft = now - t_send
            else:
                gaps.append(now - prev)
            gaps.extend([0] * (n - 1))
            prev = now
    if timed and ttft >= 0:
        stats.ttfts_ns.append(ttft)
        stats.gaps_ns.extend(gaps)
    return sse.done, total


async def _one_stream(session: aiohttp.ClientSession, spec: LoadSpec, stats: LoadStats) -> bool:
    """Run one stream; its latencies are kept only if it started inside the window."""
    record = stats.recording
    t_send = time.perf_counter_ns()
    try:
        async with (
            asyncio.timeout(spec.stream_timeout_s),
            session.post(spec.url, data=spec.body, headers=HEADERS) as resp,
        ):
            if resp.status != 200:
                stats.error(await _error_text(resp))
                return False
            if spec.unary:
                return _unary_ok(await resp.read(), stats, record)
            done, count = await _consume(resp, t_send, stats, spec.timed and record)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        stats.error(f"{type(exc).__name__}: {exc}")
        return False
    if not done:
        stats.error("stream ended without data: [DONE]")
        return False
    if spec.expect_events is not None and count != spec.expect_events:
        stats.error(f"stream had {count} data: events, expected {spec.expect_events}")
        return False
    stats.streams_ok += int(record)
    stats.completed_in_window += int(stats.recording)
    return True


def _unary_ok(raw: bytes, stats: LoadStats, record: bool) -> bool:
    """Count one non-streaming answer if it is a chat completion with text."""
    try:
        content = orjson.loads(raw)["choices"][0]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str) or not content:
        stats.error(f"not a chat completion with text: {raw[:120]!r}")
        return False
    stats.streams_ok += int(record)
    stats.completed_in_window += int(stats.recording)
    return True


async def _worker(
    index: int, session: aiohttp.ClientSession, spec: LoadSpec, stats: LoadStats, stop_at: float
) -> None:
    if spec.stagger_s > 0:
        await asyncio.sleep(spec.stagger_s * index / spec.concurrency)
    while time.perf_counter() < stop_at:
        try:
            ok = await _one_stream(session, spec, stats)
        except asyncio.CancelledError:
            stats.streams_cut += 1
            raise
        if not ok:
            await asyncio.sleep(ERROR_BACKOFF_S)


async def run_load(spec: LoadSpec) -> LoadStats:
    """Run `spec.concurrency` workers; measure only inside the window after the warmup."""
    stats = LoadStats()
    async with client_session() as session:
        stop_at = time.perf_counter() + spec.warmup_s + spec.duration_s
        tasks = [
            asyncio.create_task(_worker(i, session, spec, stats, stop_at))
            for i in range(spec.concurrency)
        ]
        try:
            await asyncio.sleep(spec.warmup_s)
            if spec.on_window_start is not None:
                spec.on_window_start()
            stats.open_window()
            await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
            stats.close_window()
            if spec.on_window_end is not None:
                spec.on_window_end()
            if not spec.hard_stop:
                await asyncio.wait(tasks, timeout=spec.stream_timeout_s)
        finally:
            stats.close_window()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return stats


# -- memory: many idle open streams --------------------------------------------------------


class IdleStreams:
    """Holds many streams open (reading and discarding) until closed."""

    def __init__(self, url: str, body: bytes, opening_parallel: int = 64) -> None:
        self._url = url
        self._body = body
        self._opening = asyncio.Semaphore(opening_parallel)
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._settled = asyncio.Event()
        self._wanted = 0
        self.opened = 0
        self.errors: Counter[str] = Counter()

    async def __aenter__(self) -> IdleStreams:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _count(self, error: str | None) -> None:
        if error is None:
            self.opened += 1
        else:
            self.errors[error[:160]] += 1
        if self.opened + sum(self.errors.values()) >= self._wanted:
            self._settled.set()

    async def _hold(self, session: aiohttp.ClientSession) -> None:
        await self._opening.acquire()
        released = False
        try:
            async with session.post(self._url, data=self._body, headers=HEADERS) as resp:
                if resp.status != 200:
                    self._count(await _error_text(resp))
                    return
                sse = SSECounter()
                async for chunk in resp.content.iter_any():
                    if not released and sse.feed(chunk):
                        released = True
                        self._opening.release()
                        self._count(None)
                if not released:
                    self._count("stream ended before its first event")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._count(f"{type(exc).__name__}: {exc}")
        finally:
            if not released:
                self._opening.release()

    async def open(self, count: int, timeout_s: float, stall_s: float = 10.0) -> int:
        """Open `count` streams; wait until each got its first event (or failed), at most
        `timeout_s`, and give up early when no stream opened or failed for `stall_s`."""
        assert self._session is not None, "use IdleStreams as an async context manager"
        self._wanted = count
        self._tasks = [asyncio.create_task(self._hold(self._session)) for _ in range(count)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        seen = -1
        while (done := self.opened + sum(self.errors.values())) > seen:
            seen = done
            wait = min(stall_s, deadline - loop.time())
            if wait <= 0:
                break
            try:
                await asyncio.wait_for(self._settled.wait(), wait)
                return self.opened
            except TimeoutError:
                continue
        self.errors["timed out waiting for the first event"] += count - self.opened
        return self.opened


# -- correctness ---------------------------------------------------------------------------


def _check_events(blocks: list[bytes], events: int) -> str | None:
    if not blocks or blocks[-1].strip() != b"data: [DONE]":
        return "stream does not end with data: [DONE]"
    chunks = [orjson.loads(b[5:]) for b in blocks[:-1] if b.startswith(b"data:")]
    with_choices = [c for c in chunks if c.get("choices")]
    if not with_choices or with_choices[0]["choices"][0]["delta"].get("role") != "assistant":
        return "first chunk is not an assistant role delta"
    if with_choices[-1]["choices"][0].get("finish_reason") != "stop":
        return "last chunk does not carry finish_reason 'stop'"
    bad = [c for c in chunks if c.get("object") != "chat.completion.chunk"]
    if bad:
        return f"{len(bad)} events are not chat.completion.chunk objects"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices)
    if text != expected_text(events):
        return f"content differs: got {text[:60]!r}..., want {expected_text(events)[:60]!r}..."
    return None


async def check_stream(url: str, events: int) -> str | None:
    """Fetch one stream and check it is a well-formed OpenAI stream; None if it is."""
    async with client_session() as session:
        try:
            async with (
                asyncio.timeout(30),
                session.post(url, data=chat_body(), headers=HEADERS) as resp,
            ):
                if resp.status != 200:
                    return await _error_text(resp)
                ctype = resp.headers.get("Content-Type", "")
                if not ctype.startswith("text/event-stream"):
                    return f"Content-Type is {ctype!r}"
                raw = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"
    blocks = [b for b in raw.replace(b"\r\n", b"\n").split(b"\n\n") if b.strip()]
    try:
        return _check_events(blocks, events)
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
        return f"malformed chunk: {type(exc).__name__}: {exc}"


# -- statistics ----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def summarize_ms(values_ns: Sequence[int]) -> dict[str, float | int] | None:
    """n, mean, p50, p90, p99 and max in milliseconds; None if there are no values."""
    if not values_ns:
        return None
    ordered = sorted(values_ns)
    out: dict[str, float | int] = {"n": len(ordered), "mean": sum(ordered) / len(ordered) / 1e6}
    for q in (50, 90, 99):
        out[f"p{q}"] = percentile(ordered, q) / 1e6
    out["max"] = ordered[-1] / 1e6
    return out
