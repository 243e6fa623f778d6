"""An OpenAI or Azure OpenAI upstream spoken natively on the Responses API.

`NativeResponses` is the view of a `kind: openai` / `kind: azure` adapter that the native
Responses lane uses per attempt: same pool, credentials, timeouts and name (health,
metrics); the client's body (model replaced, every other field kept) to the upstream's
``/responses``, its answer as it sent it. Which upstreams get one is `responses_api`
(`speaks_responses`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from gateway.config import AzureUpstream, OpenAIUpstream, ServerConfig
from gateway.context import Endpoint, RequestContext
from gateway.errors import GatewayError
from gateway.protocols.responses.events import NativeResponsesObserver, chat_usage, error_of_event
from gateway.protocols.responses.native import remember
from gateway.sse import SSEDecoder
from gateway.upstreams.base import StreamDecoder, StreamObserver, Upstream, UpstreamCall
from gateway.upstreams.http import HttpUpstream

__all__ = ["NativeResponses", "azure_responses", "openai_responses", "speaks_responses"]


def speaks_responses(config: OpenAIUpstream | AzureUpstream) -> bool:
    """`responses_api`, or its default: native for api.openai.com and for an Azure resource
    whose configured surface has the Responses API; translate for other compatibles (vLLM,
    llama.cpp, ... may not implement ``/responses``)."""
    if config.responses_api is not None:
        return config.responses_api == "native"
    if isinstance(config, AzureUpstream):
        return config.serves_responses
    return urlsplit(config.base_url).hostname == "api.openai.com"


class NativeResponses(Upstream):
    """``POST <url>`` with the client's Responses body and headers (``OpenAI-Beta`` and
    the like kept, the configured key instead of the client's); ``GET`` / ``DELETE`` of a
    stored Response at `item_url(id)`."""

    def __init__(
        self,
        adapter: HttpUpstream,
        root: str,
        query: Mapping[str, str] | None = None,
        model: Callable[[str], str] | None = None,
    ) -> None:
        super().__init__(adapter.name, adapter.timeouts, adapter.request_id_header)
        self._adapter = adapter
        self._root = root
        self._query = dict(query or {})
        self._url = self._with_query(root, {})
        self._model = model

    def _with_query(self, url: str, params: Mapping[str, str]) -> str:
        merged = {**params, **self._query}
        return f"{url}?{urlencode(merged)}" if merged else url

    def supports(self, endpoint: Endpoint) -> bool:
        return endpoint is Endpoint.CHAT

    async def open(
        self, ctx: RequestContext, body: dict[str, Any], headers: Mapping[str, str]
    ) -> UpstreamCall:
        if self._model is not None:
            body = {**body, "model": self._model(body["model"])}
        return await self._adapter.post(self._url, body, headers)

    async def item(
        self,
        method: str,
        response_id: str,
        headers: Mapping[str, str],
        path: str = "",
        params: Mapping[str, str] | None = None,
    ) -> UpstreamCall:
        """``GET`` or ``DELETE`` the upstream's Response `response_id` (`path`: a sub-path
        such as ``/input_items``; `params`: its query)."""
        url = f"{self._root}/{quote(response_id, safe='')}{path}"
        return await self._adapter.request(
            method, self._with_query(url, params or {}), None, headers
        )

    def stream_parts(
        self, ctx: RequestContext, server: ServerConfig
    ) -> tuple[StreamDecoder, StreamObserver]:
        decoder = SSEDecoder(
            max_line_bytes=server.max_line_bytes, max_event_bytes=server.max_event_bytes
        )
        name = self.name
        observer = NativeResponsesObserver(
            on_created=lambda response_id: remember(ctx, response_id, name),
            scrub=self._adapter.scrubbed,
        )
        return decoder, observer

    def translate_response(self, ctx: RequestContext, payload: dict[str, Any]) -> dict[str, Any]:
        """The Response unchanged; its id recorded, its usage read (a failed one raises)."""
        if payload.get("status") == "failed" or isinstance(payload.get("error"), dict):
            raise self._adapter.scrubbed(error_of_event({"response": payload}))
        response_id = payload.get("id")
        if isinstance(response_id, str) and response_id:
            remember(ctx, response_id, self.name)
        usage = chat_usage(payload.get("usage"))
        if usage is not None:
            ctx.usage.set_from_upstream(usage)
        return payload

    def map_status_error(self, status: int, body: bytes) -> GatewayError:
        return self._adapter.map_status_error(status, body)


def openai_responses(adapter: HttpUpstream, config: OpenAIUpstream) -> NativeResponses:
    """The Responses view of a `kind: openai` adapter: ``<base_url>/responses``."""
    base = config.base_url.rstrip("/")
    return NativeResponses(adapter, base + "/responses")


def azure_responses(
    adapter: HttpUpstream, config: AzureUpstream, deployment: Callable[[str], str]
) -> NativeResponses:
    """The Responses view of a `kind: azure` adapter: ``<endpoint>/openai/v1/responses``
    (`use_v1_api`) or ``<endpoint>/openai/responses?api-version=...``; the body's model is
    the deployment name (Azure's Responses API takes it there, not in the path)."""
    base = config.endpoint.rstrip("/")
    if config.use_v1_api:
        return NativeResponses(adapter, f"{base}/openai/v1/responses", model=deployment)
    query = {"api-version": config.api_version}
    return NativeResponses(adapter, f"{base}/openai/responses", query, model=deployment)
