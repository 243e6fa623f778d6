"""A real OTLP/HTTP trace receiver on loopback: POST /v1/traces, protobuf bodies decoded with
the OpenTelemetry protocol's own generated classes (what a collector accepts)."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def attributes(items: Iterable[KeyValue]) -> dict[str, object]:
    """An OTLP attribute list as a plain dict (str, int, float, bool values)."""
    out: dict[str, object] = {}
    for item in items:
        out[item.key] = _value(item.value)
    return out


def _value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


@dataclass
class ReceivedSpan:
    """One exported span with its resource's attributes."""

    span: Span
    resource: dict[str, object]

    @property
    def attrs(self) -> dict[str, object]:
        """The span's attributes."""
        return attributes(self.span.attributes)


class OtlpReceiver:
    """Collects every exported span; `raw` keeps the request bodies as sent."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.raw: list[bytes] = []
        self.content_types: list[str] = []
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL for OTEL_EXPORTER_OTLP_ENDPOINT / tracing.endpoint."""
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        async with self._changed:
            self.raw.append(body)
            self.content_types.append(request.headers.get("Content-Type", ""))
            for resource_spans in message.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(ReceivedSpan(span, resource))
            self._changed.notify_all()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def wait_spans(self, count: int, within: float = 20.0) -> list[ReceivedSpan]:
        """Block until at least `count` spans arrived (TimeoutError after `within` s)."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(self.spans) >= count)
        return list(self.spans)
