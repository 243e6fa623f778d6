"""The playground option (automatic: on for the embedded demo only) and the page it serves."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import pytest

from gateway.app import build_app, build_state
from gateway.config import load_config, parse_config
from gateway.playground import PlaygroundPage, content_security_policy

DEMO_YAML = """\
upstreams:
  d: {kind: demo}
routes:
  - {model: m, upstream: d}
"""


def _routes(path: Path | None) -> set[str]:
    app = build_app(build_state(load_config(path, {})))
    return {route.resource.canonical for route in app.router.routes() if route.resource}


def test_embedded_demo_turns_the_playground_on() -> None:
    config = load_config(None, {})
    assert config.server.playground is True
    assert {"/playground", "/"} <= _routes(None)


def test_a_config_file_leaves_it_off(tmp_path: Path) -> None:
    path = tmp_path / "sluice.yaml"
    path.write_text(DEMO_YAML, encoding="utf-8")
    assert load_config(path, {}).server.playground is None
    routes = _routes(path)
    assert "/playground" not in routes
    assert "/" not in routes


@pytest.mark.parametrize("value", [True, False])
def test_a_config_file_can_force_it(tmp_path: Path, value: bool) -> None:
    path = tmp_path / "sluice.yaml"
    path.write_text(DEMO_YAML + f"server: {{playground: {str(value).lower()}}}\n", "utf-8")
    assert load_config(path, {}).server.playground is value
    assert ("/playground" in _routes(path)) is value


def test_parse_config_keeps_auto_as_null() -> None:
    data = {"upstreams": {"d": {"kind": "demo"}}, "routes": [{"model": "m", "upstream": "d"}]}
    assert parse_config(data, {}).server.playground is None


def test_example_config_documents_the_option() -> None:
    example = Path(__file__).resolve().parents[2] / "config.example.yaml"
    assert re.search(r"^\s*#?\s*playground:", example.read_text("utf-8"), re.MULTILINE)


# ----- the page -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page() -> PlaygroundPage:
    return PlaygroundPage.load()


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def test_page_is_small_and_self_contained(page: PlaygroundPage) -> None:
    html = page.body.decode("utf-8")
    assert len(page.body) < 20 * 1024
    assert not re.search(r"""\b(?:src|href)\s*=\s*["'](?!data:)""", html), "no external assets"
    assert "://" not in html, "no absolute URLs (CDNs, other origins)"
    for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert unsafe not in html, f"model output must never be parsed as HTML ({unsafe})"


def test_csp_hashes_cover_exactly_the_inline_blocks(page: PlaygroundPage) -> None:
    html = page.body.decode("utf-8")
    csp = page.headers["Content-Security-Policy"]
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    (style,) = re.findall(r"<style>(.*?)</style>", html, re.DOTALL)
    assert f"script-src 'sha256-{_sha256(script)}';" in csp
    assert f"style-src 'sha256-{_sha256(style)}';" in csp
    assert "default-src 'none'" in csp
    assert "connect-src 'self'" in csp
    assert "unsafe" not in csp


def test_page_headers(page: PlaygroundPage) -> None:
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Cache-Control"] == "no-cache"
    assert page.headers["ETag"] == page.etag


@pytest.mark.parametrize(
    "html",
    [
        "<style>a{}</style><p>no script</p>",
        "<style>a{}</style><script>1</script><script>2</script>",
    ],
)
def test_a_page_without_exactly_one_inline_script_is_refused(html: str) -> None:
    with pytest.raises(ValueError, match="inline <script>"):
        content_security_policy(html)


def test_with_keys_the_key_field_says_required_under_the_same_csp() -> None:
    optional, required = PlaygroundPage.load(), PlaygroundPage.load(key_required=True)
    assert b'id="key-need">(optional)</span>' in optional.body
    assert b'id="key-need">(required)</span>' in required.body
    assert b'<input id="key" required' in required.body
    assert b"(optional)" not in required.body
    csp = "Content-Security-Policy"
    assert required.headers[csp] == optional.headers[csp], "only markup outside the inline code"
    assert required.etag != optional.etag
