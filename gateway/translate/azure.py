"""Azure OpenAI (upstream kind ``azure``): configuration, URLs and headers.

Azure speaks OpenAI's wire format; only the request shaping differs:

- the deployment is in the path, ``{endpoint}/openai/deployments/{deployment}/chat/completions
  ?api-version=…`` (``/completions``, ``/embeddings`` alike), or, on the newer v1 surface,
  ``{endpoint}/openai/v1/chat/completions`` with the deployment as the body's ``model``;
- the key goes in an ``api-key`` header, not ``Authorization: Bearer`` (Entra ID tokens can
  be set as a static ``Authorization`` entry in ``headers``).

Streaming quirks, all of them accepted by the official SDK's stream parser and by
:class:`gateway.upstreams.openai.OpenAIObserver` (the tests check this), so events pass
through verbatim:

- the first chunk has ``"choices": []`` and ``prompt_filter_results`` (the prompt's content
  filter verdicts), with ``"id": ""``, ``"model": ""``, ``"object": ""`` and ``"created": 0``
  (so it fails *strict* validation as a ``ChatCompletionChunk``; the SDK never validates
  stream chunks, but a plugin or client that does must skip it);
- later chunks carry ``content_filter_results`` inside each choice, and with asynchronous
  filtering a trailing chunk after the finish chunk holds only ``content_filter_results``
  and ``content_filter_offsets`` (empty delta, ``finish_reason`` null);
- filtered output ends with ``finish_reason: "content_filter"``; a filtered prompt is an HTTP
  400 whose ``error.code`` is ``content_filter`` (kept by ``error_from_upstream``).

Plugins must therefore not assume ``choices[0]`` exists or that the first chunk has a role.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import quote, urlencode

from gateway.config import DEFAULT_AZURE_API_VERSION as DEFAULT_API_VERSION
from gateway.config import AzureUpstream, azure_deployment_problem
from gateway.context import Endpoint
from gateway.errors import GatewayError

__all__ = [
    "DEFAULT_API_VERSION",
    "AzureUpstream",
    "azure_headers",
    "azure_request_body",
    "azure_url",
    "resolve_deployment",
    "validate_deployment",
]

_PATHS: Final = {
    "/chat/completions": "/chat/completions",
    "/completions": "/completions",
    "/embeddings": "/embeddings",
    Endpoint.CHAT.value: "/chat/completions",
    Endpoint.COMPLETIONS.value: "/completions",
    Endpoint.EMBEDDINGS.value: "/embeddings",
}


def validate_deployment(name: str) -> str:
    """``name`` if it is safe as one URL path segment; else GatewayError 400 (param model).

    A name with ``/``, ``?``, ``#``, ``%``, spaces, or one made only of dots could change
    which Azure path is called, so it is refused rather than escaped.
    """
    problem = azure_deployment_problem(name)
    if problem is not None:
        shown = repr(name[:80]) if isinstance(name, str) else "(not a string)"
        raise GatewayError(
            400,
            f"Invalid Azure deployment name {shown}: {problem}.",
            param="model",
            code="invalid_deployment",
        )
    return name


def resolve_deployment(config: AzureUpstream, upstream_model: str) -> str:
    """The deployment serving ``upstream_model``: the map, else ``deployment``, else itself."""
    name = config.deployments.get(upstream_model) or config.deployment or upstream_model
    return validate_deployment(name)


def azure_url(config: AzureUpstream, endpoint_path: str, deployment: str) -> str:
    """The URL for one call; ``endpoint_path`` is "/chat/completions", "/completions" or
    "/embeddings" (an :class:`Endpoint` works too).

    Raises GatewayError 400 for an unsafe deployment, ValueError for another path.
    """
    path = _PATHS.get(endpoint_path)
    if path is None:
        raise ValueError(f"unsupported Azure OpenAI endpoint path: {endpoint_path!r}")
    name = validate_deployment(deployment)
    base = config.endpoint.rstrip("/")
    if config.use_v1_api:
        return f"{base}/openai/v1{path}"
    query = urlencode({"api-version": config.api_version})
    return f"{base}/openai/deployments/{quote(name, safe='')}{path}?{query}"


def azure_headers(config: AzureUpstream) -> dict[str, str]:
    """Static headers for every call: configured ``headers`` plus ``api-key`` if set."""
    out = dict(config.headers)
    if config.api_key is not None and config.api_key.get_secret_value():
        out["api-key"] = config.api_key.get_secret_value()
    return out


def azure_request_body(body: dict[str, Any], deployment: str) -> dict[str, Any]:
    """The body to send: ``model`` names the deployment.

    Required on the v1 surface (the deployment is not in the path there); harmless on the
    deployments surface, which ignores ``model``.
    """
    return {**body, "model": validate_deployment(deployment)}
