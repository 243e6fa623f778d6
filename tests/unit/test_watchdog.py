"""The per-request watchdog, on a real event loop with tiny timeouts.

Nothing here sleeps to synchronise: each test waits for the dummy call's abort event under
an `asyncio.timeout` bound, and "did not fire" is shown by a later timer firing first.
"""

from __future__ import annotations

import asyncio

from gateway.config import Timeouts
from gateway.upstreams.base import UpstreamCall
from gateway.watchdog import Watchdog

TICK = 0.02
LONG = 60.0
BOUND = 5.0


class DummyCall(UpstreamCall):
    """An upstream call whose abort() is observable."""

    def __init__(self) -> None:
        self.status = 200
        self.headers = {}
        self.aborted = asyncio.Event()
        self.abort_count = 0

    async def read_chunk(self) -> bytes:
        await self.aborted.wait()
        return b""

    def abort(self) -> None:
        self.abort_count += 1
        self.aborted.set()

    def release(self) -> None:
        pass


def _watchdog(
    *, first_byte: float = LONG, idle: float = LONG, total: float = LONG
) -> tuple[Watchdog, DummyCall]:
    loop = asyncio.get_running_loop()
    timeouts = Timeouts(connect=LONG, first_byte=first_byte, idle=idle, total=total)
    dog = Watchdog(loop, timeouts, loop.time())
    call = DummyCall()
    dog.attach(call)
    return dog, call


async def _aborted(call: DummyCall) -> None:
    async with asyncio.timeout(BOUND):
        await call.aborted.wait()


async def test_first_byte_fires_when_nothing_arrives() -> None:
    dog, call = _watchdog(first_byte=TICK)
    await _aborted(call)
    assert dog.fired == "first_byte"
    assert call.abort_count == 1


async def test_first_byte_does_not_fire_once_the_first_event_arrived() -> None:
    # First byte would fire at TICK; total fires later. Seeing "total" proves first_byte
    # was skipped, and idle is not armed because nothing is being waited for.
    dog, call = _watchdog(first_byte=TICK, total=TICK * 5)
    dog.got_first = True
    await _aborted(call)
    assert dog.fired == "total"


async def test_idle_fires_while_waiting_for_the_upstream() -> None:
    loop = asyncio.get_running_loop()
    dog, call = _watchdog(first_byte=TICK, idle=TICK)
    dog.got_first = True
    dog.waiting_since = loop.time()
    await _aborted(call)
    assert dog.fired == "idle"
    assert call.abort_count == 1


async def test_idle_does_not_fire_while_waiting_on_the_client() -> None:
    # waiting_since None means the gateway is writing to a slow client, not reading.
    dog, call = _watchdog(first_byte=TICK, idle=TICK, total=TICK * 6)
    dog.got_first = True
    dog.waiting_since = None
    await _aborted(call)
    assert dog.fired == "total"
    assert call.abort_count == 1


async def test_idle_counts_from_when_waiting_started() -> None:
    # Waiting begins only after a check has already rescheduled itself; idle still fires.
    loop = asyncio.get_running_loop()
    dog, call = _watchdog(first_byte=TICK, idle=TICK * 2, total=LONG)
    dog.got_first = True
    started = asyncio.Event()

    def start_waiting() -> None:
        dog.waiting_since = loop.time()
        started.set()

    loop.call_later(TICK * 3, start_waiting)
    await _aborted(call)
    assert started.is_set()
    assert dog.fired == "idle"
    assert dog.waiting_since is not None
    assert loop.time() - dog.waiting_since >= TICK * 2


async def test_total_fires_even_while_events_flow() -> None:
    loop = asyncio.get_running_loop()
    dog, call = _watchdog(first_byte=TICK, idle=LONG, total=TICK * 2)
    dog.got_first = True
    dog.waiting_since = loop.time()
    await _aborted(call)
    assert dog.fired == "total"


async def test_total_before_first_byte() -> None:
    dog, call = _watchdog(first_byte=LONG, total=TICK)
    await _aborted(call)
    assert dog.fired == "total"


async def test_cancel_prevents_firing() -> None:
    cancelled, cancelled_call = _watchdog(first_byte=TICK)
    cancelled.cancel()
    # A second watchdog due later: once it fires, the first one's deadline has passed too.
    later, later_call = _watchdog(first_byte=TICK * 3)
    await _aborted(later_call)
    assert later.fired == "first_byte"
    assert cancelled.fired is None
    assert not cancelled_call.aborted.is_set()
    assert cancelled_call.abort_count == 0


async def test_cancel_is_idempotent() -> None:
    dog, call = _watchdog(first_byte=TICK)
    dog.cancel()
    dog.cancel()
    assert dog.fired is None
    assert call.abort_count == 0


async def test_attach_after_firing_aborts_at_once() -> None:
    loop = asyncio.get_running_loop()
    timeouts = Timeouts(first_byte=TICK)
    dog = Watchdog(loop, timeouts, loop.time())
    witness, witness_call = _watchdog(first_byte=TICK * 3)
    await _aborted(witness_call)
    assert dog.fired == "first_byte"
    call = DummyCall()
    dog.attach(call)
    assert call.aborted.is_set()
    assert call.abort_count == 1
    witness.cancel()


async def test_fires_once_only() -> None:
    dog, call = _watchdog(first_byte=TICK, total=TICK * 2)
    witness, witness_call = _watchdog(first_byte=TICK * 5)
    await _aborted(witness_call)
    assert dog.fired == "first_byte"
    assert call.abort_count == 1
    witness.cancel()


async def test_start_in_the_past_fires_on_the_next_loop_turn() -> None:
    loop = asyncio.get_running_loop()
    dog = Watchdog(loop, Timeouts(first_byte=1.0), loop.time() - 2.0)
    call = DummyCall()
    dog.attach(call)
    await _aborted(call)
    assert dog.fired == "first_byte"
