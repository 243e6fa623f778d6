"""The gateway's own time per request: everything except waiting on the client, a queue,
a retry backoff or the upstream."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Final, TypeVar

from gateway.context import RequestContext, StateKey

OVERHEAD_HEADER: Final = "x-sluice-overhead-ms"
T = TypeVar("T")


@dataclass(slots=True)
class Overhead:
    """A request's time spent waiting (client body, queue, backoff, upstream before headers)."""

    waited: float = 0.0
    answered: float | None = None  # the gateway's own time when the response/headers went out

    def now(self, ctx: RequestContext) -> float:
        """Seconds since the request arrived, minus the waits."""
        return max(0.0, time.perf_counter() - ctx.timing.received - self.waited)


OVERHEAD: StateKey[Overhead] = StateKey("sluice.proxy.overhead")


async def waiting(ctx: RequestContext, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, counting the time as waiting (not gateway overhead)."""
    started = time.perf_counter()
    try:
        return await awaitable
    finally:
        ctx.require(OVERHEAD).waited += time.perf_counter() - started


def overhead_ms(seconds: float) -> str:
    return f"{seconds * 1000.0:.3f}"


def answer_headers(ctx: RequestContext) -> dict[str, str]:
    """The headers an answer (a JSON response or a stream's opening) goes out with: the
    request id, the plugins' `ctx.response_headers` and the gateway's own time so far,
    which this records (`ctx.overhead_seconds`, `Overhead.answered`)."""
    overhead = ctx.require(OVERHEAD)
    ctx.overhead_seconds = overhead.answered = overhead.now(ctx)
    return {
        "X-Request-Id": ctx.request_id,
        **ctx.response_headers,
        OVERHEAD_HEADER: overhead_ms(ctx.overhead_seconds),
    }
