"""OpenTelemetry traces: a server span per request, a client span per upstream attempt.

Imported only when tracing is on (`gateway.tracing_config.resolve_tracing`), so a gateway
with tracing off never loads the SDK. Spans are built from what the request context
already holds, at the points the proxy passes anyway: the request's start and end, each
attempt's start and end, the upstream headers being built. Nothing runs per streamed
event; the time to first token becomes a span event with its own timestamp at the end.
Contexts are passed explicitly (never attached to the running task), and a span that is
not sampled is never given attributes.

Recorded: the GenAI semantic conventions' attributes (`gen_ai.*`, `error.type`), team,
route, upstream, request id, outcome and status. Never recorded: headers, keys, and (unless
`capture_content`) any prompt or answer text. See docs/tracing.md.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.util.types import AttributeValue

from gateway import __version__
from gateway.config import GatewayConfig
from gateway.context import Endpoint, Outcome, RequestContext
from gateway.errors import GatewayError
from gateway.genai import PROVIDER_NAMES, operation_name, time_to_first_token
from gateway.tracing_config import TRACE, TracingSettings

_MAX_TEXT: Final = 16_384  # characters of captured content per attribute
_MAX_MODEL: Final = 200
_FAILED: Final = frozenset({Outcome.UPSTREAM_ERROR, Outcome.TIMEOUT, Outcome.ERROR})
_PATHS: Final = {
    ("openai", Endpoint.CHAT): "/v1/chat/completions",
    ("anthropic", Endpoint.CHAT): "/v1/messages",
    ("responses", Endpoint.CHAT): "/v1/responses",
    ("openai", Endpoint.COMPLETIONS): "/v1/completions",
    ("openai", Endpoint.EMBEDDINGS): "/v1/embeddings",
}


def _server_of(base_url: str | None) -> tuple[str, int] | None:
    if not base_url:
        return None
    parts = urlsplit(base_url)
    if parts.hostname is None:
        return None
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _upstream_attributes(config: GatewayConfig) -> dict[str, dict[str, AttributeValue]]:
    """Per upstream: provider name, server address and port (from its base URL)."""
    out: dict[str, dict[str, AttributeValue]] = {}
    for name, upstream in config.upstreams.items():
        attrs: dict[str, AttributeValue] = {
            "gen_ai.provider.name": PROVIDER_NAMES.get(upstream.kind, upstream.kind),
            "sluice.upstream": name,
        }
        url = getattr(upstream, "base_url", None) or getattr(upstream, "endpoint", None)
        server = _server_of(url)
        if server is not None:
            attrs["server.address"], attrs["server.port"] = server
        out[name] = attrs
    return out


class Tracing:
    """The tracer provider and exporter for the gateway's lifetime (one per app)."""

    def __init__(self, settings: TracingSettings, config: GatewayConfig) -> None:
        attributes: dict[str, AttributeValue] = {"service.version": __version__}
        if settings.service_name is not None:
            attributes["service.name"] = settings.service_name
        sampler = None
        if settings.sample_ratio is not None:
            sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        self.provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
        exporter = OTLPSpanExporter(endpoint=settings.endpoint, headers=settings.headers)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("sluice", __version__)
        self.propagator = propagate.get_global_textmap()  # OTEL_PROPAGATORS (W3C by default)
        self.fields = frozenset(name.lower() for name in self.propagator.fields)
        self.capture_content = settings.capture_content
        self.upstreams = _upstream_attributes(config)

    def start(self, ctx: RequestContext, headers: Mapping[str, str]) -> RequestTrace:
        """The server span of a request that just arrived, continuing the client's trace."""
        trace = RequestTrace(self, ctx, self.propagator.extract(headers))
        ctx.set(TRACE, trace)
        return trace

    def shutdown(self) -> None:
        """Export what is still queued and stop (blocking: run it in a thread)."""
        self.provider.shutdown()


def _ns(anchor_ns: int, anchor: float, mark: float) -> int:
    """A `time.perf_counter()` mark as wall-clock nanoseconds."""
    return anchor_ns + int((mark - anchor) * 1e9)


class RequestTrace:
    """The spans of one request; the proxy calls it at the points named by its methods."""

    __slots__ = ("_anchor", "_anchor_ns", "_attempts", "_client", "_status", "_tracing", "span")

    def __init__(self, tracing: Tracing, ctx: RequestContext, parent: Context) -> None:
        self._tracing = tracing
        self._anchor = ctx.timing.received
        self._anchor_ns = time.time_ns() - int((time.perf_counter() - self._anchor) * 1e9)
        operation = operation_name(ctx)
        self.span: Span = tracing.tracer.start_span(
            operation,
            context=parent,
            kind=SpanKind.SERVER,
            start_time=self._anchor_ns,
            attributes={
                "gen_ai.operation.name": operation,
                "http.request.method": "POST",
                "http.route": _PATHS.get((ctx.client_format, ctx.endpoint), "/v1/ws"),
                "sluice.request_id": ctx.request_id,
            },
        )
        self._client: Span | None = None
        self._attempts = 0
        self._status: int | None = None

    # ----- one upstream attempt -----------------------------------------------------------

    def attempt_started(self, ctx: RequestContext) -> None:
        """A client span for the attempt at `ctx.upstream_name` (ending any earlier one)."""
        if self._client is not None:
            self._client.end()
        self._attempts += 1
        self._status = None
        operation = operation_name(ctx)
        model = ctx.upstream_model or ctx.model
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model[:_MAX_MODEL],
            "http.request.method": "POST",
            "sluice.attempt": self._attempts,
            **self._tracing.upstreams.get(ctx.upstream_name or "", {}),
        }
        self._client = self._tracing.tracer.start_span(
            f"{operation} {model[:_MAX_MODEL]}",
            context=set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Replace the client's trace headers with the attempt span's context."""
        fields = self._tracing.fields
        for name in [name for name in headers if name.lower() in fields]:
            del headers[name]
        span = self._client if self._client is not None else self.span
        self._tracing.propagator.inject(headers, context=set_span_in_context(span))

    def upstream_answered(self, status: int) -> None:
        """The upstream's response status for the current attempt."""
        self._status = status

    def attempt_ended(self, ctx: RequestContext, error: GatewayError | None) -> None:
        """End the attempt's span: its status, and usage when it served the request."""
        span, self._client = self._client, None
        if span is None:
            return
        if span.is_recording():
            if self._status is not None:
                span.set_attribute("http.response.status_code", self._status)
            if ctx.response_model:
                span.set_attribute("gen_ai.response.model", ctx.response_model)
            _usage(span, ctx)
            failed = error is not None or ctx.outcome in _FAILED
            if failed:
                span.set_attribute("error.type", _error_type(ctx, error))
                span.set_status(Status(StatusCode.ERROR, _description(ctx, error)))
        span.end()

    # ----- the request's end --------------------------------------------------------------

    def response(self, payload: Any) -> None:
        """A non-streamed answer (recorded only with capture_content)."""
        if self._tracing.capture_content and self.span.is_recording():
            choices = payload.get("choices") if isinstance(payload, dict) else None
            if choices is not None:
                self.span.set_attribute("gen_ai.output.messages", _text(choices))

    def end(self, ctx: RequestContext) -> None:
        """End the server span with everything known at the request's end."""
        if self._client is not None:  # cancelled mid-attempt
            self.attempt_ended(ctx, ctx.error)
        span = self.span
        ended = ctx.timing.ended if ctx.timing.ended is not None else time.perf_counter()
        if span.is_recording():
            self._describe(span, ctx)
        span.end(end_time=_ns(self._anchor_ns, self._anchor, ended))

    def _describe(self, span: Span, ctx: RequestContext) -> None:
        attrs: dict[str, AttributeValue] = {
            "http.response.status_code": ctx.status,
            "sluice.team": ctx.identity.team,
            "sluice.stream": ctx.stream,
            "sluice.retries": ctx.retries,
            "sluice.outcome": ctx.outcome.value if ctx.outcome is not None else "error",
        }
        if ctx.model:
            attrs["gen_ai.request.model"] = ctx.model[:_MAX_MODEL]
        if ctx.route is not None:
            attrs["sluice.route"] = ctx.route.name
            span.update_name(f"{operation_name(ctx)} {ctx.route.name}")
        if ctx.upstream_name is not None:
            attrs.update(self._tracing.upstreams.get(ctx.upstream_name, {}))
            attrs.pop("server.address", None)
            attrs.pop("server.port", None)
        if ctx.response_model:
            attrs["gen_ai.response.model"] = ctx.response_model
        span.set_attributes(attrs)
        _usage(span, ctx)
        if self._tracing.capture_content:
            prompt = ctx.body.get("messages", ctx.body.get("prompt", ctx.body.get("input")))
            if prompt is not None:
                span.set_attribute("gen_ai.input.messages", _text(prompt))
        ttft = time_to_first_token(ctx)
        if ttft is not None:
            span.add_event(
                "gen_ai.first_token",
                {"gen_ai.server.time_to_first_token": ttft},
                timestamp=_ns(self._anchor_ns, self._anchor, self._anchor + ttft),
            )
        if ctx.outcome is Outcome.COMPLETED:
            span.set_status(Status(StatusCode.OK))
        elif ctx.outcome is not None or ctx.error is not None:
            span.set_attribute("error.type", _error_type(ctx, ctx.error))
            if ctx.outcome in _FAILED or ctx.status >= 500:
                span.set_status(Status(StatusCode.ERROR, _description(ctx, ctx.error)))


def _usage(span: Span, ctx: RequestContext) -> None:
    usage = ctx.usage
    if usage.prompt_tokens is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
    if usage.completion_tokens is not None:
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)


def _error_type(ctx: RequestContext, error: GatewayError | None) -> str:
    """A short, bounded error kind: the error's code, else the outcome (never a message)."""
    if error is not None and error.code:
        return str(error.code)[:100]
    return ctx.outcome.value if ctx.outcome is not None else "error"


def _description(ctx: RequestContext, error: GatewayError | None) -> str:
    status = error.status if error is not None else ctx.status
    return f"{status} {_error_type(ctx, error)}"


def _text(value: Any) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT]
