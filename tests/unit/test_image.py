"""The container image's build inputs: pinned dependencies, labels and a health check."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt: {line!r} is not an exact pin"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_constraints_pin_every_direct_dependency_of_the_image_within_its_range() -> None:
    """The image installs sluice[otel] under constraints.txt: each requirement pyproject
    names (for this platform) has an exact pin, and the pin satisfies the requirement."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for r in project["optional-dependencies"]["otel"]]
    pins = _pins()
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"constraints.txt has no pin for {requirement.name}"
        assert requirement.specifier.contains(pinned, prereleases=True), (requirement, pinned)


def test_dockerfile_builds_with_the_constraints_and_labels_and_checks_health() -> None:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    assert "COPY pyproject.toml README.md constraints.txt ./" in text
    assert re.search(r"pip wheel [^\n]*--constraint constraints\.txt", text)
    for label in ("title", "version", "revision", "source", "licenses", "base.name"):
        assert f"org.opencontainers.image.{label}=" in text, label
    health = re.search(r"^HEALTHCHECK .*CMD (.*)$", text, re.MULTILINE)
    assert health is not None
    assert "/readyz" in health.group(1)
