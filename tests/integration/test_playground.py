"""The playground's routes over HTTP: headers, redirect, revalidation, 404 when off."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.testing.harness import run_gateway
from tests.integration._support import json_error

DEMO: dict[str, Any] = {
    "upstreams": {"d": {"kind": "demo", "ttft_ms": 0, "itl_ms": 0}},
    "routes": [{"model": "m", "upstream": "d"}],
}


def _config(playground: bool | None) -> dict[str, Any]:
    return {**DEMO, "server": {"playground": playground}}


async def test_page_is_served_with_strict_headers(http: aiohttp.ClientSession) -> None:
    async with run_gateway(_config(True)) as gw:
        async with http.get(gw.url + "/playground") as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/html; charset=utf-8"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["Cache-Control"] == "no-cache"
            csp = r.headers["Content-Security-Policy"]
            body = await r.read()
        assert "connect-src 'self'" in csp
        assert "script-src 'sha256-" in csp
        assert b"<title>Sluice playground</title>" in body
        assert len(body) < 20 * 1024


async def test_root_redirects_to_the_page(http: aiohttp.ClientSession) -> None:
    async with run_gateway(_config(True)) as gw:
        async with http.get(gw.url + "/", allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == "playground"
        async with http.get(gw.url + "/") as r:
            assert r.status == 200
            assert r.url.path == "/playground"


async def test_unchanged_page_revalidates_with_304(http: aiohttp.ClientSession) -> None:
    async with run_gateway(_config(True)) as gw:
        async with http.get(gw.url + "/playground") as r:
            etag = r.headers["ETag"]
        async with http.get(gw.url + "/playground", headers={"If-None-Match": etag}) as r:
            assert r.status == 304
            assert await r.read() == b""
            assert r.headers["Content-Security-Policy"]


@pytest.mark.parametrize("playground", [False, None])
@pytest.mark.parametrize("path", ["/playground", "/"])
async def test_off_means_not_found(
    http: aiohttp.ClientSession, playground: bool | None, path: str
) -> None:
    async with run_gateway(_config(playground)) as gw, http.get(gw.url + path) as r:
        assert r.status == 404
        assert json_error(await r.read())["code"] == "not_found"
