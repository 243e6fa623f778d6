"""docs/plugins.md's examples as a third-party plugin package: they pass mypy --strict as
written, run through the testing kit, and, installed through an entry point (a dist-info on
sys.path, as pip leaves it), the footer plugin runs in a real gateway, shows its own metric
on /metrics and adds its own `sluice footer` command."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.cli import main
from gateway.testing import run_gateway
from tests.integration._support import chat_body, chat_contents, split_events

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "plugins.md"
BLOCK = re.compile(r"```python\n# file: (?P<name>[\w.]+\.py)\n(?P<code>.*?)```", re.DOTALL)
FOOTER_CONFIG: dict[str, Any] = {
    "upstreams": {"demo": {"kind": "demo", "ttft_ms": 1, "itl_ms": 1}},
    "routes": [{"model": "demo", "upstream": "demo"}],
    "plugins": [{"name": "footer", "options": {"text": " [footer]"}}],
}


def doc_files() -> dict[str, str]:
    found = {m["name"]: m["code"] for m in BLOCK.finditer(DOCS.read_text("utf-8"))}
    assert {"shout.py", "footer.py", "test_footer.py"} <= set(found)
    return found


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The doc's modules plus a dist-info registering `footer` and `shout` as plugins."""
    for name, code in doc_files().items():
        (tmp_path / name).write_text(code, "utf-8")
    info = tmp_path / "sluice_doc_plugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: sluice-doc-plugins\nVersion: 1.0\n", "utf-8"
    )
    (info / "entry_points.txt").write_text(
        "[sluice.plugins]\nfooter = footer:Footer\nshout = shout:Shout\n", "utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    for module in ("footer", "shout", "test_footer"):
        sys.modules.pop(module, None)
    return tmp_path


def test_the_doc_examples_pass_mypy_strict_as_written(package: Path) -> None:
    files = sorted(str(package / name) for name in doc_files())
    env = {**os.environ, "MYPYPATH": f"{package}{os.pathsep}{REPO}"}
    config = ["--config-file", str(REPO / "pyproject.toml")]
    cache = ["--cache-dir", str(REPO / ".mypy_cache")]
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", *config, *cache, *files],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_the_doc_test_passes_with_the_testing_kit(package: Path) -> None:
    module = importlib.import_module("test_footer")
    await module.test_the_footer_comes_before_the_finish_chunk()


async def test_an_entry_point_plugin_exports_its_own_metric(package: Path) -> None:
    async with run_gateway(FOOTER_CONFIG) as gateway, aiohttp.ClientSession() as http:
        payload = chat_body(model="demo")
        async with http.post(f"{gateway.v1}/chat/completions", json=payload) as resp:
            assert resp.status == 200
            raw = await resp.read()
        async with http.get(f"{gateway.url}/metrics") as resp:
            page = await resp.text()
    contents = chat_contents(raw)
    assert contents[-1] == " [footer]"  # the footer's text, after the answer
    events = split_events(raw)
    assert b"[DONE]" in events[-1]
    assert b'"finish_reason":"stop"' in events[-2]  # the finish chunk after the footer
    (family,) = [f for f in text_string_to_metric_families(page) if f.name == "sluice_footer_added"]
    assert family.documentation == "Answers that got the footer."
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    assert samples[("sluice_footer_added_total", (("model", "demo"), ("team", "anonymous")))] == 1


def test_an_entry_point_plugin_adds_its_own_command(
    package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["footer"]) == 0
    assert capsys.readouterr().out.strip() == "-- answered through Sluice"
