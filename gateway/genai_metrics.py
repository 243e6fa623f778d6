"""Histograms under the OpenTelemetry GenAI semantic-convention names (`metrics.genai_semconv`).

The names and labels are the ones Envoy AI Gateway exposes to Prometheus, so dashboards
built for the conventions work unchanged: `gen_ai_client_token_usage`,
`gen_ai_server_request_duration_seconds`, `gen_ai_server_time_to_first_token_seconds` and
`gen_ai_server_time_per_output_token_seconds`, with `gen_ai_operation_name`,
`gen_ai_provider_name`, `gen_ai_request_model`, `gen_ai_response_model` and `error_type`
(empty on success); token usage adds `gen_ai_token_type` (input, output). Buckets are the
conventions' advice. Filled once per request that reached an upstream, from its context.

Labels stay bounded: the request model is the route's name, the response model the
configured deployment model (both "other" outside the configuration), the provider comes
from the upstream's kind and `error_type` is the outcome.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Histogram

from gateway.config import GatewayConfig
from gateway.context import Outcome, RequestContext
from gateway.genai import PROVIDER_NAMES, operation_name, time_per_output_token, time_to_first_token

OTHER: Final = "other"
TOKEN_BUCKETS: Final = tuple(4.0**i for i in range(14))  # 1 .. 67,108,864
DURATION_BUCKETS: Final = tuple(0.01 * 2.0**i for i in range(14))  # 0.01 .. 81.92 s
TTFT_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
TPOT_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
LABELS: Final = [
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "error_type",
]


def _deployment_models(config: GatewayConfig) -> frozenset[str]:
    """Every model name a deployment can be sent (a route without one sends the client's)."""
    names: set[str] = set()
    for route in config.routes:
        for deployment in route.all_deployments:
            if deployment.upstream_model is not None:
                names.add(deployment.upstream_model)
            elif route.model is not None:
                names.update([route.model, *route.aliases])
    return frozenset(names)


class GenAIMetrics:
    """The four convention histograms, in the gateway's registry."""

    def __init__(self, registry: CollectorRegistry, config: GatewayConfig) -> None:
        self._routes = frozenset(route.name for route in config.routes)
        self._models = _deployment_models(config)
        self._providers = {
            name: PROVIDER_NAMES.get(upstream.kind, upstream.kind)
            for name, upstream in config.upstreams.items()
        }
        self.tokens = Histogram(
            "gen_ai_client_token_usage",
            "GenAI semantic conventions: tokens per request, by gen_ai_token_type.",
            [*LABELS, "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "GenAI semantic conventions: request received to its end.",
            LABELS,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "GenAI semantic conventions: streams, request received to the first token sent.",
            LABELS,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "GenAI semantic conventions: streams, mean time per output token after the first.",
            LABELS,
            buckets=TPOT_BUCKETS,
            registry=registry,
        )

    def observe(self, ctx: RequestContext) -> None:
        """One finished request (nothing for one that never reached an upstream)."""
        provider = self._providers.get(ctx.upstream_name or "")
        if provider is None:
            return
        route = ctx.route.name if ctx.route is not None else OTHER
        model = ctx.upstream_model
        labels = (
            operation_name(ctx),
            provider,
            route if route in self._routes else OTHER,
            model if model in self._models else OTHER,
            "" if ctx.outcome is Outcome.COMPLETED else (ctx.outcome or Outcome.ERROR).value,
        )
        timing, usage = ctx.timing, ctx.usage
        if timing.ended is not None:
            self.duration.labels(*labels).observe(timing.ended - timing.received)
        if usage.prompt_tokens is not None:
            self.tokens.labels(*labels, "input").observe(usage.prompt_tokens)
        if usage.completion_tokens is not None:
            self.tokens.labels(*labels, "output").observe(usage.completion_tokens)
        if (ttft := time_to_first_token(ctx)) is not None:
            self.ttft.labels(*labels).observe(ttft)
        if (tpot := time_per_output_token(ctx)) is not None:
            self.tpot.labels(*labels).observe(tpot)
