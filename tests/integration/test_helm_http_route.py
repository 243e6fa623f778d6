"""The chart's Gateway API HTTPRoute and its startupProbe, rendered by a real `helm template`.

kubernetes-validate has no schema for the Gateway API CRDs (an HTTPRoute only warns), so
the route is checked here against the rules of gateway.networking.k8s.io/v1: the fields it
may carry, backend references to the Service, Gateway API durations with backendRequest
no longer than request.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

import pytest

from tests.integration._helm import CHART, FULLNAME, Rendered, render, run_helm, write_values

# GEP-2257 durations, as the HTTPRoute CRD validates them.
DURATION: Final = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_UNIT_SECONDS: Final = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# The fields of HTTPRouteSpec / HTTPRouteRule / HTTPBackendRef the chart may render.
SPEC_FIELDS: Final = {"parentRefs", "hostnames", "rules"}
RULE_FIELDS: Final = {"name", "matches", "filters", "backendRefs", "timeouts", "retry"}
BACKEND_FIELDS: Final = {"group", "kind", "name", "namespace", "port", "weight", "filters"}


def seconds(duration: str) -> float:
    assert DURATION.fullmatch(duration), duration
    parts = re.findall(r"([0-9]+)(h|ms|m|s)", duration)
    return sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def route(helm: str, directory: Path, values: dict[str, Any]) -> tuple[Rendered, dict[str, Any]]:
    path = write_values(directory, "route", {"httpRoute": {"enabled": True, **values}})
    rendered = render(helm, [path])
    return rendered, rendered.get("HTTPRoute")


def check_route(rendered: Rendered, doc: dict[str, Any]) -> None:
    """What any rendered HTTPRoute must satisfy."""
    assert doc["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert doc["metadata"]["name"] == FULLNAME
    spec = doc["spec"]
    assert set(spec) <= SPEC_FIELDS
    assert spec["parentRefs"]
    service = rendered.get("Service")
    (http_port,) = [port for port in service["spec"]["ports"] if port["name"] == "http"]
    assert spec["rules"]
    for rule in spec["rules"]:
        assert set(rule) <= RULE_FIELDS, rule
        (backend,) = rule["backendRefs"]
        assert set(backend) <= BACKEND_FIELDS
        # A Service port number (backendRefs take no port names), the client port only.
        assert backend == {"name": service["metadata"]["name"], "port": http_port["port"]}
        timeouts = rule.get("timeouts", {})
        assert set(timeouts) <= {"request", "backendRequest"}
        for value in timeouts.values():
            assert isinstance(value, str)
            assert DURATION.fullmatch(value), value
        if "request" in timeouts and "backendRequest" in timeouts:
            request = seconds(timeouts["request"])
            assert request == 0 or seconds(timeouts["backendRequest"]) <= request


def test_off_by_default(helm: str) -> None:
    assert not render(helm).has("HTTPRoute")


def test_default_route_keeps_streams_open(helm: str, tmp_path: Path) -> None:
    rendered, doc = route(
        helm,
        tmp_path,
        {
            "parentRefs": [{"name": "public", "namespace": "gateways", "sectionName": "https"}],
            "hostnames": ["llm.example.com"],
            "annotations": {"example.com/team": "ml"},
            "labels": {"exposed": "true"},
        },
    )
    check_route(rendered, doc)
    spec = doc["spec"]
    assert spec["parentRefs"] == [
        {"name": "public", "namespace": "gateways", "sectionName": "https"}
    ]
    assert spec["hostnames"] == ["llm.example.com"]
    assert doc["metadata"]["annotations"] == {"example.com/team": "ml"}
    assert doc["metadata"]["labels"]["exposed"] == "true"
    assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "gw"
    (rule,) = spec["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    # An hour, like the ingress-nginx read timeout: a 15 s implementation default would cut
    # long generations.
    assert rule["timeouts"] == {"request": "1h", "backendRequest": "1h"}
    assert seconds(rule["timeouts"]["request"]) == 3600


def test_rules_and_their_own_timeouts(helm: str, tmp_path: Path) -> None:
    header = {"type": "RequestHeaderModifier", "requestHeaderModifier": {"remove": ["X-Debug"]}}
    rendered, doc = route(
        helm,
        tmp_path,
        {
            "hostnames": [],
            # Helm merges maps into the defaults: null removes the default backendRequest.
            "timeouts": {"request": "0s", "backendRequest": None},
            "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}]},
                {
                    "matches": [{"path": {"type": "Exact", "value": "/v1/messages"}}],
                    "filters": [header],
                    "timeouts": {"request": "30m", "backendRequest": "10m"},
                },
                {"matches": [{"path": {"type": "PathPrefix", "value": "/admin"}}], "timeouts": {}},
            ],
        },
    )
    check_route(rendered, doc)
    spec = doc["spec"]
    assert "hostnames" not in spec  # empty: those of the listener
    first, second, third = spec["rules"]
    assert first["timeouts"] == {"request": "0s"}  # the route-wide ones (0s: none)
    assert second["timeouts"] == {"request": "30m", "backendRequest": "10m"}
    assert second["filters"] == [header]
    assert "timeouts" not in third  # {}: left to the implementation


def test_route_follows_the_service_port(helm: str, tmp_path: Path) -> None:
    path = write_values(
        tmp_path, "port", {"httpRoute": {"enabled": True}, "service": {"port": 8443}}
    )
    rendered = render(helm, [path])
    check_route(rendered, rendered.get("HTTPRoute"))
    assert rendered.get("HTTPRoute")["spec"]["rules"][0]["backendRefs"][0]["port"] == 8443


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("httpRoute.timeouts.request=forever", "/httpRoute/timeouts/request"),
        ("httpRoute.timeouts.request=10", "/httpRoute/timeouts/request"),
        ("httpRoute.timeouts.idle=1h", "/httpRoute/timeouts"),
        ("httpRoute.unknown=1", "unknown"),
        ("httpRoute.enabled=true,httpRoute.parentRefs=null", "httpRoute.parentRefs"),
        ("httpRoute.parentRefs[0].kind=Gateway", "/httpRoute/parentRefs/0"),
    ],
)
def test_schema_rejects_bad_route_values(helm: str, override: str, message: str) -> None:
    proc = run_helm(helm, "template", "gw", str(CHART), "--set", override)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_lint_with_the_route(helm: str, tmp_path: Path) -> None:
    path = write_values(tmp_path, "lint", {"httpRoute": {"enabled": True}})
    proc = run_helm(helm, "lint", "--strict", str(CHART), "--values", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_notes_curl_through_the_route(helm: str, tmp_path: Path) -> None:
    values = {
        "httpRoute": {
            "enabled": True,
            "parentRefs": [{"name": "public", "sectionName": "https"}],
            "hostnames": ["llm.example.com"],
        }
    }
    path = write_values(tmp_path, "notes", values)
    proc = run_helm(helm, "install", "gw", str(CHART), "--dry-run=client", "-f", str(path))
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "curl -N https://llm.example.com/v1/chat/completions" in notes
    assert "port-forward" not in notes


# ----- startupProbe ---------------------------------------------------------------------------


def test_startup_probe_is_configurable(helm: str, tmp_path: Path) -> None:
    custom = {"periodSeconds": 5, "failureThreshold": 120}
    path = write_values(tmp_path, "startup", {"startupProbe": custom})
    assert render(helm, [path]).container()["startupProbe"] == {
        "httpGet": {"path": "/readyz", "port": "http"},
        "periodSeconds": 5,
        "timeoutSeconds": 3,
        "failureThreshold": 120,
    }
    off = write_values(tmp_path, "off", {"startupProbe": None})
    container = render(helm, [off]).container()
    assert "startupProbe" not in container
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
