"""What every upstream adapter provides: open a call, read it, recognise its events."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import ServerConfig, Timeouts
from gateway.context import Endpoint, RequestContext
from gateway.errors import GatewayError
from gateway.headers import REQUEST_ID_HEADER
from gateway.sse import SSEEvent
from gateway.upstreams.errors import error_from_upstream


class UpstreamBroken(Exception):
    """The upstream connection or its HTTP framing failed.

    `reason` says what broke in words for the client ("the upstream reset the
    connection"); `cause` names the underlying exception class, for the log only.
    """

    def __init__(self, reason: str, cause: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


class UpstreamCall(abc.ABC):
    """One in-flight request to an upstream, after its response headers arrived."""

    status: int
    headers: Mapping[str, str]

    @abc.abstractmethod
    async def read_chunk(self) -> bytes:
        """The next body bytes as they arrive; b"" at the end. Safe to cancel.

        Raises UpstreamBroken when the connection or the body's framing fails.
        """

    async def read_body(self, limit: int) -> bytes:
        """The whole body, failing with a 502 past `limit` bytes."""
        parts: list[bytes] = []
        size = 0
        while chunk := await self.read_chunk():
            size += len(chunk)
            if size > limit:
                raise GatewayError(
                    502,
                    f"The upstream response exceeded {limit} bytes.",
                    type="upstream_error",
                    code="upstream_response_too_large",
                )
            parts.append(chunk)
        return b"".join(parts)

    @abc.abstractmethod
    def abort(self) -> None:
        """Close the upstream connection now (client gone, timeout, error). Idempotent."""

    @abc.abstractmethod
    def release(self) -> None:
        """Return a fully read connection to the pool. Idempotent."""


@dataclass(slots=True)
class Batch:
    """Upstream events sorted for the client: what to pass on, and how the batch ended."""

    events: list[SSEEvent]
    terminal: SSEEvent | None = None
    error: GatewayError | None = None
    has_data: bool = False


@dataclass(frozen=True, slots=True)
class Continuation:
    """A request asking an upstream to continue an answer it began (stream healing).

    `withheld`: trailing text of the answer the upstream was not sent (Anthropic refuses a
    prefill ending in whitespace); the continuation's repeat of it is dropped.
    """

    body: dict[str, Any]
    withheld: str = ""


def with_assistant_prefix(body: dict[str, Any], text: str, **extra: Any) -> dict[str, Any]:
    """`body` with `text` as a trailing assistant message (plus `extra` keys)."""
    messages = [*body.get("messages", ()), {"role": "assistant", "content": text}]
    return {**body, "messages": messages, **extra}


class StreamObserver(abc.ABC):
    """Per-request view of an upstream's SSE stream, in the client's wire format.

    Recognises the terminal event, in-band errors, and usage; one instance per request.
    """

    done: bool = False

    @abc.abstractmethod
    def observe(self, ctx: RequestContext, event: SSEEvent) -> GatewayError | None:
        """Look at one upstream data event; return an error if the event is an in-band error.

        Sets `done` when the event is the terminal one; records usage into `ctx.usage`.
        """

    def classify(self, ctx: RequestContext, events: list[SSEEvent]) -> Batch:
        """Observe a decoded batch in order; stop at its terminal event or in-band error."""
        batch = Batch([])
        for event in events:
            if event.data_bytes is None:
                batch.events.append(event)
                continue
            batch.has_data = True
            error = self.observe(ctx, event)
            if error is not None:
                batch.error = error
                break
            if self.done:
                batch.terminal = event
                break
            batch.events.append(event)
        return batch

    def finish(self, ctx: RequestContext) -> None:  # noqa: B027 - optional hook
        """The stream ended, however it ended: record what is only known at the end."""

    def usage_event(self, ctx: RequestContext) -> SSEEvent | None:
        """A usage event to send before the terminal one, if the client asked for usage the
        upstream did not send (see `gateway.local_usage`); None by default."""
        return None

    @abc.abstractmethod
    def error_event(self, err: GatewayError) -> SSEEvent:
        """The final event that reports `err` to the client after streaming started."""

    @abc.abstractmethod
    def terminal_event(self) -> SSEEvent | None:
        """The event that ends a stream the gateway cut short normally (e.g. `[DONE]`)."""


class StreamDecoder(Protocol):
    """Upstream body bytes in, client-format SSE events out (SSEDecoder is one)."""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events completed by `chunk`; raises SSEError past a limit or on garbage."""
        ...

    def flush(self) -> list[SSEEvent]:
        """End of body: events completed by it (e.g. a last NDJSON line without newline)."""
        ...

    @property
    def has_pending(self) -> bool:
        """True if bytes of an unfinished event are held (a truncated stream)."""
        ...


class Upstream(abc.ABC):
    """An adapter for one configured upstream; shared by every request routed to it."""

    json_streams = False
    """True if this upstream streams JSON lines, so that a JSON Content-Type on a streaming
    answer is no sign of an answer that is not a stream."""

    def __init__(
        self, name: str, timeouts: Timeouts, request_id_header: str | None = REQUEST_ID_HEADER
    ) -> None:
        self.name = name
        self.timeouts = timeouts
        self.request_id_header = request_id_header  # None: send no request id

    async def start(self) -> None:  # noqa: B027 - optional lifecycle hook
        """Create pools and sessions (called once, at app start-up)."""

    async def close(self) -> None:  # noqa: B027 - optional lifecycle hook
        """Release pools and sessions (called once, at shutdown)."""

    @abc.abstractmethod
    async def open(
        self,
        ctx: RequestContext,
        body: dict[str, Any],
        headers: Mapping[str, str],
    ) -> UpstreamCall:
        """Send the request; return once the upstream's response headers are in.

        Raises GatewayError for connection failures (502), UpstreamBroken when the
        connection or the response's framing broke, and TimeoutError past `connect`.
        """

    @abc.abstractmethod
    def stream_parts(
        self, ctx: RequestContext, server: ServerConfig
    ) -> tuple[StreamDecoder, StreamObserver]:
        """A fresh decoder and observer for one streaming request."""

    def translate_response(self, ctx: RequestContext, payload: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming upstream body in OpenAI's shape (identity for OpenAI upstreams)."""
        return payload

    def map_status_error(self, status: int, body: bytes) -> GatewayError:
        """Turn an upstream error response into the client's error (message sanitised)."""
        return error_from_upstream(status, body)

    def supports(self, endpoint: Endpoint) -> bool:
        """Whether this upstream serves `endpoint`."""
        return True

    def continuation(self, body: dict[str, Any], text: str) -> Continuation | None:
        """`body` (as sent to this upstream) asking it to continue an answer that starts with
        `text`, or None if this upstream cannot continue a final assistant message."""
        return None

    def native(self, wire: str) -> Upstream | None:
        """This upstream speaking `wire` (a `gateway.protocols` name) natively, or None if
        it only takes the core's OpenAI format (translating it itself)."""
        return None
