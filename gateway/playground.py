"""The playground: one self-contained page at GET /playground for trying the gateway in a browser.

The page talks to the gateway only through its public API (GET /v1/models, POST
/v1/chat/completions with `stream: true`), so what it shows is what any client gets. It is
read once when the app is built and served with a strict Content-Security-Policy whose
hashes cover its one inline `<style>` and one inline `<script>`: nothing else may run, and
it may connect only to its own origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Final

from aiohttp import web

PATH: Final = "/playground"

_INLINE = {kind: re.compile(rf"<{kind}>(.*?)</{kind}>", re.DOTALL) for kind in ("style", "script")}

# The key field as shipped (optional) and as served when the gateway requires keys; outside
# the inline blocks, so the CSP hashes do not depend on it.
_KEY_OPTIONAL: Final = (
    '<span class="hint" id="key-need">(optional)</span></label>\n      <input id="key"'
)
_KEY_REQUIRED: Final = (
    '<span class="hint" id="key-need">(required)</span></label>\n      <input id="key" required'
)


def with_key_required(html: str) -> str:
    """The page telling its user that this gateway requires an API key."""
    if html.count(_KEY_OPTIONAL) != 1:
        raise ValueError("playground.html: expected one optional API key field")
    return html.replace(_KEY_OPTIONAL, _KEY_REQUIRED)


def _source_hash(html: str, kind: str) -> str:
    """The CSP source (`'sha256-…'`) of the page's single inline `<style>` or `<script>`."""
    blocks = _INLINE[kind].findall(html)
    if len(blocks) != 1:
        raise ValueError(f"playground.html: expected one inline <{kind}>, found {len(blocks)}")
    digest = hashlib.sha256(blocks[0].encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def content_security_policy(html: str) -> str:
    """Deny everything but the page's own inline style and script, and fetches to its origin."""
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {_source_hash(html, 'script')}",
            f"style-src {_source_hash(html, 'style')}",
            "connect-src 'self'",
            "img-src data:",  # the empty favicon, so the browser asks for no /favicon.ico
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


@dataclass(frozen=True, slots=True)
class PlaygroundPage:
    """The page's bytes and the headers it is always served with."""

    body: bytes
    headers: dict[str, str]
    etag: str

    @classmethod
    def from_html(cls, html: str) -> PlaygroundPage:
        """Build from the page's text (raises ValueError if its inline blocks are not one each)."""
        body = html.encode("utf-8")
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = {
            "Content-Security-Policy": content_security_policy(html),
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
            "Referrer-Policy": "no-referrer",
            "ETag": etag,
        }
        return cls(body, headers, etag)

    @classmethod
    def load(cls, *, key_required: bool = False) -> PlaygroundPage:
        """The page shipped in the package (`gateway/static/playground.html`); with
        `key_required` (the gateway has `auth: keys`) its key field says "required"."""
        html = resources.files("gateway").joinpath("static", "playground.html").read_text("utf-8")
        return cls.from_html(with_key_required(html) if key_required else html)

    async def serve(self, request: web.Request) -> web.Response:
        """GET /playground: the page (304 when the browser's copy is current)."""
        if self.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=self.headers)
        return web.Response(
            body=self.body, content_type="text/html", charset="utf-8", headers=self.headers
        )


async def _to_playground(request: web.Request) -> web.Response:
    # Relative, so it also resolves under a reverse proxy's path prefix.
    return web.Response(status=302, headers={"Location": PATH.lstrip("/")})


def add_routes(app: web.Application, *, key_required: bool = False) -> None:
    """Serve the page at /playground and redirect / to it."""
    page = PlaygroundPage.load(key_required=key_required)
    app.router.add_get(PATH, page.serve)
    app.router.add_get("/", _to_playground)
