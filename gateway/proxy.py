"""The request handler: authenticate, parse, route, run the chain, try deployments in order.

A streamed answer is relayed by `gateway.stream.StreamRelay` (the pull loop); a
non-streaming one is read whole (bounded) here. Retries happen only before a byte reached
the client; `drain` is the graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gateway.attempts import Attempts, Retry, ejected, queue_failure, retry_or
from gateway.auth import PRINCIPAL, KeyStore, key_from_headers
from gateway.chain import Chain
from gateway.config import ServerConfig
from gateway.context import (
    Endpoint,
    Outcome,
    RequestContext,
    request_id_from,
    upstream_request_id,
)
from gateway.errors import (
    GatewayError,
    bad_request,
    internal_error,
    timeout_error,
    upstream_error,
)
from gateway.headers import upstream_headers
from gateway.heal import HEAL_HEADER, HEALED, Shape, StreamHealer, transcript_for
from gateway.metrics import GatewayMetrics
from gateway.overhead import (
    OVERHEAD,
    OVERHEAD_HEADER,
    Overhead,
    answer_headers,
    overhead_ms,
    waiting,
)
from gateway.pricing import PRICING
from gateway.protocols.lanes import check_client_body, dialect_of
from gateway.protocols.responses.lane import STORE as RESPONSES_STORE
from gateway.protocols.responses.native import pinned
from gateway.protocols.responses.store import ResponseStore
from gateway.proxy_support import acquire as _acquire
from gateway.proxy_support import end_trace as _end_trace
from gateway.proxy_support import log_broken as _log_broken
from gateway.proxy_support import parse_unary as _parse_unary
from gateway.resume import ResumableSink, Resumer, wants_resume
from gateway.routing import Target, UpstreamHealth
from gateway.runtime import Generations, Runtime
from gateway.sinks import HttpSink, StreamSink
from gateway.stream import StreamRelay, draining_error
from gateway.tracing_config import TRACE
from gateway.upstream_answer import check_answer
from gateway.upstreams.base import (
    StreamObserver,
    Upstream,
    UpstreamBroken,
    UpstreamCall,
)
from gateway.upstreams.errors import error_from_event
from gateway.validation import read_json_body
from gateway.watchdog import Watchdog

if TYPE_CHECKING:
    from gateway.replay.cache import ReplayCache
    from gateway.tracing import Tracing

log = logging.getLogger("sluice.proxy")


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
        generations: Generations,
        *,
        metrics: GatewayMetrics,
        resumer: Resumer | None = None,
    ) -> None:
        self.generations = generations
        self.resumer = resumer
        self.responses_store: ResponseStore | None = None  # set at start-up (/v1/responses)
        self._detached: set[asyncio.Task[Served]] = set()  # resumable streams' producers
        self.metrics = metrics
        self.tracing: Tracing | None = None  # set at start-up when tracing is on
        self.replay: ReplayCache | None = None  # set at start-up (gateway.replay)
        self.draining = False  # set by `drain`: new requests get 503
        self._inflight = 0
        self._streams: set[StreamRelay] = set()
        self._changed = asyncio.Event()

    @property
    def runtime(self) -> Runtime:
        """What new requests are served with (a reload replaces it; see gateway.runtime)."""
        return self.generations.current

    @property
    def keys(self) -> KeyStore | None:
        """The current runtime's keys (None with `auth: none`)."""
        return self.generations.current.keys

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self.handle(request, Endpoint.CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        return await self.handle(request, Endpoint.COMPLETIONS)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/messages: Anthropic's Messages API, for the Anthropic SDKs."""
        return await self.handle(request, Endpoint.CHAT, "anthropic")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/responses: OpenAI's Responses API, run as chat (see gateway.protocols)."""
        return await self.handle(request, Endpoint.CHAT, "responses")

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
        if client_format == "responses" and self.responses_store is not None:
            ctx.set(RESPONSES_STORE, self.responses_store)
        sink = HttpSink(request)
        if resumer is not None:
            asked = wants_resume(request.headers)
            if asked or self.runtime.resumable_routes:
                requested = asked and resumer.config.enabled
                sink = ResumableSink(request, resumer, ctx, requested=requested)
        max_body = self.runtime.config.server.max_body_bytes
        inbound = Inbound(request.headers, lambda: read_json_body(request, max_body), sink)
        if isinstance(sink, ResumableSink):
            served = await self._serve_detachable(ctx, inbound, sink)
        else:
            served = await self.serve(ctx, inbound)
        if sink.committed:  # the answer started: never a second response on this socket
            assert sink.response is not None
            return sink.response
        if isinstance(served, GatewayError):
            return self.error_response(ctx, served)
        assert served is not None
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
        caller to send in its own format. Once the sink is committed the answer is the
        stream, whatever happens: the result is None.
        """
        self._inflight += 1
        rt = self.generations.enter()  # this request's runtime, whatever reloads happen
        overhead = Overhead()
        ctx.set(OVERHEAD, overhead)
        chain = rt.default_chain
        trace = self.tracing.start(ctx, inbound.headers) if self.tracing is not None else None
        try:
            try:
                await self._admit(rt, inbound, ctx)
                assert ctx.route is not None
                chain = rt.chains[ctx.route.name]
                await chain.run_request(ctx)
                if self.replay is not None and ctx.route.replay:  # see gateway.replay
                    run = functools.partial(self._attempts, rt, ctx=ctx, chain=chain)
                    return await self.replay.serve(ctx, inbound, chain, run)
                return await self._attempts(rt, inbound, ctx, chain)
            except GatewayError as err:
                if inbound.sink.committed:  # after headers: the relay sent its final event
                    ctx.error = ctx.error or err
                    return None
                return self._record_error(ctx, err)
        except asyncio.CancelledError:
            ctx.outcome = ctx.outcome or Outcome.CLIENT_DISCONNECTED
            raise
        except Exception:
            log.exception("unhandled error (request %s)", ctx.request_id)
            ctx.outcome = Outcome.ERROR
            if inbound.sink.committed:
                ctx.error = ctx.error or internal_error()
                return None
            return self._record_error(ctx, internal_error())
        finally:
            ctx.timing.ended = time.perf_counter()
            try:
                await chain.run_end(ctx)
            finally:
                self.metrics.observe_request(ctx, overhead.answered)
                if trace is not None:
                    _end_trace(trace, ctx)
                self.generations.leave(rt)
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

    async def _admit(self, rt: Runtime, inbound: Inbound, ctx: RequestContext) -> None:
        if rt.pricing is not None:  # every request gets a cost, refused ones too (0)
            ctx.set(PRICING, rt.pricing)
        principal = None
        keys = rt.keys
        if keys is not None:  # who, before reading a byte of the body
            principal = keys.authenticate(key_from_headers(inbound.headers))
            ctx.identity = principal.identity()
            ctx.set(PRINCIPAL, principal)
        body = await waiting(ctx, inbound.read_body())
        body = await waiting(ctx, dialect_of(ctx).prepare(ctx, body))  # before routing: I/O
        check_client_body(ctx, body)
        ctx.model = body["model"]
        ctx.route = rt.router.resolve(ctx.model)
        ctx.body = rt.lanes.choose(ctx, ctx.route).dialect.admit(ctx, body)
        ctx.stream = ctx.endpoint is not Endpoint.EMBEDDINGS and body.get("stream") is True
        if principal is not None and keys is not None:
            keys.authorize(principal, ctx.model, ctx.route)

    async def _attempts(
        self, rt: Runtime, inbound: Inbound, ctx: RequestContext, chain: Chain
    ) -> Served:
        """Try the route's deployments in the balancer's order until one answers.

        Only failures before a byte reached the client are retried (connect errors,
        timeouts before the first event, 429 and 5xx, the upstream's queue), on the next
        deployment when there is one, with backoff that honours Retry-After; once
        streaming started, never (no duplicated tokens). See `gateway.attempts`.
        """
        assert ctx.route is not None
        targets = pinned(ctx, rt.router.targets(ctx.model))  # where a previous response is
        attempts = Attempts(targets, ctx.route.retries)
        while (target := attempts.next()) is not None:
            health = rt.health[target.upstream]
            breaker = health.breaker
            if breaker.available and (delay := attempts.delay(target)):
                await waiting(ctx, asyncio.sleep(delay))  # before a half-open trial is claimed
            if not breaker.allow():
                attempts.skip(target, ejected(target.upstream, breaker))
                continue
            attempts.start()
            ctx.retries = attempts.made - 1
            try:
                upstream = rt.lanes.upstream(ctx, target.upstream)
                return await self._attempt(rt, inbound, ctx, chain, target, upstream, health)
            except Retry as retry:
                if retry.ill:
                    health.failures += 1
                if attempts.failed(target, retry):
                    breaker.record_failure()
            except GatewayError as err:
                raise attempts.final(err) from None
        ctx.outcome = ctx.outcome or Outcome.UPSTREAM_ERROR
        raise attempts.final()

    async def _attempt(
        self,
        rt: Runtime,
        inbound: Inbound,
        ctx: RequestContext,
        chain: Chain,
        target: Target,
        upstream: Upstream,
        health: UpstreamHealth,
    ) -> Served:
        """One deployment: queue for a slot, send, and (for streams) relay to the end."""
        server = rt.config.server
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
            raise queue_failure(err) from None
        if slot is not None:
            self.metrics.observe_queue_wait(target.upstream, slot.waited)
        trace = ctx.get(TRACE) if self.tracing is not None else None
        if trace is not None:
            trace.attempt_started(ctx)
        health.outstanding += 1
        try:
            response: Served = None
            if ctx.stream:
                healer = self._healer(rt, inbound, ctx)
                await self._stream(server, inbound, ctx, chain, upstream, healer)
            else:
                response = await self._unary(server, inbound, ctx, chain, upstream)
        except GatewayError as err:
            if trace is not None:
                trace.attempt_ended(ctx, err)
            if inbound.sink.committed:  # never a second attempt into a started answer
                raise
            raise retry_or(err, ctx) from None
        finally:
            health.outstanding -= 1
            if slot is not None:
                slot.release()
        if trace is not None:
            trace.attempt_ended(ctx, None)
        if ctx.get(HEALED) is None:  # a healed stream's healer counted its upstreams
            health.successes += 1
            health.breaker.record_success()
        return response

    def _healer(self, rt: Runtime, inbound: Inbound, ctx: RequestContext) -> StreamHealer | None:
        """The stream's healer when its route heals and its lane and request allow."""
        transcript = transcript_for(ctx)
        if transcript is None or ctx.route is None or ctx.route.heal is None:
            return None
        ctx.response_headers[HEAL_HEADER] = "enabled"

        async def send(upstream: Upstream, shape: Shape) -> UpstreamCall:
            body, headers = self._outgoing(inbound, ctx, upstream)
            return await waiting(ctx, self._send(ctx, upstream, shape(body), headers))

        return StreamHealer(
            ctx,
            ctx.route.heal,
            rt.config.server,
            transcript,
            rt.router.targets(ctx.model),
            rt.health,
            lambda name: rt.lanes.upstream(ctx, name),
            send,
            lambda health: _acquire(health, ctx),
            self.metrics,
        )

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
        self, inbound: Inbound, ctx: RequestContext, upstream: Upstream
    ) -> tuple[dict[str, Any], dict[str, str]]:
        assert ctx.route is not None
        body = {**ctx.body, "model": ctx.upstream_model or ctx.model}
        id_header = upstream.request_id_header
        ctx.upstream_request_id = upstream_request_id(ctx.request_id) if id_header else None
        headers = upstream_headers(inbound.headers, ctx.upstream_request_id or "", id_header)
        if self.tracing is not None:  # the attempt's span context, not the client's
            ctx.require(TRACE).inject(headers)
        return body, headers

    async def _open(
        self, inbound: Inbound, ctx: RequestContext, upstream: Upstream
    ) -> UpstreamCall:
        """Send upstream and wait for its headers; errors before a byte reached the client."""
        body, headers = self._outgoing(inbound, ctx, upstream)
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
        except UpstreamBroken as err:
            _log_broken(ctx, upstream.name, "before answering", err)
            ctx.outcome = Outcome.UPSTREAM_ERROR
            self.metrics.upstream_error(upstream.name, "connect")
            raise upstream_error(f"Upstream {upstream.name!r} failed: {err.reason}.") from None
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
        await check_answer(ctx, upstream, call, limit, self.metrics)
        return call

    async def _unary(
        self,
        server: ServerConfig,
        inbound: Inbound,
        ctx: RequestContext,
        chain: Chain,
        upstream: Upstream,
    ) -> web.Response:
        """A non-streaming request: the one place a whole (bounded) body is held."""
        call = await self._open(inbound, ctx, upstream)
        failed = ""  # a cancellation (client gone) is no upstream error
        read = False
        try:
            async with asyncio.timeout(upstream.timeouts.total):
                raw = await waiting(ctx, call.read_body(server.max_response_bytes))
            read = True
        except TimeoutError:
            ctx.outcome = Outcome.TIMEOUT
            failed = "timeout"
            raise timeout_error("total") from None
        except UpstreamBroken as err:
            _log_broken(ctx, upstream.name, "while answering", err)
            ctx.outcome = Outcome.UPSTREAM_ERROR
            failed = "broken"
            raise upstream_error(f"{err.reason[:1].upper()}{err.reason[1:]}.") from None
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
        return web.Response(body=out, content_type="application/json", headers=answer_headers(ctx))

    # ----- streaming -------------------------------------------------------------------

    async def _stream(
        self,
        server: ServerConfig,
        inbound: Inbound,
        ctx: RequestContext,
        chain: Chain,
        upstream: Upstream,
        healer: StreamHealer | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        watchdog = Watchdog(loop, upstream.timeouts, loop.time())
        call: UpstreamCall | None = None
        observer: StreamObserver | None = None
        stream: StreamRelay | None = None
        try:
            call = await self._open(inbound, ctx, upstream)
            watchdog.attach(call)
            decoder, observer = upstream.stream_parts(ctx, server)
            stream = StreamRelay(
                server, ctx, chain, decoder, observer, call, watchdog, inbound.sink
            )
            stream.upstream_failed = lambda kind: self.metrics.upstream_error(upstream.name, kind)
            stream.healer = healer
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
            if stream is not None:
                stream.observer.finish(ctx)  # a healed stream's: the continuation's
            elif observer is not None:
                observer.finish(ctx)
            if call is not None:
                call.abort()
            if healer is not None:
                healer.close(ctx)
