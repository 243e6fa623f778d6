"""The request handler: authenticate, parse, route, run the chain, try deployments in order.

A streamed answer is relayed by `gateway.stream.StreamRelay` (the pull loop); a
non-streaming one is read whole (bounded) here. Retries happen only before a byte reached
the client; `drain` is the graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from gateway.auth import PRINCIPAL, KeyStore, key_from_headers
from gateway.balancer import QueueFull, QueueTimeout, Slot, backoff_delay, parse_retry_after
from gateway.chain import Chain
from gateway.config import ServerConfig
from gateway.context import Endpoint, Outcome, RequestContext, request_id_from
from gateway.errors import (
    GatewayError,
    bad_request,
    internal_error,
    timeout_error,
    upstream_error,
)
from gateway.headers import upstream_headers
from gateway.metrics import GatewayMetrics
from gateway.overhead import OVERHEAD, OVERHEAD_HEADER, Overhead, overhead_ms, waiting
from gateway.protocols.lanes import Lanes, check_client_body, dialect_of
from gateway.resume import ResumableSink, Resumer, wants_resume
from gateway.routing import Router, Target, UpstreamHealth
from gateway.sinks import HttpSink, StreamSink
from gateway.stream import StreamRelay, draining_error
from gateway.tracing_config import TRACE
from gateway.upstreams.base import (
    StreamObserver,
    Upstream,
    UpstreamCall,
)
from gateway.upstreams.errors import error_from_event
from gateway.validation import read_json_body
from gateway.watchdog import Watchdog

if TYPE_CHECKING:
    from gateway.tracing import RequestTrace, Tracing

log = logging.getLogger("sluice.proxy")


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


def _end_trace(trace: RequestTrace, ctx: RequestContext) -> None:
    try:
        trace.end(ctx)
    except Exception:
        log.exception("ending the request's trace failed (request %s)", ctx.request_id)


@dataclass(slots=True)
class Inbound:
    """One request as the proxy runs it, whatever carried it (an HTTP request or a WebSocket
    message): the client's headers, its body, and where a streamed answer goes."""

    headers: Mapping[str, str]
    read_body: Callable[[], Awaitable[dict[str, Any]]]
    sink: StreamSink


Served = web.Response | GatewayError | None
"""What `Proxy.serve` returns: a whole (non-streamed) answer, the error to send before any
byte went out, or None when the answer was streamed into the inbound's sink."""


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
        resumer: Resumer | None = None,
    ) -> None:
        self.keys = keys
        self.resumer = resumer
        self._resumable_routes = resumer is not None and resumer.routes_opt_in
        self._detached: set[asyncio.Task[Served]] = set()  # resumable streams' producers
        self.metrics = metrics
        self.tracing: Tracing | None = None  # set at start-up when tracing is on
        self.draining = False  # set by `drain`: new requests get 503
        self._inflight = 0
        self._streams: set[StreamRelay] = set()
        self._changed = asyncio.Event()
        self.server = server
        self.router = router
        self.upstreams = upstreams
        self.health = health
        self.chains = chains
        self.default_chain = default_chain
        self.lanes = Lanes(upstreams)

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
        """One HTTP request: serve it, then render what came of it."""
        if self.draining:
            return draining_error().to_response({"Connection": "close"})
        resumer = self.resumer
        if resumer is not None and "Last-Event-ID" in request.headers:
            return await resumer.resume_by_event_id(request)
        ctx = RequestContext(request_id_from(request.headers.get("X-Request-Id")), endpoint)
        ctx.client_format = client_format
        sink = HttpSink(request)
        if resumer is not None:
            asked = wants_resume(request.headers)
            if asked or self._resumable_routes:
                requested = asked and resumer.config.enabled
                sink = ResumableSink(request, resumer, ctx, requested=requested)
        max_body = self.server.max_body_bytes
        inbound = Inbound(request.headers, lambda: read_json_body(request, max_body), sink)
        if isinstance(sink, ResumableSink):
            served = await self._serve_detachable(ctx, inbound, sink)
        else:
            served = await self.serve(ctx, inbound)
        if isinstance(served, GatewayError):
            return self.error_response(ctx, served)
        if served is None:
            assert sink.response is not None
            return sink.response
        return served

    async def _serve_detachable(
        self, ctx: RequestContext, inbound: Inbound, sink: ResumableSink
    ) -> Served:
        """Serve in a task of its own, so a resumable stream outlives its first client."""
        task = asyncio.create_task(self.serve(ctx, inbound))
        sink.producer = task
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)
        task.add_done_callback(lambda _task: sink.ended())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if sink.log is None:  # not (yet) resumable: stop the upstream at once, as always
                task.cancel()
            else:
                sink.detach()  # generation goes on for the grace period
            raise

    async def serve(self, ctx: RequestContext, inbound: Inbound) -> Served:
        """One request from arrival to its single end (`on_end` runs exactly once).

        Errors before a byte went out are returned, already recorded on `ctx`, for the
        caller to send in its own format.
        """
        self._inflight += 1
        overhead = Overhead()
        ctx.set(OVERHEAD, overhead)
        chain = self.default_chain
        trace = self.tracing.start(ctx, inbound.headers) if self.tracing is not None else None
        try:
            try:
                await self._admit(inbound, ctx)
                assert ctx.route is not None
                chain = self.chains[ctx.route.name]
                await chain.run_request(ctx)
                return await self._attempts(inbound, ctx, chain)
            except GatewayError as err:
                return self._record_error(ctx, err)
        except asyncio.CancelledError:
            ctx.outcome = ctx.outcome or Outcome.CLIENT_DISCONNECTED
            raise
        except Exception:
            log.exception("unhandled error (request %s)", ctx.request_id)
            ctx.outcome = Outcome.ERROR
            return self._record_error(ctx, internal_error())
        finally:
            ctx.timing.ended = time.perf_counter()
            try:
                await chain.run_end(ctx)
            finally:
                self.metrics.observe_request(ctx, overhead.answered)
                if trace is not None:
                    _end_trace(trace, ctx)
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

    async def _admit(self, inbound: Inbound, ctx: RequestContext) -> None:
        principal = None
        if self.keys is not None:  # who, before reading a byte of the body
            principal = self.keys.authenticate(key_from_headers(inbound.headers))
            ctx.identity = principal.identity()
            ctx.set(PRINCIPAL, principal)
        body = await waiting(ctx, inbound.read_body())
        check_client_body(ctx, body)
        ctx.model = body["model"]
        ctx.route = self.router.resolve(ctx.model)
        ctx.body = self.lanes.choose(ctx, ctx.route).dialect.admit(ctx, body)
        ctx.stream = ctx.endpoint is not Endpoint.EMBEDDINGS and body.get("stream") is True
        if principal is not None and self.keys is not None:
            self.keys.authorize(principal, ctx.model, ctx.route)

    async def _attempts(self, inbound: Inbound, ctx: RequestContext, chain: Chain) -> Served:
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
                return await self._attempt(inbound, ctx, chain, target, health)
            except _Retry as retry:
                last = retry.error
                if attempt < len(tries) - 1:
                    delay = backoff_delay(attempt, retry_after=retry.retry_after)
                    await waiting(ctx, asyncio.sleep(delay))
        assert last is not None
        ctx.outcome = ctx.outcome or Outcome.UPSTREAM_ERROR
        raise last

    async def _attempt(
        self,
        inbound: Inbound,
        ctx: RequestContext,
        chain: Chain,
        target: Target,
        health: UpstreamHealth,
    ) -> Served:
        """One deployment: queue for a slot, send, and (for streams) relay to the end."""
        upstream = self.lanes.upstream(ctx, target.upstream)
        if not upstream.supports(ctx.endpoint):
            raise bad_request(
                f"The model `{ctx.model}` does not support /v1/{ctx.endpoint.value}.",
                param="model",
                code="unsupported_endpoint",
            )
        ctx.upstream_name, ctx.upstream_model, ctx.outcome = target.upstream, target.model, None
        try:
            slot = await waiting(ctx, _acquire(health, ctx))
        except GatewayError as err:  # queue full or too slow here: another deployment may do
            kind = "queue_full" if err.code == "upstream_queue_full" else "queue_timeout"
            self.metrics.upstream_error(target.upstream, kind)
            raise _Retry(err, parse_retry_after(err.headers.get("Retry-After"))) from None
        if slot is not None:
            self.metrics.observe_queue_wait(target.upstream, slot.waited)
        trace = ctx.get(TRACE) if self.tracing is not None else None
        if trace is not None:
            trace.attempt_started(ctx)
        health.outstanding += 1
        try:
            response: Served = None
            if ctx.stream:
                await self._stream(inbound, ctx, chain, upstream)
            else:
                response = await self._unary(inbound, ctx, chain, upstream)
        except GatewayError as err:
            if trace is not None:
                trace.attempt_ended(ctx, err)
            raise _retry_or(err, ctx, health) from None
        finally:
            health.outstanding -= 1
            if slot is not None:
                slot.release()
        if trace is not None:
            trace.attempt_ended(ctx, None)
        health.successes += 1
        health.breaker.record_success()
        return response

    @staticmethod
    def _record_error(ctx: RequestContext, err: GatewayError) -> GatewayError:
        ctx.error = err
        ctx.status = err.status
        if ctx.outcome is None:
            ctx.outcome = Outcome.REJECTED if err.status < 500 else Outcome.UPSTREAM_ERROR
        return err

    def error_response(self, ctx: RequestContext, err: GatewayError) -> web.Response:
        """An error before headers, as JSON in the client's format."""
        response = dialect_of(ctx).error_response(ctx, err)
        response.headers[OVERHEAD_HEADER] = overhead_ms(ctx.require(OVERHEAD).now(ctx))
        return response

    def _outgoing(
        self, inbound: Inbound, ctx: RequestContext
    ) -> tuple[dict[str, Any], dict[str, str]]:
        assert ctx.route is not None
        body = {**ctx.body, "model": ctx.upstream_model or ctx.model}
        headers = upstream_headers(inbound.headers, ctx.request_id)
        if self.tracing is not None:  # the attempt's span context, not the client's
            ctx.require(TRACE).inject(headers)
        return body, headers

    async def _open(
        self, inbound: Inbound, ctx: RequestContext, upstream: Upstream
    ) -> UpstreamCall:
        """Send upstream and wait for its headers; errors before a byte reached the client."""
        body, headers = self._outgoing(inbound, ctx)
        return await waiting(ctx, self._send(ctx, upstream, body, headers))

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
        if self.tracing is not None:
            ctx.require(TRACE).upstream_answered(call.status)
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
        if "text/html" in call.headers.get("Content-Type", ""):
            # A captive portal, a login page or a base_url that points at a web server.
            call.abort()
            ctx.outcome = Outcome.UPSTREAM_ERROR
            self.metrics.upstream_error(upstream.name, "malformed")
            raise upstream_error(
                f"Upstream {upstream.name!r} answered {call.status} with an HTML page, not an "
                "API response (check its base_url, or a proxy or login page in the way).",
                code="upstream_not_an_api",
            )
        return call

    async def _unary(
        self, inbound: Inbound, ctx: RequestContext, chain: Chain, upstream: Upstream
    ) -> web.Response:
        """A non-streaming request: the one place a whole (bounded) body is held."""
        call = await self._open(inbound, ctx, upstream)
        failed = ""  # a cancellation (client gone) is no upstream error
        read = False
        try:
            async with asyncio.timeout(upstream.timeouts.total):
                raw = await waiting(ctx, call.read_body(self.server.max_response_bytes))
            read = True
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
            # A body read to its end leaves a reusable connection: back to the pool.
            if read:
                call.release()
            else:
                call.abort()
            if failed:
                self.metrics.upstream_error(upstream.name, failed)
        try:
            payload = upstream.translate_response(ctx, _parse_unary(raw))
        except GatewayError:
            self.metrics.upstream_error(upstream.name, "malformed")
            raise
        if isinstance(payload, dict):
            usage, model = payload.get("usage"), payload.get("model")
            if isinstance(usage, dict):
                ctx.usage.set_from_upstream(usage)
            if isinstance(model, str):
                ctx.response_model = model[:200]
            error = error_from_event(payload) if "error" in payload else None
            if error is not None:
                ctx.outcome = Outcome.UPSTREAM_ERROR
                self.metrics.upstream_error(upstream.name, "in_band")
                raise error
            payload = await chain.run_response(ctx, payload)
            if self.tracing is not None:
                ctx.require(TRACE).response(payload)
        ctx.outcome = Outcome.COMPLETED
        out = orjson.dumps(dialect_of(ctx).unary(ctx, payload))
        ctx.bytes_out = len(out)
        overhead = ctx.require(OVERHEAD)
        ctx.overhead_seconds = overhead.answered = overhead.now(ctx)
        return web.Response(
            body=out,
            content_type="application/json",
            headers={
                "X-Request-Id": ctx.request_id,
                **ctx.response_headers,
                OVERHEAD_HEADER: overhead_ms(ctx.overhead_seconds),
            },
        )

    # ----- streaming -------------------------------------------------------------------

    async def _stream(
        self, inbound: Inbound, ctx: RequestContext, chain: Chain, upstream: Upstream
    ) -> None:
        loop = asyncio.get_running_loop()
        watchdog = Watchdog(loop, upstream.timeouts, loop.time())
        call: UpstreamCall | None = None
        observer: StreamObserver | None = None
        stream: StreamRelay | None = None
        try:
            call = await self._open(inbound, ctx, upstream)
            watchdog.attach(call)
            decoder, observer = upstream.stream_parts(ctx, self.server)
            stream = StreamRelay(
                self.server, ctx, chain, decoder, observer, call, watchdog, inbound.sink
            )
            stream.upstream_failed = lambda kind: self.metrics.upstream_error(upstream.name, kind)
            self._streams.add(stream)
            if not await stream.start():  # the client left before the headers
                return
            self.metrics.stream_started(ctx)
            try:
                await stream.run()
            finally:
                self.metrics.stream_ended(ctx)
        finally:
            if stream is not None:
                self._streams.discard(stream)
            watchdog.cancel()
            if observer is not None:
                observer.finish(ctx)
            if call is not None:
                call.abort()
