"""The request handler: parse, route, run the chain, and re-stream the upstream's events.

Streaming is one pull loop per request: read upstream bytes, decode events, pass them
through the chain, `await` the write to the client. Nothing queues between upstream and
client, so a slow reader stops the upstream reads (backpressure) and memory per stream
stays bounded by the decoder's limits and the sockets' buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import aiohttp
import orjson
from aiohttp import web

from gateway.auth import PRINCIPAL, KeyStore, key_from_headers
from gateway.balancer import QueueFull, QueueTimeout, Slot, backoff_delay, parse_retry_after
from gateway.chain import Chain
from gateway.config import ServerConfig
from gateway.context import Endpoint, Outcome, RequestContext, StateKey, request_id_from
from gateway.dialects import DIALECTS
from gateway.errors import (
    GatewayError,
    bad_request,
    internal_error,
    timeout_error,
    upstream_error,
)
from gateway.headers import SSE_RESPONSE_HEADERS, upstream_headers
from gateway.metrics import GatewayMetrics
from gateway.plugin import EndStream, Reject
from gateway.routing import Router, Target, UpstreamHealth
from gateway.sse import SSEError, SSEEvent, encode_events
from gateway.upstreams.base import (
    Batch,
    StreamDecoder,
    StreamObserver,
    Upstream,
    UpstreamCall,
)
from gateway.upstreams.errors import error_from_event
from gateway.validation import read_json_body, validate_body
from gateway.watchdog import Watchdog

log = logging.getLogger("sluice.proxy")

OVERHEAD_HEADER: Final = "x-sluice-overhead-ms"
T = TypeVar("T")


@dataclass(slots=True)
class _Overhead:
    """A request's time spent waiting (client body, queue, backoff, upstream before headers)."""

    waited: float = 0.0
    answered: float | None = None  # the gateway's own time when the response/headers went out

    def now(self, ctx: RequestContext) -> float:
        """Seconds since the request arrived, minus the waits."""
        return max(0.0, time.perf_counter() - ctx.timing.received - self.waited)


_OVERHEAD: StateKey[_Overhead] = StateKey("sluice.proxy.overhead")


async def _waiting(ctx: RequestContext, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, counting the time as waiting (not gateway overhead)."""
    started = time.perf_counter()
    try:
        return await awaitable
    finally:
        ctx.require(_OVERHEAD).waited += time.perf_counter() - started


def _overhead_ms(seconds: float) -> str:
    return f"{seconds * 1000.0:.3f}"


class _ClientGone(Exception):
    """Writing to the client failed: it disconnected."""


class _Ended(Exception):
    """A plugin ended the stream early; its final events are written."""


class _StreamFailed(Exception):
    """The stream must end with an error event (after headers were sent)."""

    def __init__(self, error: GatewayError, outcome: Outcome, kind: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.outcome = outcome
        self.kind = kind  # for sluice_upstream_errors_total


class _Retry(Exception):
    """An attempt failed before a byte reached the client, in a way worth another try."""

    def __init__(self, error: GatewayError, retry_after: float | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


_RETRIABLE_STATUSES = frozenset({429, 502, 503, 504})


def _retry_or(err: GatewayError, ctx: RequestContext, health: UpstreamHealth) -> Exception:
    """`_Retry` for an upstream failure worth retrying (counted against its health), else `err`."""
    upstream_fault = ctx.outcome in (Outcome.UPSTREAM_ERROR, Outcome.TIMEOUT)
    if not upstream_fault or err.status not in _RETRIABLE_STATUSES:
        return err
    if err.status != 429:  # rate limiting is not ill health
        health.failures += 1
        health.breaker.record_failure()
    return _Retry(err, parse_retry_after(err.headers.get("Retry-After")))


def _ejected(upstream: str) -> GatewayError:
    return GatewayError(
        503,
        f"Upstream {upstream!r} is ejected after repeated failures; retry later.",
        type="upstream_error",
        code="upstream_unavailable",
    )


async def _acquire(health: UpstreamHealth, ctx: RequestContext) -> Slot | None:
    """A concurrency slot at the upstream, waiting in its fair-share queue if needed."""
    if health.gate is None:
        return None
    try:
        principal = ctx.get(PRINCIPAL)
        weight = principal.weight if principal is not None else 1.0
        return await health.gate.acquire(ctx.identity.team, weight)
    except QueueFull as full:
        status, message, wait = 429, "The upstream's queue is full", full.retry_after
    except QueueTimeout as late:
        status, message, wait = 503, "Timed out waiting in the upstream's queue", late.retry_after
    ctx.outcome = Outcome.UPSTREAM_ERROR
    seconds = str(max(1, math.ceil(wait)))
    raise GatewayError(
        status,
        f"{message}; retry in {seconds} s.",
        type="upstream_error",
        code="upstream_queue_full" if status == 429 else "upstream_queue_timeout",
        headers={"Retry-After": seconds},
    )


def _status_kind(status: int) -> str:
    """The `kind` of an upstream's error status in sluice_upstream_errors_total."""
    if status == 429:
        return "status_429"
    return "status_5xx" if status >= 500 else "status_4xx"


def _parse_unary(raw: bytes) -> Any:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise upstream_error("The upstream answered with a body that is not JSON.") from None
    if not isinstance(payload, dict):
        raise upstream_error("The upstream answered with JSON that is not an object.")
    return payload


class Proxy:
    """Handlers for the OpenAI-compatible endpoints; shared state is read-only per request."""

    def __init__(
        self,
        server: ServerConfig,
        router: Router,
        upstreams: Mapping[str, Upstream],
        chains: Mapping[str, Chain],
        default_chain: Chain,
        health: Mapping[str, UpstreamHealth],
        keys: KeyStore | None = None,
        *,
        metrics: GatewayMetrics,
    ) -> None:
        self.keys = keys
        self.metrics = metrics
        self.draining = False  # set by `drain`: new requests get 503
        self._inflight = 0
        self._streams: set[_Stream] = set()
        self._changed = asyncio.Event()
        self.server = server
        self.router = router
        self.upstreams = upstreams
        self.health = health
        self.chains = chains
        self.default_chain = default_chain

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self.handle(request, Endpoint.CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        return await self.handle(request, Endpoint.COMPLETIONS)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/messages: Anthropic's Messages API, for the Anthropic SDKs."""
        return await self.handle(request, Endpoint.CHAT, "anthropic")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/embeddings (never streamed)."""
        return await self.handle(request, Endpoint.EMBEDDINGS)

    async def handle(
        self, request: web.Request, endpoint: Endpoint, client_format: str = "openai"
    ) -> web.StreamResponse:
        """One request from arrival to its single end (`on_end` runs exactly once)."""
        if self.draining:
            return _draining_error().to_response({"Connection": "close"})
        request_id = request_id_from(request.headers.get("X-Request-Id"))
        ctx = RequestContext(request_id, endpoint, client_format)
        self._inflight += 1
        overhead = _Overhead()
        ctx.set(_OVERHEAD, overhead)
        chain = self.default_chain
        try:
            try:
                await self._admit(request, ctx)
                assert ctx.route is not None
                chain = self.chains[ctx.route.name]
                await chain.run_request(ctx)
                return await self._attempts(request, ctx, chain)
            except GatewayError as err:
                return self._error_response(ctx, err)
        except asyncio.CancelledError:
            ctx.outcome = ctx.outcome or Outcome.CLIENT_DISCONNECTED
            raise
        except Exception:
            log.exception("unhandled error (request %s)", ctx.request_id)
            ctx.outcome = Outcome.ERROR
            return self._error_response(ctx, internal_error())
        finally:
            ctx.timing.ended = time.perf_counter()
            try:
                await chain.run_end(ctx)
            finally:
                self.metrics.observe_request(ctx, overhead.answered)
                self._inflight -= 1
                self._changed.set()

    async def drain(self, deadline: float) -> int:
        """Refuse new requests, let in-flight ones finish for up to `deadline` seconds, then
        end the streams still running with a final event telling the client to retry.

        Returns how many streams had to be cut.
        """
        self.draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline):
                await self._settled()
        cut = list(self._streams)
        for stream in cut:
            stream.interrupt()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):  # their final events are being written
                await self._settled()
        return len(cut)

    async def _settled(self) -> None:
        while self._inflight:
            self._changed.clear()
            await self._changed.wait()

    async def _admit(self, request: web.Request, ctx: RequestContext) -> None:
        principal = None
        if self.keys is not None:  # who, before reading a byte of the body
            principal = self.keys.authenticate(key_from_headers(request.headers))
            ctx.identity = principal.identity()
            ctx.set(PRINCIPAL, principal)
        body = await _waiting(ctx, read_json_body(request, self.server.max_body_bytes))
        validate_body(ctx.endpoint, body)
        ctx.model = body["model"]
        ctx.body = DIALECTS[ctx.client_format].admit(ctx, body)
        ctx.stream = ctx.endpoint is not Endpoint.EMBEDDINGS and body.get("stream") is True
        ctx.route = self.router.resolve(ctx.model)
        if principal is not None and self.keys is not None:
            self.keys.authorize(principal, ctx.model, ctx.route)

    async def _attempts(
        self, request: web.Request, ctx: RequestContext, chain: Chain
    ) -> web.StreamResponse:
        """Try the route's deployments in the balancer's order until one answers.

        Only failures before a byte reached the client are retried (connect errors,
        timeouts before the first event, 429 and 5xx), with backoff that honours
        Retry-After; once streaming started, never (no duplicated tokens).
        """
        assert ctx.route is not None
        targets = self.router.targets(ctx.model)
        tries = [targets[i % len(targets)] for i in range(1 + ctx.route.retries)]
        last: GatewayError | None = None
        for attempt, target in enumerate(tries):
            health = self.health[target.upstream]
            last_resort = last is None and attempt == len(tries) - 1
            if not health.breaker.allow() and not last_resort:
                last = last or _ejected(target.upstream)
                continue
            if attempt:
                ctx.retries += 1
            try:
                return await self._attempt(request, ctx, chain, target, health)
            except _Retry as retry:
                last = retry.error
                if attempt < len(tries) - 1:
                    delay = backoff_delay(attempt, retry_after=retry.retry_after)
                    await _waiting(ctx, asyncio.sleep(delay))
        assert last is not None
        ctx.outcome = ctx.outcome or Outcome.UPSTREAM_ERROR
        raise last

    async def _attempt(
        self,
        request: web.Request,
        ctx: RequestContext,
        chain: Chain,
        target: Target,
        health: UpstreamHealth,
    ) -> web.StreamResponse:
        """One deployment: queue for a slot, send, and (for streams) relay to the end."""
        upstream = self.upstreams[target.upstream]
        if not upstream.supports(ctx.endpoint):
            raise bad_request(
                f"The model `{ctx.model}` does not support /v1/{ctx.endpoint.value}.",
                param="model",
                code="unsupported_endpoint",
            )
        ctx.upstream_name, ctx.upstream_model, ctx.outcome = target.upstream, target.model, None
        try:
            slot = await _waiting(ctx, _acquire(health, ctx))
        except GatewayError as err:  # queue full or too slow here: another deployment may do
            kind = "queue_full" if err.code == "upstream_queue_full" else "queue_timeout"
            self.metrics.upstream_error(target.upstream, kind)
            raise _Retry(err, parse_retry_after(err.headers.get("Retry-After"))) from None
        if slot is not None:
            self.metrics.observe_queue_wait(target.upstream, slot.waited)
        health.outstanding += 1
        try:
            if ctx.stream:
                response = await self._stream(request, ctx, chain, upstream)
            else:
                response = await self._unary(request, ctx, chain, upstream)
        except GatewayError as err:
            raise _retry_or(err, ctx, health) from None
        finally:
            health.outstanding -= 1
            if slot is not None:
                slot.release()
        health.successes += 1
        health.breaker.record_success()
        return response

    def _error_response(self, ctx: RequestContext, err: GatewayError) -> web.Response:
        ctx.error = err
        ctx.status = err.status
        if ctx.outcome is None:
            ctx.outcome = Outcome.REJECTED if err.status < 500 else Outcome.UPSTREAM_ERROR
        response = DIALECTS[ctx.client_format].error_response(ctx, err)
        response.headers[OVERHEAD_HEADER] = _overhead_ms(ctx.require(_OVERHEAD).now(ctx))
        return response

    def _outgoing(
        self, request: web.Request, ctx: RequestContext
    ) -> tuple[dict[str, Any], dict[str, str]]:
        assert ctx.route is not None
        body = {**ctx.body, "model": ctx.upstream_model or ctx.model}
        return body, upstream_headers(request.headers, ctx.request_id)

    async def _open(
        self, request: web.Request, ctx: RequestContext, upstream: Upstream
    ) -> UpstreamCall:
        """Send upstream and wait for its headers; errors before a byte reached the client."""
        body, headers = self._outgoing(request, ctx)
        return await _waiting(ctx, self._send(ctx, upstream, body, headers))

    async def _send(
        self,
        ctx: RequestContext,
        upstream: Upstream,
        body: dict[str, Any],
        headers: dict[str, str],
    ) -> UpstreamCall:
        limit = min(upstream.timeouts.first_byte, upstream.timeouts.total)
        try:
            async with asyncio.timeout(limit):
                call = await upstream.open(ctx, body, headers)
        except TimeoutError:
            ctx.outcome = Outcome.TIMEOUT
            self.metrics.upstream_error(upstream.name, "timeout")
            raise timeout_error("first_byte") from None
        except GatewayError as err:
            # A 4xx here was raised before anything was sent (a request the upstream's format
            # cannot express): the client's request is refused, the upstream is not at fault.
            if err.status == 504:
                ctx.outcome = Outcome.TIMEOUT
                self.metrics.upstream_error(upstream.name, "timeout")
            elif err.status >= 500:
                ctx.outcome = Outcome.UPSTREAM_ERROR
                self.metrics.upstream_error(upstream.name, "connect")
            else:
                ctx.outcome = Outcome.REJECTED
            raise
        ctx.timing.upstream_headers = time.perf_counter()
        if call.status >= 400:
            self.metrics.upstream_error(upstream.name, _status_kind(call.status))
            try:
                async with asyncio.timeout(limit):
                    raw = await call.read_body(64 << 10)
            except (TimeoutError, GatewayError, aiohttp.ClientError):
                raw = b""
            finally:
                call.abort()
            ctx.outcome = Outcome.UPSTREAM_ERROR
            error = upstream.map_status_error(call.status, raw)
            retry_after = call.headers.get("Retry-After")
            if retry_after and error.status in (429, 503) and len(retry_after) < 64:
                error.headers["Retry-After"] = retry_after
            raise error
        return call

    async def _unary(
        self, request: web.Request, ctx: RequestContext, chain: Chain, upstream: Upstream
    ) -> web.Response:
        """A non-streaming request: the one place a whole (bounded) body is held."""
        call = await self._open(request, ctx, upstream)
        failed = ""  # a cancellation (client gone) is no upstream error
        try:
            async with asyncio.timeout(upstream.timeouts.total):
                raw = await _waiting(ctx, call.read_body(self.server.max_response_bytes))
        except TimeoutError:
            ctx.outcome = Outcome.TIMEOUT
            failed = "timeout"
            raise timeout_error("total") from None
        except (aiohttp.ClientError, ConnectionError) as err:
            ctx.outcome = Outcome.UPSTREAM_ERROR
            failed = "broken"
            raise upstream_error(f"The upstream connection broke ({type(err).__name__}).") from None
        except GatewayError:
            failed = "too_large"
            raise
        finally:
            call.abort()
            if failed:
                self.metrics.upstream_error(upstream.name, failed)
        try:
            payload = upstream.translate_response(ctx, _parse_unary(raw))
        except GatewayError:
            self.metrics.upstream_error(upstream.name, "malformed")
            raise
        if isinstance(payload, dict):
            usage = payload.get("usage")
            if isinstance(usage, dict):
                ctx.usage.set_from_upstream(usage)
            error = error_from_event(payload) if "error" in payload else None
            if error is not None:
                ctx.outcome = Outcome.UPSTREAM_ERROR
                self.metrics.upstream_error(upstream.name, "in_band")
                raise error
            payload = await chain.run_response(ctx, payload)
        ctx.outcome = Outcome.COMPLETED
        out = orjson.dumps(DIALECTS[ctx.client_format].unary(ctx, payload))
        ctx.bytes_out = len(out)
        overhead = ctx.require(_OVERHEAD)
        ctx.overhead_seconds = overhead.answered = overhead.now(ctx)
        return web.Response(
            body=out,
            content_type="application/json",
            headers={
                "X-Request-Id": ctx.request_id,
                **ctx.response_headers,
                OVERHEAD_HEADER: _overhead_ms(ctx.overhead_seconds),
            },
        )

    # ----- streaming -------------------------------------------------------------------

    async def _stream(
        self, request: web.Request, ctx: RequestContext, chain: Chain, upstream: Upstream
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        watchdog = Watchdog(loop, upstream.timeouts, loop.time())
        call: UpstreamCall | None = None
        observer: StreamObserver | None = None
        stream: _Stream | None = None
        try:
            call = await self._open(request, ctx, upstream)
            watchdog.attach(call)
            decoder, observer = upstream.stream_parts(ctx, self.server)
            stream = _Stream(self.server, ctx, chain, decoder, observer, call, watchdog)
            stream.upstream_failed = lambda kind: self.metrics.upstream_error(upstream.name, kind)
            self._streams.add(stream)
            response = await stream.start(request)
            if stream.response is None:  # the client left before the headers
                return response
            self.metrics.stream_started(ctx)
            try:
                await stream.run(response)
            finally:
                self.metrics.stream_ended(ctx)
            return response
        finally:
            if stream is not None:
                self._streams.discard(stream)
            watchdog.cancel()
            if observer is not None:
                observer.finish(ctx)
            if call is not None:
                call.abort()


def _draining_error() -> GatewayError:
    return GatewayError(
        503,
        "The gateway is restarting; retry the request.",
        type="server_error",
        code="gateway_draining",
        headers={"Retry-After": "1"},
    )


def _ignore(kind: str) -> None:
    """The default `_Stream.upstream_failed`: count nothing."""


class _Stream:
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
    ) -> None:
        self.server = server
        self.ctx = ctx
        self.chain = chain
        self.observer = observer
        self.call = call
        self.watchdog = watchdog
        self.decoder = decoder
        self.response: web.StreamResponse | None = None
        self.finished = False
        self._arrived: float | None = None  # when the bytes being processed came in
        self._first = Batch([])  # what `start` read before committing headers
        self.dialect = DIALECTS[ctx.client_format]
        self.egress = self.dialect.egress(ctx)
        self.upstream_failed: Callable[[str], None] = _ignore  # counts a failure by kind
        self.interrupted = False  # the gateway is shutting down: end with a retry hint

    # -- reading ---------------------------------------------------------------------

    async def _read(self) -> bytes:
        """The next upstream chunk; timeouts and broken connections become _StreamFailed."""
        wd = self.watchdog
        wd.waiting_since = wd._loop.time()
        try:
            chunk = await self.call.read_chunk()
        except (aiohttp.ClientError, ConnectionError, OSError) as err:
            raise self._read_failure(
                f"the upstream connection broke ({type(err).__name__})"
            ) from None
        finally:
            wd.waiting_since = None
        if wd.fired is not None or self.interrupted:
            raise self._read_failure("")
        return chunk

    def interrupt(self) -> None:
        """End this stream now (graceful shutdown): the pending read returns at once."""
        self.interrupted = True
        self.call.abort()

    def _read_failure(self, detail: str) -> _StreamFailed:
        if self.interrupted:
            return _StreamFailed(_draining_error(), Outcome.ERROR, "draining")
        if self.watchdog.fired is not None:
            return _StreamFailed(timeout_error(self.watchdog.fired), Outcome.TIMEOUT, "timeout")
        return _StreamFailed(
            upstream_error(f"The upstream stream failed: {detail}."),
            Outcome.UPSTREAM_ERROR,
            "broken",
        )

    def _decode(self, chunk: bytes) -> list[SSEEvent]:
        """Events completed by `chunk`; at the end of the body (b""), what the decoder held."""
        try:
            if chunk:
                return self.decoder.feed(chunk)
            events = self.decoder.flush()
        except SSEError as err:
            raise _StreamFailed(
                upstream_error(f"The upstream sent a malformed stream: {err}."),
                Outcome.UPSTREAM_ERROR,
                "malformed",
            ) from None
        if not events:
            raise self._eof_failure()
        return events

    def _eof_failure(self) -> _StreamFailed:
        what = "in the middle of an event" if self.decoder.has_pending else "before its final event"
        return _StreamFailed(
            upstream_error(f"The upstream closed the stream {what}.", code="upstream_truncated"),
            Outcome.UPSTREAM_ERROR,
            "truncated",
        )

    # -- phase 1: hold headers until the first event tells success from failure -------

    async def start(self, request: web.Request) -> web.StreamResponse:
        """Read up to the first data event (bounded wait), then commit 200 headers.

        Errors found here are real HTTP errors. The events read so far are delivered by
        `run`, so any failure from then on follows the after-headers contract.
        """
        held: list[SSEEvent] = []
        batch = Batch([])
        hold = self.server.header_hold_seconds
        ctx = self.ctx
        try:
            async with asyncio.timeout(hold):
                while not (batch.has_data or batch.terminal or batch.error):
                    events = self._decode(await _waiting(ctx, self._read()))
                    ctx.events_in += len(events)
                    batch = self.observer.classify(ctx, events)
                    held.extend(batch.events)
        except TimeoutError:
            pass  # slow first token: send headers now, keep streaming
        except _StreamFailed as failed:
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
        overhead = ctx.require(_OVERHEAD)
        ctx.overhead_seconds = overhead.answered = overhead.now(ctx)
        response = web.StreamResponse(
            status=200,
            headers={
                **SSE_RESPONSE_HEADERS,
                "X-Request-Id": ctx.request_id,
                **ctx.response_headers,
                OVERHEAD_HEADER: _overhead_ms(ctx.overhead_seconds),
            },
        )
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            ctx.outcome = Outcome.CLIENT_DISCONNECTED
            self.finished = True
            return response
        ctx.timing.response_started = self._arrived = time.perf_counter()
        self.response = response
        return response

    def _mark_first(self) -> None:
        self.watchdog.mark_first()
        self.ctx.timing.first_upstream_event = time.perf_counter()

    # -- phase 2: the pump ---------------------------------------------------------------

    async def run(self, response: web.StreamResponse) -> None:
        """Deliver what `start` read, then pump until the end, a failure or the client leaving."""
        if self.finished:
            return
        ctx = self.ctx
        try:
            try:
                first = self._first
                await self._deliver(first)
                if first.error is not None:
                    raise _StreamFailed(first.error, Outcome.UPSTREAM_ERROR, "in_band")
                if first.terminal is None:
                    await self._pump()
            except _Ended:
                pass
            ctx.outcome = ctx.outcome or Outcome.COMPLETED
            await self._finish(response)
        except _StreamFailed as failed:
            ctx.outcome = failed.outcome
            ctx.error = failed.error
            if failed.kind != "draining":
                self.upstream_failed(failed.kind)
            await self._fail(response, failed.error)
        except GatewayError as err:  # Reject from a plugin, or a fail-closed plugin's failure
            ctx.outcome = Outcome.REJECTED if isinstance(err, Reject) else Outcome.ERROR
            ctx.error = err
            await self._fail(response, err)
        except _ClientGone:
            ctx.outcome = Outcome.CLIENT_DISCONNECTED
        except asyncio.CancelledError:
            ctx.outcome = Outcome.CLIENT_DISCONNECTED
            self.call.abort()
            raise

    async def _pump(self) -> None:
        observer, ctx = self.observer, self.ctx
        while True:
            chunk = await self._read()
            self._arrived = time.perf_counter()
            events = self._decode(chunk)
            if not events:
                continue
            ctx.events_in += len(events)
            batch = observer.classify(ctx, events)
            if batch.has_data and not self.watchdog.got_first:
                self._mark_first()
            await self._deliver(batch)
            if batch.error is not None:
                raise _StreamFailed(batch.error, Outcome.UPSTREAM_ERROR, "in_band")
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
            if batch.terminal is not None:
                out = [*out, *chain.run_flush(self.ctx), batch.terminal]
        except EndStream as end:
            # What passed the chain before a flush-time EndStream still goes out first.
            await self._end_early([*out, *end.events], end.outcome)
            raise _Ended() from None
        if out:
            await self._write(out)

    async def _write(self, events: list[SSEEvent], *, translate: bool = True) -> None:
        assert self.response is not None
        egress = self.egress
        if egress is not None and translate:
            events = [out for event in events for out in egress.feed(event)]
        data = encode_events(events)
        if self._arrived is not None:
            self.ctx.overhead_seconds += time.perf_counter() - self._arrived
            self._arrived = None
        try:
            await self.response.write(data)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as err:
            raise _ClientGone() from err
        now = time.perf_counter()
        timing = self.ctx.timing
        if timing.first_event_written is None:
            timing.first_event_written = now
        timing.last_event_written = now
        self.ctx.events_out += len(events)
        self.ctx.bytes_out += len(data)

    async def _end_early(self, events: list[SSEEvent], outcome: Outcome) -> None:
        self.call.abort()
        self.ctx.outcome = outcome
        terminal = self.observer.terminal_event()
        await self._write([*events, *([terminal] if terminal else [])])

    async def _finish(self, response: web.StreamResponse) -> None:
        self.call.release()
        try:
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            self.ctx.outcome = Outcome.CLIENT_DISCONNECTED

    async def _fail(self, response: web.StreamResponse, err: GatewayError) -> None:
        """The contract after headers: one final error event, then the stream ends."""
        self.call.abort()  # ctx.status stays 200: that is what the client got; ctx.error says why
        try:
            event = self.dialect.final_error_event(self.ctx, err) or self.observer.error_event(err)
            await self._write([event], translate=False)
            await response.write_eof()
        except (_ClientGone, ConnectionError, aiohttp.ClientConnectionResetError):
            self.ctx.outcome = Outcome.CLIENT_DISCONNECTED
