"""One lazy timer per request enforcing the upstream's first-byte, idle and total timeouts.

The hot path only stores a timestamp before each upstream read and clears it after; the
timer wakes at most once per idle period and, when a limit is really exceeded, aborts the
upstream call so the pending read returns at once.
"""

from __future__ import annotations

import asyncio

from gateway.config import Timeouts
from gateway.upstreams.base import UpstreamCall


class Watchdog:
    """Aborts an upstream call that breaks a timeout; `fired` names which one."""

    __slots__ = (
        "_call",
        "_first_deadline",
        "_handle",
        "_idle",
        "_loop",
        "_total_deadline",
        "fired",
        "got_first",
        "waiting_since",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, timeouts: Timeouts, start: float) -> None:
        self._loop = loop
        self._idle = timeouts.idle
        self._first_deadline = start + timeouts.first_byte
        self._total_deadline = start + timeouts.total
        self._call: UpstreamCall | None = None
        self.fired: str | None = None
        self.got_first = False
        self.waiting_since: float | None = None
        self._handle: asyncio.TimerHandle | None = loop.call_at(
            self._next_check(start), self._check
        )

    def waiting(self) -> None:
        """A read of the upstream starts now (the idle timeout counts from here)."""
        self.waiting_since = self._loop.time()

    def attach(self, call: UpstreamCall) -> None:
        """The call to abort when a timeout fires."""
        self._call = call
        if self.fired is not None:
            call.abort()

    def mark_first(self) -> None:
        """The first event arrived: from now on the idle limit applies (re-arms the timer)."""
        if self.got_first or self.fired is not None:
            return
        self.got_first = True
        if self._handle is not None:
            self._handle.cancel()
            now = self._loop.time()
            self._handle = self._loop.call_at(self._next_check(now), self._check)

    def _next_check(self, now: float) -> float:
        at = self._total_deadline
        if not self.got_first:
            return min(at, self._first_deadline)
        since = self.waiting_since if self.waiting_since is not None else now
        return min(at, since + self._idle)

    def _check(self) -> None:
        now = self._loop.time()
        if now >= self._total_deadline:
            self._fire("total")
        elif not self.got_first and now >= self._first_deadline:
            self._fire("first_byte")
        elif (
            self.got_first
            and self.waiting_since is not None
            and now - self.waiting_since >= self._idle
        ):
            self._fire("idle")
        else:
            self._handle = self._loop.call_at(self._next_check(now), self._check)

    def _fire(self, which: str) -> None:
        self.fired = which
        self._handle = None
        if self._call is not None:
            self._call.abort()

    def cancel(self) -> None:
        """Stop watching (the request ended)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
