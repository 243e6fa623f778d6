"""What documents the chart: its README's values table, the schema, the Artifact Hub
annotations of Chart.yaml, and that every variable the chart sets is read by something.

The values table is checked twice: parsed back from README.md against values.yaml (every
value, type and default), and against tools/helm_values_table.py's output (descriptions).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Final

import yaml

from tests.integration._helm import CHART, ROOT, render

README: Final = CHART / "README.md"
# https://artifacthub.io/docs/topics/annotations/helm/
CATEGORIES: Final = {
    "ai-machine-learning",
    "database",
    "integration-delivery",
    "monitoring-logging",
    "networking",
    "security",
    "storage",
    "streaming-messaging",
}
CHANGE_KINDS: Final = {"added", "changed", "deprecated", "removed", "fixed", "security"}
# Variables the chart sets that no gateway module reads by name, and who reads them.
CONSUMERS: Final = {
    "TMPDIR": "Python's tempfile",
    "REDIS_URL": "the config's ${REDIS_URL} (redis.url)",
}


def values() -> dict[str, Any]:
    loaded = yaml.safe_load((CHART / "values.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def schema() -> dict[str, Any]:
    loaded = json.loads((CHART / "values.schema.json").read_text())
    assert isinstance(loaded, dict)
    return loaded


def value_paths(
    tree: Mapping[str, Any], node: Mapping[str, Any], prefix: str = ""
) -> Iterator[tuple[str, Any, bool]]:
    """(path, value, is_leaf) of every value; the schema says which objects are the chart's
    own (additionalProperties: false, followed down) and which are free-form (one value)."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        assert key in node.get("properties", {}), f"values.schema.json does not describe {path}"
        sub = node["properties"][key]
        own = isinstance(value, dict) and sub.get("additionalProperties") is False
        yield path, value, not own
        if own:
            yield from value_paths(value, sub, f"{path}.")


def readme_rows() -> dict[str, tuple[str, str]]:
    """Key -> (type, default) from the Markdown table of the chart's README."""
    rows: dict[str, tuple[str, str]] = {}
    for line in README.read_text().splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        key = cells[0].strip("`")
        assert key not in rows, f"{key} twice in the table"
        rows[key] = (cells[1], cells[2])
    return rows


# ----- the values table -----------------------------------------------------------------------


def test_every_value_is_in_the_readme_table() -> None:
    rows = readme_rows()
    paths = list(value_paths(values(), schema()))
    leaves = {path: value for path, value, leaf in paths if leaf}
    parents = {path for path, _, leaf in paths if not leaf}
    assert set(leaves) - set(rows) == set(), "values missing from helm/sluice/README.md"
    assert set(rows) - set(leaves) - parents == set(), "README rows that are no values"
    for path, value in leaves.items():
        kind, default = rows[path]
        assert default == "`" + json.dumps(value, separators=(", ", ": ")) + "`", path
        assert kind, path
    # The values this chart version added are there, down to the nested ones.
    for path in ("httpRoute.timeouts.request", "startupProbe", "tests.apiKeySecret.key"):
        assert path in rows


def test_readme_table_is_generated_from_values_yaml() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "helm_values_table.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_value_has_a_description() -> None:
    """The generator refuses a value without a `# --` comment; the rows have text."""
    for line in README.read_text().splitlines():
        if line.startswith("| `"):
            description = re.split(r"(?<!\\)\|", line)[4].strip()
            assert len(description) > 8, line


def test_schema_describes_every_value() -> None:
    """value_paths asserts it; that the defaults are valid is `helm lint`'s part."""
    paths = [path for path, _, _ in value_paths(values(), schema())]
    assert "httpRoute.timeouts.backendRequest" in paths
    assert "tests.apiKeySecret.name" in paths


# ----- Chart.yaml -----------------------------------------------------------------------------


def _chart() -> dict[str, Any]:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert isinstance(chart, dict)
    return chart


def _yaml_list(annotations: Mapping[str, str], name: str) -> list[dict[str, Any]]:
    parsed = yaml.safe_load(annotations[name])
    assert isinstance(parsed, list), name
    assert parsed, name
    assert all(isinstance(item, dict) for item in parsed), name
    return parsed


def test_artifact_hub_annotations() -> None:
    chart = _chart()
    annotations = chart["annotations"]
    # Chart.yaml annotations are a map of strings (YAML lists inside strings).
    assert all(isinstance(value, str) for value in annotations.values()), annotations
    assert annotations["artifacthub.io/category"] in CATEGORIES
    pyproject = (ROOT / "pyproject.toml").read_text()
    license_ = re.search(r'^license = \{ text = "([^"]+)" \}', pyproject, re.MULTILINE)
    assert license_ is not None
    assert annotations["artifacthub.io/license"] == license_.group(1)
    for flag in ("containsSecurityUpdates", "prerelease", "operator"):
        assert annotations[f"artifacthub.io/{flag}"] in ("true", "false"), flag
    for link in _yaml_list(annotations, "artifacthub.io/links"):
        assert set(link) == {"name", "url"}
        assert link["url"].startswith("https://")
    images = _yaml_list(annotations, "artifacthub.io/images")
    # The image the chart deploys by default (and the test hook runs).
    default_image = f"{values()['image']['repository']}:{chart['appVersion']}"
    assert [image["image"] for image in images] == [default_image]
    assert all(set(image) <= {"name", "image", "whitelisted", "platforms"} for image in images)
    for change in _yaml_list(annotations, "artifacthub.io/changes"):
        assert set(change) <= {"kind", "description", "links"}
        assert change["kind"] in CHANGE_KINDS
        assert isinstance(change["description"], str)
        assert change["description"]


def test_chart_version_is_semver() -> None:
    chart = _chart()
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["version"] != "0.1.0", "bump the chart version on a chart change"


# ----- environment variables ------------------------------------------------------------------


def _gateway_sources() -> str:
    return "\n".join(
        path.read_text()
        for folder in ("gateway", "plugins")
        for path in (ROOT / folder).rglob("*.py")
    )


def test_every_variable_the_chart_sets_is_read(helm: str) -> None:
    """No variable in the pod that nothing reads (SLUICE_DRAIN_SECONDS was one)."""
    sources = _gateway_sources()
    rendered = render(helm, (), "redis.url=redis://redis.cache.svc:6379/0")
    config_text = rendered.get("ConfigMap")["data"]["config.yaml"]
    for item in rendered.container()["env"]:
        name = item["name"]
        used = name in CONSUMERS or f"${{{name}" in config_text or f'"{name}"' in sources
        assert used, f"the chart sets {name} but nothing reads it"
    assert "SLUICE_DRAIN_SECONDS" not in (CHART / "values.yaml").read_text()
