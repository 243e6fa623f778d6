"""Upstream kind `azure`: Azure OpenAI, OpenAI's wire format behind deployment URLs."""

from __future__ import annotations

from typing import Any

from gateway.config import AzureUpstream, OpenAIUpstream
from gateway.context import RequestContext
from gateway.protocols.responses.upstream import azure_responses, speaks_responses
from gateway.translate.azure import azure_headers, azure_request_body, azure_url, resolve_deployment
from gateway.upstreams.openai import OpenAICompatible


class AzureOpenAI(OpenAICompatible):
    """Adapter for `kind: azure`: `api-key` header, deployment in the path, `api-version`."""

    def __init__(self, name: str, config: AzureUpstream) -> None:
        as_openai = OpenAIUpstream(
            kind="openai",
            base_url=config.endpoint,
            headers=azure_headers(config),
            timeouts=config.timeouts,
            max_connections=config.max_connections,
            verify_tls=config.verify_tls,
            ca_bundle=config.ca_bundle,
            include_usage=config.include_usage,
            request_id_header=config.request_id_header,
        )
        super().__init__(name, as_openai)
        self.azure = config
        self._responses = (
            azure_responses(self, config, lambda model: resolve_deployment(config, model))
            if speaks_responses(config)
            else None
        )

    def url(self, ctx: RequestContext, body: dict[str, Any]) -> str:
        deployment = resolve_deployment(self.azure, body["model"])
        return azure_url(self.azure, ctx.endpoint.value, deployment)

    def shape(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        deployment = resolve_deployment(self.azure, body["model"])
        return super().shape(ctx, azure_request_body(body, deployment))
