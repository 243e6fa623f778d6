"""One request's attempts (gateway.attempts): order, exclusions, breaker counting, waits,
and what the final error tells the SDKs. Pure: no sockets, no sleeping."""

from __future__ import annotations

import pytest

from gateway.attempts import SHOULD_RETRY, Attempts, Retry, ejected, queue_failure
from gateway.balancer import BACKOFF_CAP, CircuitBreaker
from gateway.errors import GatewayError, upstream_error
from gateway.routing import Target

A = Target("a", "model-a")
B = Target("b", "model-b")


def _failure(
    status: int = 502, retry_after: str | None = None, code: str = "upstream_error"
) -> Retry:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    error = GatewayError(status, "boom", type="upstream_error", code=code, headers=headers)
    return Retry(error, ill=status != 429, again=code != "upstream_auth_error")


def _run(attempts: Attempts, failure: Retry) -> list[str]:
    """Fail every attempt with `failure`; the upstreams tried, in order."""
    tried: list[str] = []
    while (target := attempts.next()) is not None:
        attempts.start()
        tried.append(target.upstream)
        attempts.failed(target, failure)
    return tried


def test_retries_go_round_robin_over_the_deployments() -> None:
    assert _run(Attempts([A, B], retries=2), _failure()) == ["a", "b", "a"]
    assert _run(Attempts([A], retries=2), _failure()) == ["a", "a", "a"]
    assert _run(Attempts([A, B], retries=0), _failure()) == ["a"]


def test_an_upstream_that_cannot_succeed_is_not_tried_again() -> None:
    long_wait = _failure(429, retry_after="30")
    assert not long_wait.again
    assert _run(Attempts([A], retries=2), long_wait) == ["a"]
    attempts = Attempts([A, B], retries=3)
    first = attempts.next()
    assert first == A
    attempts.start()
    attempts.failed(A, long_wait)
    assert _run(attempts, _failure()) == ["b", "b", "b"]
    queue_full = queue_failure(upstream_error("full", status=429, code="upstream_queue_full"))
    assert (queue_full.ill, queue_full.again) == (False, False)


def test_a_short_retry_after_allows_the_same_upstream_again() -> None:
    assert _failure(503, retry_after=str(BACKOFF_CAP)).again
    assert _failure(503, retry_after="0").again
    assert not _failure(503, retry_after="2.5").again


def test_the_breaker_counts_one_ill_failure_per_upstream_per_request() -> None:
    attempts = Attempts([A, B], retries=4)
    counted = []
    for failure in (_failure(429), _failure(), _failure(), _failure(), _failure()):
        target = attempts.next()
        assert target is not None
        attempts.start()
        counted.append((target.upstream, attempts.failed(target, failure)))
    # a's 429 is no ill health; a's 502 next time is its first counted failure.
    assert counted == [("a", False), ("b", True), ("a", True), ("b", False), ("a", False)]


def test_the_wait_honours_retry_after_only_on_the_same_upstream() -> None:
    attempts = Attempts([A, B], retries=3)
    assert attempts.delay(A) == 0.0
    attempts.start()
    attempts.failed(A, _failure(503, retry_after="1.5"))
    assert attempts.delay(A) == 1.5
    assert attempts.delay(B) < 0.1  # full jitter of the first backoff step
    attempts.start()
    attempts.failed(B, _failure(503, retry_after="1.5"))
    assert attempts.delay(B) == 1.5


def test_the_final_error_tells_sdks_not_to_retry_after_retries_or_when_futile() -> None:
    once = Attempts([A], retries=0)
    _run(once, _failure())
    assert SHOULD_RETRY not in once.final().headers
    twice = Attempts([A], retries=1)
    _run(twice, _failure())
    assert twice.final().headers[SHOULD_RETRY] == "false"
    futile = Attempts([A], retries=2)
    assert _run(futile, _failure(code="upstream_auth_error")) == ["a"]
    assert futile.final().headers[SHOULD_RETRY] == "false"
    bad = GatewayError(400, "bad field")
    assert twice.final(bad) is bad
    assert bad.headers[SHOULD_RETRY] == "false"


def test_skipped_upstreams_give_the_soonest_ejection_unless_an_attempt_failed() -> None:
    late = CircuitBreaker(failure_threshold=1, cooldown=60.0)
    soon = CircuitBreaker(failure_threshold=1, cooldown=5.0)
    late.record_failure()
    soon.record_failure()
    attempts = Attempts([A, B], retries=2)
    attempts.skip(A, ejected("a", late))
    attempts.skip(B, ejected("b", soon))
    assert attempts.next() is None
    error = attempts.final()
    assert (error.status, error.code, error.headers) == (
        503,
        "upstream_unavailable",
        {"Retry-After": "5"},
    )
    tried = Attempts([A, B], retries=2)
    tried.start()
    tried.failed(A, _failure())
    tried.skip(B, ejected("b", soon))
    assert tried.final().code == "upstream_error"


@pytest.mark.parametrize("retries", [0, 1, 5])
def test_no_target_once_the_budget_is_spent(retries: int) -> None:
    assert len(_run(Attempts([A, B], retries=retries), _failure())) == 1 + retries
