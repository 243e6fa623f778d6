"""Circuit breaker, fair concurrency gate, balancer ordering, backoff and Retry-After parsing.

Time is a hand-driven fake clock. Nothing sleeps: the gate tests step the event loop until a
condition holds (under an `asyncio.timeout` bound), and the one real timer (the queue
timeout) is tiny and bounded.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.balancer import (
    Balancer,
    BreakerState,
    CircuitBreaker,
    ConcurrencyGate,
    QueueFull,
    QueueTimeout,
    Slot,
    Strategy,
    backoff_delay,
    parse_retry_after,
)

BOUND = 5.0


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- circuit breaker -------------------------------------------------------------------


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state, read through a call so mypy does not narrow it across asserts."""
    return breaker.state


def is_available(breaker: CircuitBreaker) -> bool:
    """`breaker.available`, read through a call for the same reason."""
    return breaker.available


def tripped(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=threshold, cooldown=cooldown, clock=clock)
    for _ in range(threshold):
        breaker.record_failure()
    return breaker, clock


def test_breaker_stays_closed_below_threshold_and_success_resets() -> None:
    breaker = CircuitBreaker(failure_threshold=3, clock=FakeClock())
    breaker.record_failure()
    breaker.record_failure()
    assert state_of(breaker) == "closed"
    assert breaker.allow()
    assert breaker.consecutive_failures == 2
    breaker.record_success()
    assert breaker.consecutive_failures == 0
    breaker.record_failure()
    breaker.record_failure()
    assert state_of(breaker) == "closed"
    assert breaker.times_opened == 0
    assert breaker.ejected_until is None


def test_breaker_opens_at_threshold_for_cooldown() -> None:
    breaker, clock = tripped(threshold=3, cooldown=10.0)
    assert state_of(breaker) == "open"
    assert breaker.times_opened == 1
    assert breaker.ejected_until == clock.now + 10.0
    assert not breaker.allow()
    assert not is_available(breaker)
    clock.advance(9.999)
    assert state_of(breaker) == "open"
    assert not breaker.allow()


def test_breaker_half_open_admits_exactly_one_trial() -> None:
    breaker, clock = tripped()
    clock.advance(10.0)
    assert state_of(breaker) == "half_open"
    assert is_available(breaker)
    assert breaker.allow()
    assert not is_available(breaker)
    assert not breaker.allow()
    assert not breaker.allow()
    assert breaker.snapshot()["trial_in_flight"] is True


def test_breaker_successful_trial_closes() -> None:
    breaker, clock = tripped()
    clock.advance(10.0)
    assert breaker.allow()
    breaker.record_success()
    assert state_of(breaker) == "closed"
    assert breaker.consecutive_failures == 0
    assert breaker.ejected_until is None
    assert all(breaker.allow() for _ in range(5))


def test_breaker_failed_trial_reopens_for_another_cooldown() -> None:
    breaker, clock = tripped(cooldown=10.0)
    clock.advance(12.0)
    assert breaker.allow()
    clock.advance(1.0)
    breaker.record_failure()
    assert state_of(breaker) == "open"
    assert breaker.times_opened == 2
    assert breaker.ejected_until == clock.now + 10.0
    assert not breaker.allow()
    clock.advance(10.0)
    assert state_of(breaker) == "half_open"
    assert breaker.allow()
    assert not breaker.allow()


def test_breaker_failures_while_open_do_not_extend_the_ejection() -> None:
    breaker, _clock = tripped()
    until = breaker.ejected_until
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.ejected_until == until
    assert breaker.times_opened == 1
    assert breaker.consecutive_failures == 5


def test_breaker_lost_trial_is_replaced_after_a_cooldown() -> None:
    breaker, clock = tripped(cooldown=10.0)
    clock.advance(10.0)
    assert breaker.allow()
    clock.advance(9.0)
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()
    assert not breaker.allow()


def test_breaker_snapshot() -> None:
    breaker, clock = tripped(threshold=2, cooldown=10.0)
    clock.advance(4.0)
    assert breaker.snapshot() == {
        "state": "open",
        "consecutive_failures": 2,
        "failure_threshold": 2,
        "times_opened": 1,
        "cooldown": 10.0,
        "ejected_for": 6.0,
        "trial_in_flight": False,
    }
    clock.advance(10.0)
    snap = breaker.snapshot()
    assert snap["state"] == "half_open"
    assert snap["ejected_for"] == 0.0


def test_breaker_reopens_in_the_rest_of_its_cooldown_or_trial() -> None:
    breaker, clock = tripped(cooldown=10.0)
    clock.advance(3.5)
    assert breaker.reopens_in() == 6.5
    clock.advance(6.5)
    assert breaker.reopens_in() == 0.0  # half-open, no trial yet: allow() would admit
    assert breaker.allow()
    clock.advance(4.0)
    assert breaker.reopens_in() == 6.0  # until the trial is presumed lost
    breaker.record_success()
    assert breaker.reopens_in() == 0.0


@pytest.mark.parametrize(("threshold", "cooldown"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_breaker_rejects_bad_settings(threshold: int, cooldown: float) -> None:
    with pytest.raises(ValueError, match="must"):
        CircuitBreaker(failure_threshold=threshold, cooldown=cooldown)


# --- concurrency gate ------------------------------------------------------------------


async def until(condition: Callable[[], bool]) -> None:
    """Step the event loop until `condition` holds (bounded); no timers involved."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(BOUND):
        while not condition():
            step: asyncio.Future[None] = loop.create_future()
            loop.call_soon(step.set_result, None)
            await step


async def queue(
    gate: ConcurrencyGate, team: str, count: int, weight: float = 1.0
) -> list[asyncio.Task[Slot]]:
    """Start `count` waiters for `team` and return once all of them are queued."""
    target = gate.waiting + count
    tasks = [asyncio.create_task(gate.acquire(team, weight)) for _ in range(count)]
    await until(lambda: gate.waiting == target)
    return tasks


async def cleanup(
    gate: ConcurrencyGate, held: Iterable[Slot], tasks: Iterable[asyncio.Task[Slot]]
) -> None:
    """Cancel leftover waiters, release held slots and check nothing leaked."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    async with asyncio.timeout(BOUND):
        await asyncio.gather(*pending, return_exceptions=True)
    for slot in held:
        slot.release()
    assert gate.waiting == 0
    assert gate.in_use == 0


async def grant_sequence(
    first: Slot, teams_of: dict[asyncio.Task[Slot], str], grants: int
) -> tuple[list[str], Slot]:
    """Release the held slot `grants` times; return which team got each grant."""
    held = first
    pending: set[asyncio.Task[Slot]] = {task for task in teams_of if not task.done()}
    order: list[str] = []
    for _ in range(grants):
        held.release()
        async with asyncio.timeout(BOUND):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        task = done.pop()
        order.append(teams_of[task])
        held = task.result()
    return order, held


async def test_gate_grants_immediately_up_to_limit() -> None:
    gate = ConcurrencyGate(limit=2, clock=FakeClock())
    first = await gate.acquire()
    second = await gate.acquire("team-a")
    assert gate.in_use == 2
    assert gate.waiting == 0
    assert first.waited == 0.0
    assert second.waited == 0.0
    await cleanup(gate, [first, second], [])


async def test_gate_waiter_gets_released_slot_and_waited_time() -> None:
    clock = FakeClock()
    gate = ConcurrencyGate(limit=1, clock=clock)
    held = await gate.acquire()
    (task,) = await queue(gate, "a", 1)
    assert gate.in_use == 1
    clock.advance(3.5)
    held.release()
    async with asyncio.timeout(BOUND):
        slot = await task
    assert slot.waited == 3.5
    assert gate.in_use == 1
    assert gate.waiting == 0
    await cleanup(gate, [slot], [])


async def test_gate_release_is_idempotent() -> None:
    gate = ConcurrencyGate(limit=1, clock=FakeClock())
    held = await gate.acquire()
    tasks = await queue(gate, "a", 2)
    held.release()
    held.release()
    held.release()
    assert held.released
    await until(lambda: tasks[0].done())
    assert not tasks[1].done()
    assert gate.in_use == 1
    assert gate.waiting == 1
    await cleanup(gate, [tasks[0].result()], tasks)


async def test_gate_slot_as_context_manager() -> None:
    gate = ConcurrencyGate(limit=1, clock=FakeClock())
    with await gate.acquire() as slot:
        assert gate.in_use == 1
    assert slot.released
    assert gate.in_use == 0


async def test_gate_queue_full() -> None:
    gate = ConcurrencyGate(limit=1, max_queue=2, clock=FakeClock())
    held = await gate.acquire()
    tasks = await queue(gate, "a", 2)
    with pytest.raises(QueueFull) as info:
        await gate.acquire("b")
    assert info.value.retry_after > 0
    assert gate.waiting == 2
    assert gate.snapshot()["rejected_full"] == 1
    await cleanup(gate, [held], tasks)


async def test_gate_without_queue_rejects_at_once() -> None:
    gate = ConcurrencyGate(limit=1, max_queue=0, clock=FakeClock())
    held = await gate.acquire()
    with pytest.raises(QueueFull):
        await gate.acquire()
    await cleanup(gate, [held], [])


async def test_gate_queue_timeout_removes_the_waiter() -> None:
    gate = ConcurrencyGate(limit=1, queue_timeout=0.01, clock=FakeClock())
    held = await gate.acquire()
    async with asyncio.timeout(BOUND):
        with pytest.raises(QueueTimeout) as info:
            await gate.acquire()
    assert 0 < info.value.retry_after <= 0.01
    assert gate.waiting == 0
    assert gate.snapshot()["timed_out"] == 1
    held.release()
    assert gate.in_use == 0


async def test_gate_cancelled_waiter_leaves_no_trace() -> None:
    gate = ConcurrencyGate(limit=1, clock=FakeClock())
    held = await gate.acquire()
    (task,) = await queue(gate, "a", 1)
    task.cancel()
    async with asyncio.timeout(BOUND):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert gate.waiting == 0
    assert gate.snapshot()["waiting_by_team"] == {}
    held.release()
    assert gate.in_use == 0


async def test_gate_cancel_racing_a_handoff_passes_the_slot_on() -> None:
    gate = ConcurrencyGate(limit=1, clock=FakeClock())
    held = await gate.acquire()
    first, second = await queue(gate, "a", 2)
    held.release()  # hands the slot to `first`, which has not resumed yet
    first.cancel()
    async with asyncio.timeout(BOUND):
        with pytest.raises(asyncio.CancelledError):
            await first
        slot = await second
    assert gate.in_use == 1
    assert gate.waiting == 0
    await cleanup(gate, [slot], [])


async def test_gate_cancel_before_release_skips_that_waiter() -> None:
    gate = ConcurrencyGate(limit=1, clock=FakeClock())
    held = await gate.acquire()
    first, second = await queue(gate, "a", 2)
    first.cancel()  # its future is cancelled, its handler has not run yet
    held.release()
    async with asyncio.timeout(BOUND):
        slot = await second
    assert first.cancelled()
    assert gate.in_use == 1
    assert gate.waiting == 0
    await cleanup(gate, [slot], [])


async def test_gate_late_team_is_served_within_two_grants() -> None:
    gate = ConcurrencyGate(limit=1, clock=FakeClock())
    held = await gate.acquire()
    flood = await queue(gate, "A", 50)
    teams_of = dict.fromkeys(flood, "A")
    early, held = await grant_sequence(held, teams_of, 5)
    assert early == ["A"] * 5
    late = await queue(gate, "B", 2)
    teams_of.update(dict.fromkeys(late, "B"))
    order, held = await grant_sequence(held, teams_of, 4)
    assert order.count("B") == 2
    assert order.index("B") <= 1
    assert gate.waiting == 50 - 5 - 2
    await cleanup(gate, [held], teams_of)


async def test_gate_idle_team_cannot_bank_credit() -> None:
    gate = ConcurrencyGate(limit=1, clock=FakeClock())
    held = await gate.acquire()
    flood = await queue(gate, "A", 40)
    teams_of = dict.fromkeys(flood, "A")
    _, held = await grant_sequence(held, teams_of, 20)
    late = await queue(gate, "C", 5)
    teams_of.update(dict.fromkeys(late, "C"))
    order, held = await grant_sequence(held, teams_of, 10)
    assert order.count("C") == 5
    assert "CC" not in "".join(order)
    await cleanup(gate, [held], teams_of)


@pytest.mark.parametrize(("weight_a", "expected_a"), [(1.0, 15), (2.0, 20), (3.0, 22)])
async def test_gate_weights_share_grants(weight_a: float, expected_a: int) -> None:
    gate = ConcurrencyGate(limit=1, clock=FakeClock())
    held = await gate.acquire()
    a = await queue(gate, "A", 30, weight=weight_a)
    b = await queue(gate, "B", 30)
    teams_of = dict.fromkeys(a, "A") | dict.fromkeys(b, "B")
    order, held = await grant_sequence(held, teams_of, 30)
    assert abs(order.count("A") - expected_a) <= 1
    await cleanup(gate, [held], teams_of)


async def test_gate_fifo_within_a_team() -> None:
    gate = ConcurrencyGate(limit=1, clock=FakeClock())
    held = await gate.acquire()
    tasks = await queue(gate, "A", 5)
    for task in tasks:
        held.release()
        async with asyncio.timeout(BOUND):
            held = await task
    await cleanup(gate, [held], [])


async def test_gate_snapshot_and_retry_hint() -> None:
    clock = FakeClock()
    gate = ConcurrencyGate(limit=1, max_queue=2, queue_timeout=60.0, clock=clock)
    held = await gate.acquire()
    clock.advance(4.0)
    held.release()
    held = await gate.acquire()
    tasks = await queue(gate, "A", 1) + await queue(gate, "B", 1)
    snap = gate.snapshot()
    assert snap["in_use"] == 1
    assert snap["waiting"] == 2
    assert snap["waiting_by_team"] == {"A": 1, "B": 1}
    assert snap["granted"] == 2
    with pytest.raises(QueueFull) as info:
        await gate.acquire()
    assert info.value.retry_after == pytest.approx(12.0)
    await cleanup(gate, [held], tasks)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("inf"), float("nan")])
async def test_gate_rejects_bad_weight(weight: float) -> None:
    gate = ConcurrencyGate(limit=1)
    with pytest.raises(ValueError, match="weight"):
        await gate.acquire("a", weight)
    assert gate.in_use == 0


@pytest.mark.parametrize(
    ("limit", "max_queue", "timeout"), [(0, 1, 1.0), (1, -1, 1.0), (1, 1, 0.0)]
)
def test_gate_rejects_bad_settings(limit: int, max_queue: int, timeout: float) -> None:
    with pytest.raises(ValueError, match="must"):
        ConcurrencyGate(limit, max_queue, timeout)


# --- balancer --------------------------------------------------------------------------


def make_balancer(
    weights: list[int],
    strategy: Strategy = "weighted_round_robin",
    down: set[str] | None = None,
    outstanding: dict[str, int] | None = None,
) -> Balancer:
    names = [f"d{i}" for i in range(len(weights))]
    down_set = down if down is not None else set()
    counts = outstanding if outstanding is not None else {}
    return Balancer(
        names,
        weights,
        strategy,
        healthy=lambda name: name not in down_set,
        outstanding=lambda name: counts.get(name, 0),
    )


def firsts(balancer: Balancer, picks: int) -> Counter[str]:
    return Counter(balancer.order()[0] for _ in range(picks))


def test_wrr_is_smooth() -> None:
    balancer = make_balancer([5, 1, 1])
    picks = [balancer.order()[0] for _ in range(7)]
    assert picks == ["d0", "d0", "d1", "d0", "d2", "d0", "d0"]


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(1, 10), min_size=1, max_size=6), rounds=st.integers(1, 3))
def test_wrr_exact_proportions(weights: list[int], rounds: int) -> None:
    balancer = make_balancer(weights)
    counts = firsts(balancer, rounds * sum(weights))
    assert [counts[f"d{i}"] for i in range(len(weights))] == [rounds * w for w in weights]


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(1, 10), min_size=1, max_size=6))
def test_wrr_second_in_order_is_next_in_line(weights: list[int]) -> None:
    balancer = make_balancer(weights)
    for _ in range(sum(weights)):
        first, *rest = balancer.order()
        following = balancer.order()[0]
        assert following == first or following == rest[0]


def test_wrr_skips_unhealthy_and_resumes_proportions() -> None:
    down = {"d0"}
    balancer = make_balancer([5, 1, 1], down=down)
    for _ in range(100):
        order = balancer.order()
        assert order[-1] == "d0"
        assert order[0] in ("d1", "d2")
    down.clear()
    counts = firsts(balancer, 70)
    assert abs(counts["d0"] - 50) <= 2
    assert abs(counts["d1"] - 10) <= 2
    assert abs(counts["d2"] - 10) <= 2


def test_wrr_unhealthy_does_not_disturb_the_others() -> None:
    down = {"d2"}
    balancer = make_balancer([3, 1, 4], down=down)
    counts = firsts(balancer, 400)
    assert counts["d2"] == 0
    assert counts["d0"] == 300
    assert counts["d1"] == 100


def test_fully_ejected_route_still_orders_everyone() -> None:
    balancer = make_balancer([2, 1], down={"d0", "d1"})
    counts = firsts(balancer, 30)
    assert counts == Counter({"d0": 20, "d1": 10})
    assert sorted(balancer.order()) == ["d0", "d1"]


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    weights=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    strategy=st.sampled_from(["weighted_round_robin", "least_outstanding"]),
)
def test_order_lists_everyone_once_unhealthy_last(
    data: st.DataObject, weights: list[int], strategy: Strategy
) -> None:
    names = [f"d{i}" for i in range(len(weights))]
    down = set(data.draw(st.lists(st.sampled_from(names), unique=True)))
    counts = {name: data.draw(st.integers(0, 3)) for name in names}
    balancer = make_balancer(weights, strategy, down, counts)
    for _ in range(5):
        order = balancer.order()
        assert sorted(order) == sorted(names)
        healthy_count = len(names) - len(down)
        assert set(order[:healthy_count]) == set(names) - down


def test_least_outstanding_prefers_fewest() -> None:
    counts = {"d0": 3, "d1": 1, "d2": 2}
    balancer = make_balancer([1, 1, 1], "least_outstanding", outstanding=counts)
    assert balancer.order() == ["d1", "d2", "d0"]
    counts["d1"] = 9
    assert balancer.order() == ["d2", "d0", "d1"]


def test_least_outstanding_ties_by_weight_then_round_robin() -> None:
    heavy = make_balancer([1, 2, 1], "least_outstanding")
    assert [heavy.order()[0] for _ in range(4)] == ["d1"] * 4
    even = make_balancer([1, 1, 1], "least_outstanding")
    assert [even.order()[0] for _ in range(6)] == ["d0", "d1", "d2", "d0", "d1", "d2"]
    pair = make_balancer([1, 1, 1], "least_outstanding", outstanding={"d2": 5})
    assert [pair.order()[0] for _ in range(4)] == ["d0", "d1", "d0", "d1"]


def test_least_outstanding_puts_unhealthy_last() -> None:
    counts = {"d0": 3, "d1": 1, "d2": 2}
    balancer = make_balancer([1, 1, 1], "least_outstanding", down={"d1"}, outstanding=counts)
    assert balancer.order() == ["d2", "d0", "d1"]


@pytest.mark.parametrize(
    ("names", "weights", "message"),
    [
        ([], [], "at least one"),
        (["a", "b"], [1], "one weight"),
        (["a", "a"], [1, 1], "unique"),
        (["a"], [0], "at least 1"),
    ],
)
def test_balancer_rejects_bad_settings(names: list[str], weights: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Balancer(names, weights, "weighted_round_robin", lambda _: True, lambda _: 0)


def test_balancer_rejects_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="strategy"):
        Balancer(["a"], [1], "random", lambda _: True, lambda _: 0)  # type: ignore[arg-type]


# --- backoff and Retry-After -----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(attempt=st.integers(0, 5000), r=st.floats(0.0, 1.0, exclude_max=True))
def test_backoff_within_full_jitter_bounds(attempt: int, r: float) -> None:
    delay = backoff_delay(attempt, base=0.1, cap=2.0, rand=lambda: r)
    assert 0.0 <= delay <= min(2.0, 0.1 * 2.0 ** min(attempt, 64))


def test_backoff_grows_exponentially_until_cap() -> None:
    top = [backoff_delay(n, base=0.1, cap=2.0, rand=lambda: 1.0) for n in range(7)]
    assert top == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert backoff_delay(3, rand=lambda: 0.0) == 0.0


def test_backoff_honours_retry_after_up_to_cap() -> None:
    assert backoff_delay(0, retry_after=1.5, rand=lambda: 0.0) == 1.5
    assert backoff_delay(0, retry_after=60.0, rand=lambda: 0.0) == 2.0
    assert backoff_delay(4, retry_after=0.5, rand=lambda: 0.5) == pytest.approx(0.8)
    assert backoff_delay(0, retry_after=-3.0, rand=lambda: 0.0) == 0.0


def test_backoff_rejects_negative_attempt() -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(-1)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("120", 120.0), (" 5 ", 5.0), ("0", 0.0), ("1.5", 1.5), ("-3", 0.0), ("+7", 7.0)],
)
def test_retry_after_delta_seconds(header: str, seconds: float) -> None:
    assert parse_retry_after(header) == seconds


NOW = datetime(2015, 10, 21, 7, 27, 30, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    "header",
    [
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "Wednesday, 21-Oct-15 07:28:00 GMT",
        "Wed Oct 21 07:28:00 2015",
        "Wed, 21 Oct 2015 09:28:00 +0200",
    ],
)
def test_retry_after_http_date(header: str) -> None:
    assert parse_retry_after(header, now=lambda: NOW) == pytest.approx(30.0)


def test_retry_after_past_date_is_zero() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now=lambda: NOW) == 0.0


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "   ",
        "soon",
        "1e3",
        "inf",
        "nan",
        "12abc",
        "Wed, 32 Oct 2015 07:28:00 GMT",
        "9" * 80,
    ],
)
def test_retry_after_garbage_is_none(header: str | None) -> None:
    assert parse_retry_after(header) is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_retry_after_never_raises(header: str) -> None:
    result = parse_retry_after(header, now=lambda: NOW)
    assert result is None or result >= 0.0
