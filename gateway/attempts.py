"""One request's attempts: which deployment to try next, and what a failed attempt means.

Free of network code. The proxy asks `Attempts.next()` for a deployment, reports each
failure, and raises `final()` when nothing is left. A retry goes to another deployment
when the route has one; a deployment that cannot succeed within this request (a
Retry-After beyond the backoff cap, its own queue full or too slow, a refused credential)
is not tried again; the breaker counts one failure per upstream per request, however many
attempts it took.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gateway.balancer import BACKOFF_CAP, CircuitBreaker, backoff_delay, parse_retry_after
from gateway.context import Outcome, RequestContext
from gateway.errors import GatewayError
from gateway.routing import Target

__all__ = ["SHOULD_RETRY", "Attempts", "Retry", "ejected", "queue_failure", "retry_or"]

SHOULD_RETRY = "x-should-retry"
"""The header the OpenAI and Anthropic SDKs obey over their own retry policy."""

_RETRIABLE_STATUSES = frozenset({429, 502, 503, 504})

# Failures no retry fixes, here or from the client: the gateway's own setup is wrong.
_FUTILE_CODES = frozenset({"upstream_auth_error", "upstream_tls_error", "upstream_not_an_api"})


class Retry(Exception):
    """An attempt failed before a byte reached the client, in a way another attempt may fix.

    `ill`: the failure counts against the upstream's health (rate limits and its queue in the
    gateway do not). `again`: the same upstream is worth another try within this request.
    """

    def __init__(self, error: GatewayError, *, ill: bool, again: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.ill = ill
        self.retry_after = parse_retry_after(error.headers.get("Retry-After"))
        too_long = self.retry_after is not None and self.retry_after > BACKOFF_CAP
        self.again = again and not too_long


def retry_or(err: GatewayError, ctx: RequestContext) -> Exception:
    """`Retry` for an upstream failure another attempt may fix, else `err` itself."""
    upstream_fault = ctx.outcome in (Outcome.UPSTREAM_ERROR, Outcome.TIMEOUT)
    if not upstream_fault or err.status not in _RETRIABLE_STATUSES:
        return err
    return Retry(err, ill=err.status != 429, again=err.code not in _FUTILE_CODES)


def queue_failure(err: GatewayError) -> Retry:
    """The upstream's queue in the gateway was full or too slow: only another one may do."""
    return Retry(err, ill=False, again=False)


def ejected(upstream: str, breaker: CircuitBreaker) -> GatewayError:
    """The 503 for an upstream its breaker keeps out; Retry-After is when it may admit again."""
    seconds = str(max(1, math.ceil(breaker.reopens_in())))
    return GatewayError(
        503,
        f"Upstream {upstream!r} is ejected after repeated failures; retry in {seconds} s.",
        type="upstream_error",
        code="upstream_unavailable",
        headers={"Retry-After": seconds},
    )


class Attempts:
    """At most `1 + retries` upstream requests over `targets` (the balancer's order), round
    robin so that a retry goes to the next deployment, skipping excluded upstreams."""

    def __init__(self, targets: Sequence[Target], retries: int) -> None:
        self._targets = targets
        self._budget = 1 + retries
        self._at = 0
        self.made = 0  # upstream requests started
        self._excluded: set[str] = set()
        self._counted: set[str] = set()  # upstreams whose breaker saw this request fail
        self._last: GatewayError | None = None
        self._last_failure: tuple[str, Retry] | None = None

    def next(self) -> Target | None:
        """The deployment to try next, or None when the budget is spent or none is left."""
        if self.made >= self._budget:
            return None
        size = len(self._targets)
        for step in range(size):
            index = (self._at + step) % size
            target = self._targets[index]
            if target.upstream not in self._excluded:
                self._at = index + 1
                return target
        return None

    def skip(self, target: Target, error: GatewayError) -> None:
        """`target` is not tried (its breaker is open); `error` says so if nothing else does."""
        self._excluded.add(target.upstream)
        last = self._last
        if last is None or (last.code == "upstream_unavailable" and _sooner(error, last)):
            self._last = error

    def delay(self, target: Target) -> float:
        """Seconds to wait before trying `target`: none for the first attempt, else
        exponential backoff with full jitter, and at least the failed upstream's
        Retry-After when `target` is that same upstream."""
        if self._last_failure is None:
            return 0.0
        upstream, retry = self._last_failure
        same = upstream == target.upstream
        return backoff_delay(self.made - 1, retry_after=retry.retry_after if same else None)

    def start(self) -> None:
        """Count an upstream request."""
        self.made += 1

    def failed(self, target: Target, retry: Retry) -> bool:
        """Record a failed attempt; True if the breaker should count it (ill health, and the
        first such failure of this upstream in this request)."""
        self._last = retry.error
        self._last_failure = (target.upstream, retry)
        if not retry.again:
            self._excluded.add(target.upstream)
        if not retry.ill or target.upstream in self._counted:
            return False
        self._counted.add(target.upstream)
        return True

    def final(self, error: GatewayError | None = None) -> GatewayError:
        """The error for the client (`error`, else the last failure), telling SDKs not to
        retry when the gateway already did or when no retry can help."""
        out = error or self._last
        assert out is not None
        if self.made > 1 or out.code in _FUTILE_CODES:
            out.headers[SHOULD_RETRY] = "false"
        return out


def _sooner(a: GatewayError, b: GatewayError) -> bool:
    return int(a.headers["Retry-After"]) < int(b.headers["Retry-After"])
