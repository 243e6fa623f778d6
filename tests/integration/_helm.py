"""Helm for the chart tests: find the binary, render the chart, look into what it rendered.

The `helm` and `kubernetes_validate` fixtures (tests/integration/conftest.py) use
`find_helm` and `kubernetes_validate_command`; without the tools the tests skip, or fail when
the CI environment variable is set.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

ROOT: Final = Path(__file__).resolve().parents[2]
CHART: Final = ROOT / "helm" / "sluice"
EXAMPLE: Final = CHART / "examples" / "openai-and-vllm.yaml"
TOOLS_BIN: Final = ROOT / ".tools" / "bin"
FETCH_HELM: Final = ROOT / "tools" / "fetch-helm.sh"
RELEASE: Final = "gw"
FULLNAME: Final = "gw-sluice"

# Kinds from CRDs: kubernetes-validate has no schema for them (it only warns about an
# unknown kind, even with --strict); the tests check them structurally.
CRD_KINDS: Final = frozenset({"ServiceMonitor", "PrometheusRule", "HTTPRoute"})


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message} (required in CI)")
    pytest.skip(message)


def find_helm() -> str:
    """A helm binary: on PATH, in .tools/bin, or installed there by tools/fetch-helm.sh."""
    found = shutil.which("helm")
    if found:
        return found
    local = TOOLS_BIN / "helm"
    if not os.access(local, os.X_OK):
        try:
            subprocess.run(
                ["bash", str(FETCH_HELM), str(TOOLS_BIN)],
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            )
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", None) or err
            _unavailable(f"helm not found and tools/fetch-helm.sh failed: {detail}")
    if not os.access(local, os.X_OK):
        _unavailable("helm not found and tools/fetch-helm.sh did not install it")
    return str(local)


def kubernetes_validate_command() -> list[str]:
    """The command that runs kubernetes-validate."""
    if importlib.util.find_spec("kubernetes_validate") is None:
        _unavailable("kubernetes-validate is not installed (pip install kubernetes-validate)")
    return [sys.executable, "-m", "kubernetes_validate"]


@dataclass(frozen=True)
class Rendered:
    """The documents `helm template` produced, by kind and name."""

    docs: list[dict[str, Any]]
    text: str
    values_files: list[Path] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return sorted(str(doc["kind"]) for doc in self.docs)

    def get(self, kind: str, name: str = FULLNAME) -> dict[str, Any]:
        for doc in self.docs:
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
        raise AssertionError(f"no {kind}/{name} rendered; got {self.kinds()}")

    def has(self, kind: str) -> bool:
        return any(doc["kind"] == kind for doc in self.docs)

    def container(self) -> dict[str, Any]:
        containers = self.get("Deployment")["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1
        result: dict[str, Any] = containers[0]
        return result

    def hook_pod(self) -> dict[str, Any]:
        """The `helm test` Pod."""
        return self.get("Pod", f"{FULLNAME}-test-connection")

    def gateway_config(self) -> dict[str, Any]:
        text = self.get("ConfigMap")["data"]["config.yaml"]
        config = yaml.safe_load(text)
        assert isinstance(config, dict)
        return config


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def write_values(directory: Path, name: str, values: Mapping[str, Any]) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dict(values), sort_keys=False))
    return path


def render(helm: str, values_files: Sequence[Path] = (), *sets: str) -> Rendered:
    args = ["template", RELEASE, str(CHART), "--namespace", "llm"]
    for path in values_files:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, proc.stderr
    docs = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    assert all(isinstance(doc, dict) for doc in docs)
    return Rendered(docs=docs, text=proc.stdout, values_files=list(values_files))
