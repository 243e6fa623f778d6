"""The `upstreams:` section of the config: one typed model per upstream kind."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from gateway.headers import REQUEST_ID_HEADER, gateway_owned


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Per-upstream timeouts in seconds; each ends the request with a clear error."""

    connect: float = Field(10.0, gt=0, description="TCP/TLS connect")
    first_byte: float = Field(120.0, gt=0, description="request sent to first event")
    idle: float = Field(60.0, gt=0, description="longest gap between two events")
    total: float = Field(1800.0, gt=0, description="whole request")


_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")


class _UpstreamBase(_Strict):
    """Settings every upstream kind has: timeouts, concurrency protection, passive health."""

    timeouts: Timeouts = Timeouts()
    max_concurrent: int | None = Field(
        None, ge=1, description="streams at once; more wait in a queue (protects a GPU backend)"
    )
    max_queue: int = Field(100, ge=0, description="waiting requests before 429")
    queue_timeout: float = Field(30.0, gt=0, description="longest wait in the queue before 503")
    failure_threshold: int = Field(
        5, ge=1, description="consecutive failed requests (not attempts) that eject the upstream"
    )
    cooldown_seconds: float = Field(30.0, gt=0, description="how long an ejection lasts")
    request_id_header: str | None = Field(
        REQUEST_ID_HEADER,
        description="header that carries the request id upstream, as a UUID (null or '': none)",
    )

    @field_validator("request_id_header")
    @classmethod
    def _check_request_id_header(cls, name: str | None) -> str | None:
        if not name:
            return None
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a header name")
        if gateway_owned(name):
            raise ValueError(f"{name!r} is a header the gateway sets or drops itself")
        return name


class OpenAIUpstream(_UpstreamBase):
    """Any OpenAI-compatible server: OpenAI, vLLM, llama.cpp, TGI, Ollama /v1, LM Studio."""

    kind: Literal["openai"]
    base_url: str = Field(pattern=r"^https?://[^\s/]+", description="e.g. http://127.0.0.1:8000/v1")
    api_key: SecretStr | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    timeouts: Timeouts = Timeouts()
    max_connections: int = Field(
        4096, ge=1, description="pooled connections to this upstream (one per open stream)"
    )
    verify_tls: bool = True
    ca_bundle: Path | None = None
    include_usage: bool = Field(
        True,
        description="ask for stream_options.include_usage (turn off for servers that reject it)",
    )
    continuation: Literal["none", "vllm"] = Field(
        "none",
        description="how a healed stream asks this server to continue a final assistant "
        "message: vllm (continue_final_message); none (OpenAI's API cannot)",
    )
    responses_api: Literal["native", "translate"] | None = Field(
        None,
        description="POST /v1/responses: native (sent to <base_url>/responses) or translate "
        "(to chat completions); default native for api.openai.com, translate otherwise",
    )


class DemoUpstream(_UpstreamBase):
    """The embedded simulated model: streams a canned answer with realistic pacing."""

    kind: Literal["demo"]
    ttft_ms: float = Field(250.0, ge=0, description="time to first token")
    itl_ms: float = Field(30.0, ge=0, description="inter-token latency")
    max_tokens: int = Field(200, ge=1, description="answer length cap")
    timeouts: Timeouts = Timeouts()


DEFAULT_AZURE_API_VERSION: Final = "2024-10-21"  # the latest GA data-plane version
AZURE_RESPONSES_API_VERSION: Final = "2025-03-01-preview"  # the first with /openai/responses

_AZURE_DEPLOYMENT_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")


def azure_deployment_problem(name: object) -> str | None:
    """Why ``name`` cannot be a deployment path segment, or None if it can."""
    if not isinstance(name, str) or not _AZURE_DEPLOYMENT_RE.fullmatch(name):
        return "it must be 1 to 64 characters among A-Z a-z 0-9 . _ -"
    if not name.strip("."):
        return "'.' and '..' are path segments, not names"
    return None


class AzureUpstream(_UpstreamBase):
    """An Azure OpenAI resource (``kind: azure``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["azure"]
    endpoint: str = Field(
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="e.g. https://my-resource.openai.azure.com (https outside tests)",
    )
    api_version: str = Field(
        DEFAULT_AZURE_API_VERSION,
        pattern=r"^\d{4}-\d{2}-\d{2}(-preview)?$",
        description="the api-version query parameter (not sent on the v1 surface)",
    )
    api_key: SecretStr | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    deployment: str | None = Field(
        None, description="one deployment for every route (default: the route's upstream_model)"
    )
    deployments: dict[str, str] = Field(
        default_factory=dict, description="upstream_model -> deployment name, checked first"
    )
    use_v1_api: bool = Field(False, description="use the /openai/v1/ surface")
    include_usage: bool = Field(
        True, description="ask for stream_options.include_usage (needs api-version 2024-09-01+)"
    )
    responses_api: Literal["native", "translate"] | None = Field(
        None,
        description="POST /v1/responses: native (Azure's /openai/responses) or translate (to "
        "chat completions); default native with use_v1_api or api_version 2025-03-01+",
    )
    timeouts: Timeouts = Timeouts()
    max_connections: int = Field(256, ge=1)
    verify_tls: bool = True
    ca_bundle: Path | None = None

    @model_validator(mode="after")
    def _check_deployments(self) -> AzureUpstream:
        named = {"deployment": self.deployment} if self.deployment is not None else {}
        named.update({f"deployments.{k}": v for k, v in self.deployments.items()})
        for where, name in named.items():
            problem = azure_deployment_problem(name)
            if problem is not None:
                raise ValueError(f"{where}: invalid Azure deployment name {name!r}: {problem}")
        if self.responses_api == "native" and not self.serves_responses:
            raise ValueError(
                "responses_api: native needs use_v1_api: true or an api_version of "
                f"{AZURE_RESPONSES_API_VERSION} or later (got {self.api_version})"
            )
        return self

    @property
    def serves_responses(self) -> bool:
        """Whether this resource's configured surface has the Responses API."""
        return self.use_v1_api or self.api_version[:10] >= AZURE_RESPONSES_API_VERSION[:10]


class AnthropicUpstream(_UpstreamBase):
    """Anthropic's Messages API (`x-api-key`, `anthropic-version`)."""

    kind: Literal["anthropic"]
    base_url: str = Field(
        "https://api.anthropic.com",
        pattern=r"^https?://[^\s/]+",
        description="where /v1/messages is found; a trailing /v1 is accepted too",
    )
    api_key: SecretStr | None = None
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = Field(
        4096, ge=1, description="sent when an OpenAI-format client gives no max_tokens"
    )
    headers: dict[str, str] = Field(default_factory=dict)
    timeouts: Timeouts = Timeouts()
    max_connections: int = Field(4096, ge=1)
    verify_tls: bool = True
    ca_bundle: Path | None = None


class OllamaUpstream(_UpstreamBase):
    """Ollama's native API (`/api/chat`, `/api/generate`, NDJSON streaming)."""

    kind: Literal["ollama"]
    base_url: str = Field("http://127.0.0.1:11434", pattern=r"^https?://[^\s/]+")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Ollama options set by the operator (num_ctx, num_gpu, ...), not by clients",
    )
    headers: dict[str, str] = Field(default_factory=dict)
    timeouts: Timeouts = Timeouts()
    max_connections: int = Field(4096, ge=1)
    verify_tls: bool = True
    ca_bundle: Path | None = None


UPSTREAM_KINDS = ("openai", "azure", "anthropic", "ollama", "demo")
HttpUpstreamConfig = OpenAIUpstream | AzureUpstream | AnthropicUpstream | OllamaUpstream
UpstreamConfig = Annotated[
    OpenAIUpstream | AzureUpstream | AnthropicUpstream | OllamaUpstream | DemoUpstream,
    Field(discriminator="kind"),
]
