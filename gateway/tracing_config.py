"""The `tracing` config block and how it combines with the standard `OTEL_*` variables.

No OpenTelemetry import here: this module decides *whether* tracing is on, and with what,
so a gateway with tracing off never loads the SDK (see `gateway.tracing`, imported only
when it is on). Each setting set through its `OTEL_*` environment variable wins over the
config block, which wins over the SDK's defaults (docs/tracing.md).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from gateway.context import StateKey

if TYPE_CHECKING:
    from gateway.tracing import RequestTrace

TRACE: StateKey[RequestTrace] = StateKey("tracing")
"""The request's spans, set when tracing is on (`gateway.tracing.Tracing.start`)."""


class ConfigProblem(ValueError):
    """Tracing is asked for in a way that cannot work; the message says what to change."""


class TracingConfig(BaseModel):
    """OpenTelemetry traces over OTLP/HTTP (the `otel` extra); off unless switched on here or
    by OTEL_TRACES_EXPORTER=otlp."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        False, description="trace every request (OTEL_TRACES_EXPORTER, when set, wins)"
    )
    endpoint: str | None = Field(
        None,
        pattern=r"^https?://[^\s/]+",
        description="OTLP/HTTP collector base URL, e.g. http://otel-collector:4318 "
        "(/v1/traces is appended); OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT wins",
    )
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="sent with every export; OTEL_EXPORTER_OTLP_HEADERS wins"
    )
    service_name: str = Field("sluice", min_length=1, description="OTEL_SERVICE_NAME wins")
    sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of new traces recorded (a client's sampled flag is followed); "
        "OTEL_TRACES_SAMPLER wins",
    )
    capture_content: bool = Field(
        False,
        description="record prompts (and non-streamed answers) on the span: off, as prompts "
        "may hold personal data",
    )


_EXPORTER = "OTEL_TRACES_EXPORTER"
_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_HEADERS = ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """What `gateway.tracing` builds from: None for a setting means "the SDK reads its
    OTEL_* variable itself"."""

    endpoint: str | None  # the full traces URL (…/v1/traces)
    headers: Mapping[str, str] | None
    service_name: str | None
    sample_ratio: float | None
    capture_content: bool


def _set(env: Mapping[str, str], *names: str) -> bool:
    return any(env.get(name, "").strip() for name in names)


def _switched_on(config: TracingConfig, env: Mapping[str, str]) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get(_EXPORTER, "").strip().lower()
    if not exporter:
        return config.enabled
    names = {name.strip() for name in exporter.split(",") if name.strip()}
    if names <= {"none"}:
        return False
    if names != {"otlp"}:
        raise ConfigProblem(
            f"{_EXPORTER}={exporter}: Sluice exports traces over OTLP only (otlp or none)"
        )
    return True


def resolve_tracing(config: TracingConfig, env: Mapping[str, str]) -> TracingSettings | None:
    """The settings to trace with, or None when tracing is off; raises ConfigProblem."""
    if not _switched_on(config, env):
        return None
    for name in _PROTOCOLS:
        protocol = env.get(name, "").strip()
        if protocol and protocol != "http/protobuf":
            raise ConfigProblem(f"{name}={protocol}: only http/protobuf is supported")
    if importlib.util.find_spec("opentelemetry.sdk") is None or (
        importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None
    ):
        raise ConfigProblem(
            "tracing is on but OpenTelemetry is not installed: pip install 'sluice[otel]'"
        )
    endpoint = None
    if config.endpoint is not None and not _set(env, *_ENDPOINTS):
        endpoint = config.endpoint.rstrip("/") + "/v1/traces"
    headers = None
    if config.headers and not _set(env, *_HEADERS):
        headers = {name: value.get_secret_value() for name, value in config.headers.items()}
    named = _set(env, "OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    return TracingSettings(
        endpoint=endpoint,
        headers=headers,
        service_name=None if named else config.service_name,
        sample_ratio=None if _set(env, "OTEL_TRACES_SAMPLER") else config.sample_ratio,
        capture_content=config.capture_content,
    )
