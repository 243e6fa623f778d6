"""OpenTelemetry GenAI semantic-convention values, shared by tracing and the GenAI metrics.

Nothing here imports OpenTelemetry: these are the conventions' attribute values
(`gen_ai.operation.name`, `gen_ai.provider.name`) and the two latency figures both signals
report, read from a finished request's context.
"""

from __future__ import annotations

from typing import Final

from gateway.context import STREAM_LATENCY, Endpoint, RequestContext

OPERATION_NAMES: Final = {
    Endpoint.CHAT: "chat",
    Endpoint.COMPLETIONS: "text_completion",
    Endpoint.EMBEDDINGS: "embeddings",
}
# Upstream kind -> gen_ai.provider.name (the conventions' well-known values where one exists).
PROVIDER_NAMES: Final = {
    "openai": "openai",
    "azure": "azure.ai.openai",
    "anthropic": "anthropic",
    "ollama": "ollama",
    "demo": "sluice.demo",
}


def operation_name(ctx: RequestContext) -> str:
    """`gen_ai.operation.name` of the request."""
    return OPERATION_NAMES[ctx.endpoint]


def time_to_first_token(ctx: RequestContext) -> float | None:
    """Seconds from arrival to the first generated text leaving (streams only).

    The latency plugin's figure when it ran (first event carrying text), else the first
    event written.
    """
    if not ctx.stream:
        return None
    latency = ctx.get(STREAM_LATENCY)
    if latency is not None:
        return latency.ttft
    first = ctx.timing.first_event_written
    return None if first is None else first - ctx.timing.received


def time_per_output_token(ctx: RequestContext) -> float | None:
    """Mean seconds per output token after the first (streams with two tokens or more).

    The latency plugin's figure when it ran, else first to last event written over the
    upstream's completion tokens.
    """
    if not ctx.stream:
        return None
    latency = ctx.get(STREAM_LATENCY)
    if latency is not None:
        return latency.time_per_output_token
    timing, tokens = ctx.timing, ctx.usage.completion_tokens
    first, last = timing.first_event_written, timing.last_event_written
    if first is None or last is None or tokens is None or tokens < 2:
        return None
    return (last - first) / (tokens - 1)
