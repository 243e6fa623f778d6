"""The chart's `helm test` hook: how it renders, and its script run against a real gateway.

There is no cluster here, so the hook's own script (taken from the rendered Pod, not from
the file) runs with the rendered Pod's environment against `sluice serve` started on the
ConfigMap the same chart rendered; only SLUICE_TEST_URL points at loopback instead of the
Service.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any, Final

import pytest

from gateway.auth import hash_key
from tests.integration._helm import CHART, FULLNAME, Rendered, render, run_helm, write_values
from tests.integration._process import gateway_process

TEAM_KEY: Final = "sk-sluice-helm-test-0123456789"
SCRIPT_SECONDS: Final = 60.0


def hook_env(rendered: Rendered) -> dict[str, Any]:
    (container,) = rendered.hook_pod()["spec"]["containers"]
    return {item["name"]: item for item in container["env"]}


async def run_hook(
    rendered: Rendered, url: str, extra: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run the rendered Pod's command with its env (URL replaced); (exit code, output)."""
    (container,) = rendered.hook_pod()["spec"]["containers"]
    command = container["command"]
    assert command == ["python", "-c"]
    env = {name: item["value"] for name, item in hook_env(rendered).items() if "value" in item}
    env["SLUICE_TEST_URL"] = url
    env.update(extra or {})
    env["PATH"] = os.environ.get("PATH", "")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        *container["args"],
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(SCRIPT_SECONDS):
        output, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, output.decode()


def config_file(rendered: Rendered, directory: Path) -> Path:
    path = directory / "config.yaml"
    path.write_text(rendered.get("ConfigMap")["data"]["config.yaml"])
    return path


# ----- rendering ------------------------------------------------------------------------------


def test_hook_pod(helm: str) -> None:
    rendered = render(helm)
    pod = rendered.hook_pod()
    annotations = pod["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "test"
    assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {
        "before-hook-creation",
        "hook-succeeded",
    }
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    # The gateway's own image: no second image to pull or mirror.
    assert container["image"] == rendered.container()["image"]
    security = container["securityContext"]
    assert security == rendered.container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["limits"]["memory"]
    # The script is the chart's file, verbatim.
    script = (CHART / "files" / "test-connection.py").read_text()
    assert container["args"] == [script]
    env = hook_env(rendered)
    service = rendered.get("Service")
    assert (
        env["SLUICE_TEST_URL"]["value"]
        == f"http://{FULLNAME}:{service['spec']['ports'][0]['port']}"
    )
    assert env["SLUICE_TEST_COMPLETION"]["value"] == "1"
    assert "SLUICE_TEST_API_KEY" not in env


def test_hook_pod_is_not_a_gateway_pod(helm: str) -> None:
    """The Service, the PDB and the topology spread must not count the test pod in."""
    rendered = render(helm)
    labels = rendered.hook_pod()["metadata"]["labels"]
    selector = rendered.get("Service")["spec"]["selector"]
    assert not selector.items() <= labels.items()
    assert rendered.get("Deployment")["spec"]["selector"]["matchLabels"] != labels
    assert labels["app.kubernetes.io/instance"] == "gw"
    assert labels["app.kubernetes.io/component"] == "test"


def test_network_policy_lets_the_hook_in(helm: str, tmp_path: Path) -> None:
    values = {"networkPolicy": {"enabled": True, "allowSameNamespace": False}}
    rendered = render(helm, [write_values(tmp_path, "np", values)])
    sources = rendered.get("NetworkPolicy")["spec"]["ingress"][0]["from"]
    labels = rendered.hook_pod()["metadata"]["labels"]
    selectors = [
        source["podSelector"]["matchLabels"] for source in sources if "podSelector" in source
    ]
    assert any(selector.items() <= labels.items() for selector in selectors)
    # A gateway pod is not let in by that rule.
    gateway_labels = rendered.get("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not any(selector.items() <= gateway_labels.items() for selector in selectors)


def test_hook_values(helm: str, tmp_path: Path) -> None:
    values = {
        "tests": {
            "model": "gpt-4o-mini",
            "completion": False,
            "apiKeySecret": {"name": "sluice-test-key", "key": "key"},
        },
        "service": {"port": 8000},
    }
    rendered = render(helm, [write_values(tmp_path, "hook", values)])
    env = hook_env(rendered)
    assert env["SLUICE_TEST_URL"]["value"] == f"http://{FULLNAME}:8000"
    assert env["SLUICE_TEST_MODEL"]["value"] == "gpt-4o-mini"
    assert env["SLUICE_TEST_COMPLETION"]["value"] == "0"
    assert env["SLUICE_TEST_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "sluice-test-key", "key": "key"}
    }
    off = render(helm, (), "tests.enabled=false")
    assert not off.has("Pod")
    proc = run_helm(
        helm, "template", "gw", str(CHART), "--set", "tests.apiKeySecret.name=only-a-name"
    )
    assert proc.returncode != 0
    assert "tests.apiKeySecret.key" in proc.stderr


# ----- the script against a real gateway ------------------------------------------------------


async def test_hook_passes_against_the_demo_config(helm: str, tmp_path: Path) -> None:
    rendered = render(helm)
    async with gateway_process({}, tmp_path, config_path=config_file(rendered, tmp_path)) as gw:
        code, output = await run_hook(rendered, gw.url)
        assert code == 0, output
        assert "ok: GET" in output
        assert "['demo']" in output
        assert "ok: POST /v1/chat/completions demo streamed" in output
        # A model the gateway does not route: the hook fails and says why.
        code, output = await run_hook(rendered, gw.url, {"SLUICE_TEST_MODEL": "no-such-model"})
        assert code == 1, output
        assert "FAIL: POST /v1/chat/completions (no-such-model) answered 404" in output
        # Nothing listening: a failure, not a traceback.
    code, output = await run_hook(rendered, gw.url)
    assert code == 1, output
    assert output.startswith("FAIL: ")
    assert "Traceback" not in output


@pytest.mark.parametrize("with_key", [True, False], ids=["key", "no-key"])
async def test_hook_with_team_keys(helm: str, tmp_path: Path, with_key: bool) -> None:
    values = {
        "config": {
            "upstreams": {"demo": {"kind": "demo"}},
            "routes": [
                {"model": "demo-a", "upstream": "demo"},
                {"model": "demo-b", "upstream": "demo"},
            ],
            "teams": {"ml": {"keys": [{"name": "ci", "sha256": hash_key(TEAM_KEY)}]}},
        },
        "tests": {"model": "demo-b"},
    }
    rendered = render(helm, [write_values(tmp_path, "keys", values)])
    extra = {"SLUICE_TEST_API_KEY": TEAM_KEY} if with_key else {}
    async with gateway_process({}, tmp_path, config_path=config_file(rendered, tmp_path)) as gw:
        code, output = await run_hook(rendered, gw.url, extra)
        assert code == 0, output
        if with_key:
            assert "ok: POST /v1/chat/completions demo-b streamed" in output
        else:
            assert "ok: GET /v1/models 401: the gateway needs a key" in output
            assert "POST" not in output
        code, output = await run_hook(rendered, gw.url, {"SLUICE_TEST_API_KEY": "sk-wrong"})
        assert code == 1, output
        assert "FAIL: GET /v1/models answered 401" in output
