"""Graceful drain of a real `sluice serve` process on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from tests.integration._support import chat_body, final_error

BOUND = 20.0


@asynccontextmanager
async def _serve(
    tmp_path: Path, drain: float, itl_ms: float
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    config = {
        "server": {"drain_seconds": drain, "header_hold_seconds": 0.5},
        "upstreams": {"demo": {"kind": "demo", "ttft_ms": 5, "itl_ms": itl_ms, "max_tokens": 60}},
        "routes": [{"model": "demo", "upstream": "demo"}],
    }
    path = tmp_path / "sluice.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--config",
        str(path),
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(BOUND):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("Sluice listening on "), line
        yield proc, line.split()[-1]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _wait_for_status(session: aiohttp.ClientSession, url: str, status: int) -> None:
    """Poll `url` on an already open keep-alive connection until it answers `status`."""
    async with asyncio.timeout(BOUND):
        while True:
            async with session.get(url) as resp:
                if resp.status == status:
                    return
            await asyncio.sleep(0.02)  # polling pace, bounded by the timeout above


async def _refused(url: str) -> bool:
    """True once a brand-new connection to `url` is refused."""
    async with asyncio.timeout(BOUND):
        while True:
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as fresh:
                try:
                    async with fresh.get(url):
                        pass
                except aiohttp.ClientConnectorError:
                    return True
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("cut", [False, True], ids=["completes", "cut-at-deadline"])
async def test_sigterm_drains_in_flight_streams(tmp_path: Path, cut: bool) -> None:
    """SIGTERM: /readyz turns 503, new connections are refused and new requests on open
    connections get 503; the running stream completes (or, past the deadline, ends with a
    final retry event); the process exits 0."""
    drain, itl = (0.3, 200.0) if cut else (15.0, 25.0)
    async with _serve(tmp_path, drain, itl) as (proc, url):
        keepalive = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        streaming = aiohttp.ClientSession()
        try:
            async with keepalive.get(url + "/readyz") as resp:
                assert resp.status == 200
            async with streaming.post(
                url + "/v1/chat/completions", json=chat_body(model="demo")
            ) as resp:
                assert resp.status == 200
                async with asyncio.timeout(BOUND):
                    first = await resp.content.readuntil(b"\n\n")
                proc.send_signal(signal.SIGTERM)
                await _wait_for_status(keepalive, url + "/readyz", 503)
                async with keepalive.post(
                    url + "/v1/chat/completions", json=chat_body(model="demo")
                ) as refused:
                    assert refused.status == 503
                    assert (await refused.json())["error"]["code"] == "gateway_draining"
                assert await _refused(url + "/healthz")
                async with asyncio.timeout(BOUND):
                    rest = first + await resp.read()
        finally:
            await keepalive.close()
            await streaming.close()
        async with asyncio.timeout(BOUND):
            assert await proc.wait() == 0
    if cut:
        error = final_error(rest)
        assert error["code"] == "gateway_draining"
        assert not rest.endswith(b"data: [DONE]\n\n")
    else:
        assert rest.endswith(b"data: [DONE]\n\n")
        chunks = [orjson.loads(e[6:]) for e in rest.split(b"\n\n") if e.startswith(b"data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
