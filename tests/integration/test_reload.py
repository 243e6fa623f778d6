"""Config reload of a running gateway: SIGHUP to a real `sluice serve`, a watched file that
changes as a mounted ConfigMap does, keys swapped in place, an invalid file refused."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from gateway.auth import hash_key
from gateway.reload import Reloader
from gateway.testing.fake_upstream import FakeUpstream, Script, openai_stream
from gateway.testing.harness import run_gateway
from tests.integration._process import gateway_process, parse_metrics
from tests.integration._support import DONE, GatedUpstream, chat_body, chat_contents, gated_script

ADMIN = "admin-test-key"
BOUND = 20.0  # a subprocess on a loaded 2-core machine: only turns a hang into a failure


def _config(routes: dict[str, str], upstreams: dict[str, str], **extra: Any) -> dict[str, Any]:
    """Routes model -> upstream name, upstreams name -> base_url."""
    return {
        "server": {"admin_key": ADMIN, "header_hold_seconds": 0},
        "upstreams": {name: {"kind": "openai", "base_url": url} for name, url in upstreams.items()},
        "routes": [{"model": model, "upstream": up} for model, up in routes.items()],
        **extra,
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _admin_config(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with http.get(f"{url}/admin/config", headers=headers) as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def _wait_running(
    http: aiohttp.ClientSession, url: str, sha256: str, *, result: str | None = None
) -> dict[str, Any]:
    """Poll /admin/config until the gateway runs `sha256` (or reports the reload `result`)."""
    async with asyncio.timeout(BOUND):
        while True:
            body = await _admin_config(http, url)
            last = body["last_reload"]
            if body["sha256"] == sha256 and result is None:
                return body
            if result is not None and last is not None and last["result"] == result:
                return body
            await asyncio.sleep(0.05)


async def _chat(
    http: aiohttp.ClientSession, url: str, model: str, key: str | None = None
) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.post(
        f"{url}/v1/chat/completions", json=chat_body(model=model), headers=headers
    ) as resp:
        return resp.status, await resp.read()


async def _reloads(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(f"{url}/metrics") as resp:
        samples = parse_metrics(await resp.text())
    return {labels["result"]: v for labels, v in samples["sluice_config_reloads_total"]}


async def test_sighup_applies_a_new_config_while_a_stream_finishes_on_the_old_one(
    tmp_path: Path, gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    script, (hold,) = gated_script(openai_stream(["old", " config", " answer"]), 2)
    gated.queue(script)
    async with FakeUpstream(Script(openai_stream(["new", " answer"]))) as fresh:
        config = _config({"old-model": "old"}, {"old": gated.base_url})
        async with gateway_process(config, tmp_path) as gw:
            path = tmp_path / "sluice.yaml"
            body = chat_body(model="old-model")
            async with http.post(f"{gw.v1}/chat/completions", json=body) as stream:
                assert stream.status == 200
                first = await stream.content.readuntil(b"\n\n")
                assert b'"role"' in first  # the stream is running, held after two events

                _write(path, _config({"new-model": "new"}, {"new": fresh.base_url}))
                gw.proc.send_signal(signal.SIGHUP)
                running = await _wait_running(http, gw.url, _sha(path))
                assert running["last_reload"]["result"] == "ok"

                status, answer = await _chat(http, gw.url, "new-model")
                assert status == 200, answer
                assert "".join(chat_contents(answer)) == "new answer"
                status, answer = await _chat(http, gw.url, "old-model")
                assert status == 404
                assert orjson.loads(answer)["error"]["code"] == "model_not_found"

                hold.set()  # the in-flight stream ends on the old route and upstream
                rest = await stream.content.read()
            assert "".join(chat_contents(first + rest)) == "old config answer"
            assert rest.endswith(DONE)
            assert len(gated.exchanges) == 1
            assert [e.body["model"] for e in fresh.exchanges] == ["new-model"]
            assert gw.proc.returncode is None
            assert (await _reloads(http, gw.url))["ok"] == 1
            assert await gw.stop() == 0


async def test_an_invalid_file_is_refused_and_the_running_config_serves(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        FakeUpstream() as fake,
        gateway_process(_config({"m": "up"}, {"up": fake.base_url}), tmp_path) as gw,
    ):
        path = tmp_path / "sluice.yaml"
        running = _sha(path)
        bad = _config({"m": "nowhere"}, {"up": fake.base_url})
        _write(path, bad)
        gw.proc.send_signal(signal.SIGHUP)
        body = await _wait_running(http, gw.url, running, result="invalid")

        assert body["sha256"] == running
        message = body["last_reload"]["message"]
        check = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "check-config",
            str(path),
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        _, stderr = await check.communicate()
        assert check.returncode == 1
        assert message == stderr.decode().strip()
        assert "routes[0].upstream: unknown upstream 'nowhere'" in message
        assert "config reload refused" in gw.log_text()
        assert message in gw.log_text()

        status, answer = await _chat(http, gw.url, "m")
        assert status == 200, answer
        assert (await _reloads(http, gw.url)) == {"ok": 0, "invalid": 1, "error": 0}
        assert gw.proc.returncode is None


async def test_a_watched_file_reloads_when_its_configmap_symlink_moves(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Kubelet's ConfigMap update: files live in a timestamped directory; `..data` is a
    symlink to it, swapped atomically; the mounted name links through `..data`."""
    async with FakeUpstream() as fake:
        mount = tmp_path / "mount"
        mount.mkdir()
        reload_settings = {"reload": {"watch": True, "interval_seconds": 0.1}}
        first = _config({"m": "up"}, {"up": fake.base_url})
        first["server"].update(reload_settings)
        second = _config({"m2": "up"}, {"up": fake.base_url})
        second["server"].update(reload_settings)
        _configmap_version(mount, "v1", first)
        (mount / "sluice.yaml").symlink_to("..data/sluice.yaml")
        async with gateway_process(first, tmp_path, config_path=mount / "sluice.yaml") as gw:
            assert (await _chat(http, gw.url, "m"))[0] == 200
            _configmap_version(mount, "v2", second)
            running = await _wait_running(http, gw.url, _sha(mount / "sluice.yaml"))
            assert running["last_reload"]["result"] == "ok"
            assert (await _chat(http, gw.url, "m2"))[0] == 200
            assert (await _chat(http, gw.url, "m"))[0] == 404


async def test_changed_keys_apply_after_reload(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    def config(*names: str) -> dict[str, Any]:
        keys = [{"name": name, "sha256": hash_key(f"sk-{name}")} for name in names]
        return {**_config({"m": "up"}, {"up": fake.base_url}), "teams": {"ml": {"keys": keys}}}

    async with FakeUpstream() as fake:
        path = _write(tmp_path / "sluice.yaml", config("old"))
        async with run_gateway(config("old")) as gw:
            reloader = Reloader(gw.state, path)
            assert (await _chat(http, gw.url, "m", "sk-old"))[0] == 200
            assert (await _chat(http, gw.url, "m", "sk-new"))[0] == 401
            _write(path, config("new"))
            outcome = await reloader.reload()
            assert outcome is not None
            assert outcome.result == "ok"
            assert (await _chat(http, gw.url, "m", "sk-new"))[0] == 200
            status, answer = await _chat(http, gw.url, "m", "sk-old")
            assert status == 401
            assert orjson.loads(answer)["error"]["code"] == "invalid_api_key"
            async with http.get(
                f"{gw.url}/v1/models", headers={"Authorization": "Bearer sk-new"}
            ) as resp:
                assert resp.status == 200


async def test_sighup_without_a_config_file_keeps_serving(http: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        async with asyncio.timeout(BOUND):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("Sluice listening on "), line
        url = line.split()[-1]
        proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(BOUND):
            while b"nothing to reload" not in await proc.stderr.readline():
                pass
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(BOUND):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _configmap_version(mount: Path, version: str, config: dict[str, Any]) -> None:
    """Write a new version directory and swap `..data` to it atomically."""
    directory = mount / f"..{version}"
    directory.mkdir()
    _write(directory / "sluice.yaml", config)
    link = mount / "..data_tmp"
    link.symlink_to(directory.name)
    os.replace(link, mount / "..data")
