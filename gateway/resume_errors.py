"""The errors of resumable streams, shared by the in-process and the Redis-backed resumer."""

from __future__ import annotations

from gateway.errors import GatewayError
from gateway.sse import SSEEvent

__all__ = ["abandoned", "error_event", "expired", "not_found"]


def not_found() -> GatewayError:
    """The same answer for an unknown stream and for another key's stream."""
    return GatewayError(
        404,
        "No resumable stream with this id (it ended long ago, or never existed).",
        code="stream_not_found",
    )


def abandoned() -> GatewayError:
    return GatewayError(
        410,
        "Nobody came back for this stream within the grace period, so its generation was "
        "cancelled; send the request again.",
        code="stream_abandoned",
    )


def expired() -> GatewayError:
    return GatewayError(
        410,
        "The events after this id are no longer kept (grace period or size bound passed); "
        "send the request again.",
        code="resume_point_expired",
    )


def error_event(err: GatewayError) -> bytes:
    """A final SSE error event, as after headers everywhere else."""
    return SSEEvent.from_json(err.body()).encode()
