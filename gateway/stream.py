"""One streamed response: hold headers until the first upstream event, then the pull loop.

Read upstream bytes, decode events, pass them through the chain, `await` the write to the
client. Nothing queues between upstream and client, so a slow reader stops the upstream
reads (backpressure) and memory per stream stays bounded by the decoder's limits and the
sockets' buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.chain import Chain
from gateway.config import ServerConfig
from gateway.context import Outcome, RequestContext
from gateway.errors import (
    GatewayError,
    internal_error,
    timeout_error,
    upstream_error,
)
from gateway.overhead import answer_headers, waiting
from gateway.plugin import EndStream, Reject
from gateway.protocols.lanes import dialect_of
from gateway.replay.state import ENDED_EARLY
from gateway.sinks import ClientGone, StreamSink
from gateway.sse import SSEError, SSEEvent
from gateway.upstreams.base import (
    Batch,
    StreamDecoder,
    StreamObserver,
    UpstreamBroken,
    UpstreamCall,
)
from gateway.watchdog import Watchdog

if TYPE_CHECKING:
    from gateway.heal import StreamHealer

log = logging.getLogger("sluice.stream")


class Ended(Exception):
    """A plugin ended the stream early; its final events are written."""


class StreamFailed(Exception):
    """The stream must end with an error event (after headers were sent)."""

    def __init__(self, error: GatewayError, outcome: Outcome, kind: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.outcome = outcome
        self.kind = kind  # for sluice_upstream_errors_total


def draining_error() -> GatewayError:
    return GatewayError(
        503,
        "The gateway is restarting; retry the request.",
        type="server_error",
        code="gateway_draining",
        headers={"Retry-After": "1"},
    )


def _ignore(kind: str) -> None:
    """The default `_Stream.upstream_failed`: count nothing."""


class StreamRelay:
    """The state of one streamed response; `start` commits headers, `run` pumps events."""

    def __init__(
        self,
        server: ServerConfig,
        ctx: RequestContext,
        chain: Chain,
        decoder: StreamDecoder,
        observer: StreamObserver,
        call: UpstreamCall,
        watchdog: Watchdog,
        sink: StreamSink,
    ) -> None:
        self.server = server
        self.ctx = ctx
        self.chain = chain
        self.observer = observer
        self.call = call
        self.watchdog = watchdog
        self.decoder = decoder
        self.sink = sink
        self.opened = False  # headers committed: failures from here on are final events
        self.finished = False
        self._arrived: float | None = None  # when the bytes being processed came in
        self._first = Batch([])  # what `start` read before committing headers
        self.dialect = dialect_of(ctx)
        self.egress = self.dialect.egress(ctx)
        self.upstream_failed: Callable[[str], None] = _ignore  # counts a failure by kind
        self.interrupted = False  # the gateway is shutting down: end with a retry hint
        self._failing = False  # the final error event is being (or was) written
        self.healer: StreamHealer | None = None  # continues a stream broken mid-answer
        self._rewrite: Callable[[list[SSEEvent]], list[SSEEvent]] | None = None  # the seam

    # -- reading ---------------------------------------------------------------------

    async def _read(self) -> bytes:
        """The next upstream chunk; timeouts and broken connections become StreamFailed."""
        wd = self.watchdog
        wd.waiting()
        try:
            chunk = await self.call.read_chunk()
        except UpstreamBroken as err:
            raise self._read_failure(err.reason, err.cause) from None
        except Exception as err:  # an UpstreamCall outside gateway.upstreams.http
            raise self._read_failure("the upstream connection failed", type(err).__name__) from None
        finally:
            wd.waiting_since = None
        if wd.fired is not None or self.interrupted:
            raise self._read_failure("", "")
        return chunk

    def interrupt(self) -> None:
        """End this stream now (graceful shutdown): the pending read returns at once."""
        self.interrupted = True
        self.call.abort()

    def _read_failure(self, reason: str, cause: str) -> StreamFailed:
        """Why the read failed: a drain, a timeout (the watchdog aborted it), or a broken
        upstream, said in words (`reason`); `cause` (the exception class) is logged."""
        if self.interrupted:
            return StreamFailed(draining_error(), Outcome.ERROR, "draining")
        if self.watchdog.fired is not None:
            return StreamFailed(timeout_error(self.watchdog.fired), Outcome.TIMEOUT, "timeout")
        log.warning(
            "upstream %s broke while streaming (request %s): %s (%s)",
            self.ctx.upstream_name,
            self.ctx.request_id,
            reason,
            cause,
        )
        return StreamFailed(
            upstream_error(f"{reason[:1].upper()}{reason[1:]}."), Outcome.UPSTREAM_ERROR, "broken"
        )

    def _decode(self, chunk: bytes) -> list[SSEEvent]:
        """Events completed by `chunk`; at the end of the body (b""), what the decoder held."""
        try:
            if chunk:
                return self.decoder.feed(chunk)
            events = self.decoder.flush()
        except SSEError as err:
            raise StreamFailed(
                upstream_error(f"The upstream sent a malformed stream: {err}."),
                Outcome.UPSTREAM_ERROR,
                "malformed",
            ) from None
        if not events:
            raise self._eof_failure()
        return events

    def _eof_failure(self) -> StreamFailed:
        what = "in the middle of an event" if self.decoder.has_pending else "before its final event"
        return StreamFailed(
            upstream_error(f"The upstream closed the stream {what}.", code="upstream_truncated"),
            Outcome.UPSTREAM_ERROR,
            "truncated",
        )

    # -- phase 1: hold headers until the first event tells success from failure -------

    async def start(self) -> bool:
        """Read up to the first data event (bounded wait), then commit 200 headers.

        Errors found here are real HTTP errors. The events read so far are delivered by
        `run`, so any failure from then on follows the after-headers contract. Returns
        False if the client left before the headers went out.
        """
        held: list[SSEEvent] = []
        batch = Batch([])
        hold = self.server.header_hold_seconds
        ctx = self.ctx
        try:
            async with asyncio.timeout(hold):
                while not (batch.has_data or batch.terminal or batch.error):
                    events = self._decode(await waiting(ctx, self._read()))
                    ctx.events_in += len(events)
                    batch = self.observer.classify(ctx, events)
                    held.extend(batch.events)
        except TimeoutError:
            pass  # slow first token: send headers now, keep streaming
        except StreamFailed as failed:
            ctx.outcome = failed.outcome
            self.upstream_failed(failed.kind)
            raise failed.error from None
        good_data = any(event.data_bytes is not None for event in held)
        if batch.error is not None and not good_data:
            ctx.outcome = Outcome.UPSTREAM_ERROR
            self.upstream_failed("in_band")
            raise batch.error
        if batch.has_data:
            self._mark_first()
        # An error after good events in the same read is reported after them, exactly as
        # if it had arrived in a later read: the result must not depend on chunking.
        self._first = Batch(held, batch.terminal, batch.error)
        await self.chain.run_response_start(ctx)
        # The gateway's own time so far; the rest of a stream's is added as events go out.
        if not await self.sink.open(answer_headers(ctx)):
            ctx.outcome = Outcome.CLIENT_DISCONNECTED
            self.finished = True
            return False
        ctx.timing.response_started = self._arrived = time.perf_counter()
        self.opened = True
        return True

    def _mark_first(self) -> None:
        self.watchdog.mark_first()
        self.ctx.timing.first_upstream_event = time.perf_counter()

    # -- phase 2: the pump ---------------------------------------------------------------

    async def run(self) -> None:
        """Deliver what `start` read, then pump until the end, a failure or the client leaving.

        Headers are out, so nothing but a cancellation leaves here as an exception: every
        failure, foreseen or not, ends in one final error event.
        """
        if self.finished:
            return
        ctx = self.ctx
        try:
            try:
                await self._relay()
            except Exception:  # a bug, or a failure nobody foresaw: still one final event
                log.exception("unhandled error mid-stream (request %s)", ctx.request_id)
                ctx.outcome = Outcome.ERROR
                ctx.error = internal_error()
                if not self._failing:
                    await self._fail(ctx.error)
        except asyncio.CancelledError:
            if ctx.outcome is not Outcome.CANCELLED:  # a WebSocket `cancel` names itself
                ctx.outcome = Outcome.CLIENT_DISCONNECTED
            self.call.abort()
            raise

    async def _relay(self) -> None:
        """`run` minus its last resort: every foreseen ending is handled here."""
        ctx = self.ctx
        try:
            with contextlib.suppress(Ended):
                await self._healing()
            ctx.outcome = ctx.outcome or Outcome.COMPLETED
            await self._finish()
        except StreamFailed as failed:
            ctx.outcome = failed.outcome
            ctx.error = failed.error
            if failed.kind != "draining":
                self.upstream_failed(failed.kind)
            await self._fail(failed.error)
        except GatewayError as err:  # Reject from a plugin, or a fail-closed plugin's failure
            ctx.outcome = Outcome.REJECTED if isinstance(err, Reject) else Outcome.ERROR
            ctx.error = err
            await self._fail(err)
        except ClientGone:
            ctx.outcome = Outcome.CLIENT_DISCONNECTED

    async def _healing(self) -> None:
        """The events to the end; a failure the healer mends continues the same stream."""
        try:
            await self._body()
        except StreamFailed as failed:
            while self.healer is not None and await self.healer.resume(self, failed):
                try:
                    await self._body()
                    return
                except StreamFailed as again:
                    failed = again
            raise failed from None

    async def _body(self) -> None:
        first = self._first
        await self._deliver(first)
        if first.error is not None:
            raise StreamFailed(first.error, Outcome.UPSTREAM_ERROR, "in_band")
        if first.terminal is None:
            await self._pump()

    # -- healing (gateway.heal) ------------------------------------------------------------

    def restart(
        self,
        call: UpstreamCall,
        decoder: StreamDecoder,
        observer: StreamObserver,
        watchdog: Watchdog,
        rewrite: Callable[[list[SSEEvent]], list[SSEEvent]],
    ) -> None:
        """Read a continuation from here on; `rewrite` stitches its events in."""
        self.call, self.decoder, self.observer, self.watchdog = call, decoder, observer, watchdog
        self._rewrite = rewrite

    async def first_batch(self) -> Batch:
        """Read the current call up to its first data event (as `start` does)."""
        held: list[SSEEvent] = []
        batch = Batch([])
        while not (batch.has_data or batch.terminal or batch.error):
            events = self._decode(await self._read())
            self.ctx.events_in += len(events)
            batch = self.observer.classify(self.ctx, events)
            held.extend(batch.events)
        self._arrived = time.perf_counter()
        return Batch(held, batch.terminal, batch.error, batch.has_data)

    def set_first(self, batch: Batch) -> None:
        """What `_body` delivers first (the continuation's opening events)."""
        self._first = batch

    async def seam_comment(self, text: str) -> None:
        """An SSE comment into the client's stream (SDKs ignore comments)."""
        await self._write([SSEEvent(comments=(text,))], translate=False)

    async def _pump(self) -> None:
        ctx = self.ctx
        while True:
            observer = self.observer
            chunk = await self._read()
            self._arrived = time.perf_counter()
            events = self._decode(chunk)
            if not events:
                continue
            ctx.events_in += len(events)
            batch = observer.classify(ctx, events)
            if self._rewrite is not None:
                batch.events = self._rewrite(batch.events)
            if batch.has_data and not self.watchdog.got_first:
                self._mark_first()
            await self._deliver(batch)
            if batch.error is not None:
                raise StreamFailed(batch.error, Outcome.UPSTREAM_ERROR, "in_band")
            if batch.terminal is not None:
                return

    async def _deliver(self, batch: Batch) -> None:
        """Run a batch through the chain and write it in one go (plus the flush at the end)."""
        chain = self.chain
        out: list[SSEEvent] = []
        try:
            if chain.has_event_hooks:
                out = chain.run_events(self.ctx, batch.events)
            else:
                out = batch.events
            if self.healer is not None:
                self.healer.delivered(out)
            if batch.terminal is not None:
                out = [*out, *chain.run_flush(self.ctx), *self._usage(), batch.terminal]
        except EndStream as end:
            # What passed the chain before a flush-time EndStream still goes out first.
            await self._end_early([*out, *end.events], end.outcome)
            raise Ended() from None
        if out:
            await self._write(out)

    async def _write(self, events: list[SSEEvent], *, translate: bool = True) -> None:
        egress = self.egress
        failed: GatewayError | None = None
        if egress is not None and translate:
            events = [out for event in events for out in egress.feed(event)]
            failed = egress.error
        if self._arrived is not None:
            self.ctx.overhead_seconds += time.perf_counter() - self._arrived
            self._arrived = None
        sent = await self.sink.send(events) if events else 0
        now = time.perf_counter()
        timing = self.ctx.timing
        if timing.first_event_written is None:
            timing.first_event_written = now
        timing.last_event_written = now
        self.ctx.events_out += len(events)
        self.ctx.bytes_out += sent
        if failed is not None:  # the client's format could not carry what came: say so
            raise StreamFailed(failed, Outcome.UPSTREAM_ERROR, "malformed")

    async def _end_early(self, events: list[SSEEvent], outcome: Outcome) -> None:
        self.call.abort()
        self.ctx.outcome = outcome
        self.ctx.set(ENDED_EARLY, True)  # never replayed (gateway.replay)
        terminal = self.observer.terminal_event()
        await self._write([*events, *self._usage(), *([terminal] if terminal else [])])

    def _usage(self) -> list[SSEEvent]:
        """The local usage chunk before the terminal event, if the client needs one."""
        event = self.observer.usage_event(self.ctx)
        return [] if event is None else [event]

    async def _finish(self) -> None:
        self.call.release()
        if not await self.sink.close():
            self.ctx.outcome = Outcome.CLIENT_DISCONNECTED

    async def _fail(self, err: GatewayError) -> None:
        """The contract after headers: one final error event, then the stream ends."""
        self._failing = True
        self.call.abort()  # ctx.status stays 200: that is what the client got; ctx.error says why
        try:
            event = self.dialect.final_error_event(self.ctx, err) or self.observer.error_event(err)
            await self._write([event], translate=False)
            closed = await self.sink.close()
        except ClientGone:
            closed = False
        if not closed:
            self.ctx.outcome = Outcome.CLIENT_DISCONNECTED
