"""`server.log_format: json`: a real `sluice serve` whose every output line is a JSON object
(start-up, access log, aiohttp's warnings, drain and shutdown); and `sluice --version`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson

from gateway.testing.fake_upstream import FakeUpstream, Script, openai_stream
from tests.integration._process import REPO, gateway_process
from tests.integration._support import CHAT, RawClient, chat_body, config_for


async def test_every_server_line_is_json(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    async with FakeUpstream(Script(openai_stream(["hi"]))) as fake:
        config = config_for(fake, server={"log_format": "json"}, plugins=[{"name": "access_log"}])
        async with gateway_process(config, tmp_path) as gw:
            async with http.post(gw.v1 + CHAT, json=chat_body()) as resp:
                assert resp.status == 200
                await resp.read()
            raw = await RawClient.connect(gw.url)  # a head aiohttp refuses: a warning
            await raw.send("GET", "/healthz", [("Bad Header", "x")])
            answer = await raw.reader.readuntil(b"\r\n\r\n")
            assert b" 400 " in answer.split(b"\r\n")[0]
            await raw.close()
            assert await gw.stop() == 0
            text = gw.log_text()
    lines = [orjson.loads(line) for line in text.splitlines()]  # raises on any plain line
    events = [line["event"] for line in lines]
    assert all(isinstance(line, dict) and {"ts", "level", "event"} <= line.keys() for line in lines)
    assert any(event.startswith("Sluice listening on http://127.0.0.1:") for event in events)
    assert "request" in events  # the access log's line, on the same stream
    assert any(line["level"] == "warning" and line["logger"] == "sluice.http" for line in lines)
    assert any(event.startswith("draining") for event in events)
    assert "shutting down" in events


async def test_text_logs_stay_plain(tmp_path: Path) -> None:
    async with FakeUpstream() as fake, gateway_process(config_for(fake), tmp_path) as gw:
        assert await gw.stop() == 0
        text = gw.log_text()
    assert text.startswith("Sluice listening on http://127.0.0.1:")


def test_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--version"],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=True,
    )
    from gateway.cli import version

    assert done.stdout.decode() == f"sluice {version()}\n"
    assert version().count(".") >= 2
