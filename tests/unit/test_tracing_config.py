"""How the `tracing` block and the OTEL_* variables decide whether and how to trace."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.tracing_config import ConfigProblem, TracingConfig, resolve_tracing


def _tracing(**values: Any) -> TracingConfig:
    return TracingConfig.model_validate(values)


def test_off_by_default() -> None:
    assert resolve_tracing(TracingConfig(), {}) is None


def test_config_block_alone() -> None:
    settings = resolve_tracing(
        _tracing(enabled=True, endpoint="http://collector:4318/", sample_ratio=0.25), {}
    )
    assert settings is not None
    assert settings.endpoint == "http://collector:4318/v1/traces"
    assert settings.service_name == "sluice"
    assert settings.sample_ratio == 0.25
    assert settings.capture_content is False


def test_otel_variables_win_over_the_block() -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-token=abc",
        "OTEL_SERVICE_NAME": "edge",
        "OTEL_TRACES_SAMPLER": "always_off",
    }
    block = _tracing(endpoint="http://file:4318", headers={"x-token": "f"}, service_name="f")
    settings = resolve_tracing(block, env)  # `enabled: false`, but the exporter is set
    assert settings is not None
    # None: the SDK reads the variable itself.
    assert settings.endpoint is None
    assert settings.headers is None
    assert settings.service_name is None
    assert settings.sample_ratio is None


@pytest.mark.parametrize(
    "env",
    [{"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_SDK_DISABLED": "true"}],
)
def test_variables_switch_it_off(env: dict[str, str]) -> None:
    assert resolve_tracing(_tracing(enabled=True), env) is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER=zipkin"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL=grpc",
        ),
    ],
)
def test_unsupported_exporters_are_refused(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigProblem, match=named):
        resolve_tracing(TracingConfig(), env)


def test_block_keys_are_checked() -> None:
    base = {"upstreams": {"u": {"kind": "demo"}}, "routes": [{"model": "m", "upstream": "u"}]}
    with pytest.raises(ConfigError, match=r"tracing\.sample_rate: unknown key"):
        parse_config({**base, "tracing": {"sample_rate": 0.5}}, {})
    with pytest.raises(ConfigError, match=r"tracing\.sample_ratio"):
        parse_config({**base, "tracing": {"sample_ratio": 2}}, {})
