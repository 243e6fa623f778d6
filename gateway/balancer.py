"""Routing resilience, free of network code: circuit breakers, a fair concurrency gate,
deployment ordering and retry backoff.

Everything that reads time takes a `clock` (default `time.monotonic`), so tests drive it by
hand. The gate's queue timeout is the one exception: it is an event-loop timer.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Literal

__all__ = [
    "BACKOFF_CAP",
    "Balancer",
    "BreakerState",
    "CircuitBreaker",
    "ConcurrencyGate",
    "QueueFull",
    "QueueTimeout",
    "Slot",
    "Strategy",
    "backoff_delay",
    "parse_retry_after",
]

BreakerState = Literal["closed", "open", "half_open"]
Strategy = Literal["weighted_round_robin", "least_outstanding"]

_DELTA_SECONDS = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")

BACKOFF_CAP = 2.0
"""The longest wait between two attempts of one request; a Retry-After beyond it means the
upstream will not take the request again within it."""


class CircuitBreaker:
    """Passive health for one upstream: `failure_threshold` consecutive failures eject it for
    `cooldown` seconds; then one trial request (half-open) decides.

    A trial that reports neither success nor failure within `cooldown` seconds is presumed
    lost, and the next `allow()` admits a new one, so a dropped outcome cannot wedge it.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if not cooldown > 0:
            raise ValueError("cooldown must be positive")
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._clock = clock
        self._ejected_until: float | None = None
        self._trial_started: float | None = None
        self.consecutive_failures = 0
        self.times_opened = 0

    @property
    def state(self) -> BreakerState:
        """`closed` (healthy), `open` (ejected) or `half_open` (cooldown over, trial pending)."""
        if self._ejected_until is None:
            return "closed"
        return "open" if self._clock() < self._ejected_until else "half_open"

    @property
    def ejected_until(self) -> float | None:
        """Clock time the current ejection ends (past once half-open); None while closed."""
        return self._ejected_until

    @property
    def available(self) -> bool:
        """Whether `allow()` would admit a request now; read-only, for health callbacks."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self._trial_live())

    def reopens_in(self) -> float:
        """Seconds until `allow()` may admit a request again: 0 when it would now; while open,
        the rest of the cooldown; while a half-open trial runs, until it is presumed lost."""
        if self.available:
            return 0.0
        now = self._clock()
        until = self._ejected_until
        if until is not None and now < until:
            return until - now
        started = self._trial_started
        return 0.0 if started is None else max(0.0, started + self.cooldown - now)

    def _trial_live(self) -> bool:
        started = self._trial_started
        return started is not None and self._clock() - started < self.cooldown

    def allow(self) -> bool:
        """Admit a request? Closed: yes. Open: no. Half-open: one trial at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._trial_live():
            return False
        self._trial_started = self._clock()
        return True

    def record_success(self) -> None:
        """A request succeeded: close and reset the failure count."""
        self.consecutive_failures = 0
        self._ejected_until = None
        self._trial_started = None

    def record_failure(self) -> None:
        """A request failed: open at the threshold; a failure while half-open re-opens.

        Failures reported while open (requests admitted before the ejection) only count.
        """
        self.consecutive_failures += 1
        now = self._clock()
        if self._ejected_until is None:
            if self.consecutive_failures >= self.failure_threshold:
                self._open(now)
        elif now >= self._ejected_until:
            self._open(now)

    def _open(self, now: float) -> None:
        self._ejected_until = now + self.cooldown
        self._trial_started = None
        self.times_opened += 1

    def snapshot(self) -> dict[str, object]:
        """JSON-ready state for the admin API (`ejected_for` is seconds left, 0 if none)."""
        until = self._ejected_until
        return {
            "state": self.state,
            "consecutive_failures": self.consecutive_failures,
            "failure_threshold": self.failure_threshold,
            "times_opened": self.times_opened,
            "cooldown": self.cooldown,
            "ejected_for": 0.0 if until is None else max(0.0, until - self._clock()),
            "trial_in_flight": self._ejected_until is not None and self._trial_live(),
        }


class QueueFull(Exception):
    """The gate's queue already holds `max_queue` waiters; `retry_after` is a rough hint."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"queue full; retry after {retry_after:.1f}s")
        self.retry_after = retry_after


class QueueTimeout(Exception):
    """Waited `queue_timeout` seconds without a slot; `retry_after` is a rough hint."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"timed out waiting for a slot; retry after {retry_after:.1f}s")
        self.retry_after = retry_after


class Slot:
    """One granted concurrency slot; release it exactly once (further calls do nothing)."""

    __slots__ = ("_on_release", "_released", "granted_at", "waited")

    def __init__(
        self, on_release: Callable[[Slot], None], waited: float, granted_at: float
    ) -> None:
        self._on_release = on_release
        self._released = False
        self.waited = waited
        self.granted_at = granted_at

    @property
    def released(self) -> bool:
        """Whether `release()` has been called."""
        return self._released

    def release(self) -> None:
        """Give the slot back; it goes to the next waiter chosen by fair share. Idempotent."""
        if self._released:
            return
        self._released = True
        self._on_release(self)

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class _Waiter:
    __slots__ = ("enqueued_at", "future", "queued", "seq", "team", "timer", "weight")

    def __init__(self, team: str, weight: float, seq: int, enqueued_at: float) -> None:
        self.team = team
        self.weight = weight
        self.seq = seq
        self.enqueued_at = enqueued_at
        self.future: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self.timer: asyncio.TimerHandle | None = None
        self.queued = True


class _Team:
    __slots__ = ("vtime", "waiters")

    def __init__(self, vtime: float) -> None:
        self.vtime = vtime
        self.waiters: deque[_Waiter] = deque()


class ConcurrencyGate:
    """At most `limit` concurrent streams at a deployment; waiters queue (bounded) and are
    served by weighted fair share across teams, not FIFO.

    Fair share is start-time fair queueing: a freed slot goes to the waiting team with the
    smallest virtual time (ties: the older head waiter), whose virtual time then advances by
    `1/weight`. A team only exists while it has waiters; on arrival it starts at the minimum
    of the waiting teams, so idling banks no credit. FIFO within a team.
    """

    def __init__(
        self,
        limit: int,
        max_queue: int = 100,
        queue_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if max_queue < 0:
            raise ValueError("max_queue must not be negative")
        if not queue_timeout > 0:
            raise ValueError("queue_timeout must be positive")
        self.limit = limit
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._clock = clock
        self._in_use = 0
        self._waiting = 0
        self._teams: dict[str, _Team] = {}
        self._seq = 0
        self._hold_avg: float | None = None
        self.granted = 0
        self.rejected_full = 0
        self.timed_out = 0

    @property
    def in_use(self) -> int:
        """Slots held, including ones handed to a waiter that has not resumed yet."""
        return self._in_use

    @property
    def waiting(self) -> int:
        """Waiters queued."""
        return self._waiting

    async def acquire(self, team: str = "anonymous", weight: float = 1.0) -> Slot:
        """A slot: at once when one is free and nobody queues, else after waiting.

        Raises QueueFull when `max_queue` waiters are queued already, QueueTimeout after
        `queue_timeout` seconds; on either, or on cancellation, the waiter is gone.
        """
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError("weight must be positive and finite")
        if self._in_use < self.limit and not self._waiting:
            self._in_use += 1
            self.granted += 1
            return Slot(self._release, 0.0, self._clock())
        if self._waiting >= self.max_queue:
            self.rejected_full += 1
            raise QueueFull(self._estimate_wait())
        waiter = self._enqueue(team, weight)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise

    def _enqueue(self, team: str, weight: float) -> _Waiter:
        self._seq += 1
        waiter = _Waiter(team, weight, self._seq, self._clock())
        state = self._teams.get(team)
        if state is None:
            start = min((t.vtime for t in self._teams.values()), default=0.0)
            state = self._teams[team] = _Team(start)
        state.waiters.append(waiter)
        self._waiting += 1
        loop = asyncio.get_running_loop()
        waiter.timer = loop.call_later(self.queue_timeout, self._expire, waiter)
        return waiter

    def _unqueue(self, waiter: _Waiter) -> None:
        if not waiter.queued:
            return
        waiter.queued = False
        self._waiting -= 1
        state = self._teams[waiter.team]
        state.waiters.remove(waiter)
        if not state.waiters:
            del self._teams[waiter.team]

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        self._unqueue(waiter)
        self.timed_out += 1
        waiter.future.set_exception(QueueTimeout(self._estimate_wait()))

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiting task was cancelled: drop the waiter, or pass on a slot it was handed."""
        if waiter.timer is not None:
            waiter.timer.cancel()
        self._unqueue(waiter)
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            future.result().release()

    def _release(self, slot: Slot) -> None:
        now = self._clock()
        held = max(0.0, now - slot.granted_at)
        avg = self._hold_avg
        self._hold_avg = held if avg is None else avg + 0.2 * (held - avg)
        while self._teams:
            state = min(self._teams.values(), key=lambda t: (t.vtime, t.waiters[0].seq))
            waiter = state.waiters[0]
            self._unqueue(waiter)
            if waiter.future.done():  # cancelled; its task has not run its handler yet
                continue
            if waiter.timer is not None:
                waiter.timer.cancel()
            state.vtime += 1.0 / waiter.weight
            self.granted += 1
            waiter.future.set_result(Slot(self._release, now - waiter.enqueued_at, now))
            return
        self._in_use -= 1

    def _estimate_wait(self) -> float:
        """Seconds until a newcomer would likely get a slot, from the average hold time."""
        hold = 1.0 if self._hold_avg is None else self._hold_avg
        return min(self.queue_timeout, hold * (self._waiting / self.limit + 1.0))

    def snapshot(self) -> dict[str, object]:
        """JSON-ready state for the admin API."""
        return {
            "limit": self.limit,
            "in_use": self._in_use,
            "waiting": self._waiting,
            "max_queue": self.max_queue,
            "queue_timeout": self.queue_timeout,
            "granted": self.granted,
            "rejected_full": self.rejected_full,
            "timed_out": self.timed_out,
            "waiting_by_team": {name: len(t.waiters) for name, t in self._teams.items()},
        }


class Balancer:
    """Orders one route's deployments for an attempt sequence.

    `order()` lists every deployment once: the strategy's pick among healthy ones, the other
    healthy ones in the strategy's order, then the unhealthy ones (so a fully ejected route
    still tries something). With nothing healthy, the pick spreads over all of them.
    """

    def __init__(
        self,
        names: Sequence[str],
        weights: Sequence[int],
        strategy: Strategy,
        healthy: Callable[[str], bool],
        outstanding: Callable[[str], int],
    ) -> None:
        if not names or len(names) != len(weights):
            raise ValueError("need one weight per deployment, and at least one deployment")
        if len(set(names)) != len(names):
            raise ValueError("deployment names must be unique")
        if any(w < 1 for w in weights):
            raise ValueError("weights must be at least 1")
        if strategy not in ("weighted_round_robin", "least_outstanding"):
            raise ValueError(f"unknown strategy {strategy!r}")
        self.names = tuple(names)
        self.weights = tuple(weights)
        self.strategy: Strategy = strategy
        self._healthy = healthy
        self._outstanding = outstanding
        self._current = [0] * len(names)
        self._last = -1

    def order(self) -> list[str]:
        """Every deployment name once, in try order (advances the strategy by one pick)."""
        up: list[int] = []
        down: list[int] = []
        for i, name in enumerate(self.names):
            (up if self._healthy(name) else down).append(i)
        key: Callable[[int], tuple[int, ...]]
        if self.strategy == "weighted_round_robin":
            first = self._swrr_pick(up or down)
            key = self._wrr_key
        else:
            key = self._lo_key()
            first = min(up or down, key=key)
            self._last = first
        rest = sorted((i for i in up if i != first), key=key)
        tail = sorted((i for i in down if i != first), key=key)
        return [self.names[i] for i in (first, *rest, *tail)]

    def _swrr_pick(self, pool: list[int]) -> int:
        """Smooth weighted round robin over `pool`; the others' counters stay frozen."""
        total = 0
        best = pool[0]
        for i in pool:
            self._current[i] += self.weights[i]
            total += self.weights[i]
            if self._current[i] > self._current[best]:
                best = i
        self._current[best] -= total
        return best

    def _wrr_key(self, i: int) -> tuple[int, int]:
        """Who smooth WRR would pick next: highest counter after its increment, then index."""
        return (-(self._current[i] + self.weights[i]), i)

    def _lo_key(self) -> Callable[[int], tuple[int, int, int]]:
        """Fewest outstanding, then higher weight, then round robin after the last pick."""
        counts = [self._outstanding(name) for name in self.names]
        size = len(self.names)
        start = self._last + 1

        def key(i: int) -> tuple[int, int, int]:
            return (counts[i], -self.weights[i], (i - start) % size)

        return key


def backoff_delay(
    attempt: int,
    base: float = 0.1,
    cap: float = BACKOFF_CAP,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry).

    Full jitter: uniform in [0, min(cap, base * 2**attempt)). A Retry-After (seconds) raises
    that to at least `retry_after`, but `cap` is a hard ceiling: the result is never above it,
    so a caller seeing `retry_after > cap` should fail over elsewhere rather than retry.
    """
    if attempt < 0:
        raise ValueError("attempt must not be negative")
    ceiling = min(cap, base * 2.0 ** min(attempt, 64))
    delay = rand() * ceiling
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(max(delay, 0.0), cap)


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds from a Retry-After header: delta-seconds (decimals tolerated) or an HTTP-date.

    None when absent or unparseable; a negative delta or a past date gives 0.
    """
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > 64:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now())
