"""A real `sluice serve` in a subprocess, so its RSS, file descriptors and limits are its own.

    async with gateway_process(config, tmp_path) as gw:
        gw.url, gw.rss(), gw.fd_targets(), gw.nofile(), await gw.stats()

`probe=True` runs it through `tests.integration._probe_serve`, which adds a side channel
for asyncio tasks and live objects (`stats()`); without it the command is exactly
`python -m gateway.cli serve --config FILE --host 127.0.0.1 --port 0`. Its output goes to
a log file (read with `log_text()`), never to a pipe nobody drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"Sluice listening on (http://[^\s\"]+)")  # plain or JSON lines
STARTUP_SECONDS = 30.0  # imports and tokenizer loading on a busy 2-core machine


def raise_nofile_limit(needed: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to at least `needed` (up to the hard limit).

    Returns the (soft, hard) limits in force afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = hard if hard != resource.RLIM_INFINITY else max(needed, soft)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = min(needed, ceiling)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft, hard


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text as {sample name: [(labels, value), ...]}."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


@dataclass
class GatewayProcess:
    """A running gateway subprocess."""

    proc: asyncio.subprocess.Process
    url: str
    log_path: Path
    probe_port: int | None

    @property
    def pid(self) -> int:
        """The gateway's process id."""
        return self.proc.pid

    @property
    def v1(self) -> str:
        """The OpenAI-compatible base URL."""
        return f"{self.url}/v1"

    def log_text(self) -> str:
        """Everything the gateway wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def rss(self) -> int:
        """Resident set size in bytes (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    def fd_targets(self) -> list[str]:
        """What every open file descriptor points at (`socket:[inode]`, paths, pipes)."""
        targets = []
        fd_dir = Path(f"/proc/{self.pid}/fd")
        for entry in fd_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):  # closed while listing
                targets.append(os.readlink(entry))
        return sorted(targets)

    def nofile(self) -> tuple[int, int]:
        """The process's (soft, hard) open-files limit, from /proc/PID/limits."""
        for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return _limit(soft), _limit(hard)
        raise AssertionError("no open-files line in /proc limits")

    async def stats(self) -> dict[str, Any]:
        """Tasks and live objects inside the gateway (needs `probe=True`)."""
        assert self.probe_port is not None, "start the gateway with probe=True"
        reader, writer = await asyncio.open_connection("127.0.0.1", self.probe_port)
        try:
            writer.write(b"stats\n")
            await writer.drain()
            answer: dict[str, Any] = orjson.loads(await reader.readline())
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        return answer

    async def stop(self, within: float = 15.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL after `within` seconds; the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(within):
                    return await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
        return await self.proc.wait()


def _limit(text: str) -> int:
    return resource.RLIM_INFINITY if text == "unlimited" else int(text)


@asynccontextmanager
async def gateway_process(
    config: Mapping[str, Any],
    directory: Path,
    *,
    probe: bool = False,
    nofile_soft: int | None = None,
    log_level: str = "INFO",
    env: Mapping[str, str] | None = None,
    config_path: Path | None = None,
) -> AsyncIterator[GatewayProcess]:
    """Start `sluice serve` on a free loopback port with `config`; stop it on exit.

    `nofile_soft` starts it with that soft open-files limit (the hard one unchanged).
    `config_path`: serve this existing file instead of writing `config` to
    `directory/sluice.yaml`.
    """
    if config_path is None:
        config_path = directory / "sluice.yaml"
        config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    log_path = directory / "gateway.log"
    port_file = directory / "probe.port"
    port_file.unlink(missing_ok=True)
    sluice_args = ["--log-level", log_level, "serve", "--config", str(config_path)]
    sluice_args += ["--host", "127.0.0.1", "--port", "0"]
    if probe:
        command = [sys.executable, "-m", "tests.integration._probe_serve", str(port_file)]
    else:
        command = [sys.executable, "-m", "gateway.cli"]
    if nofile_soft is not None:  # as a shell with a low `ulimit -n` would start it
        command = ["sh", "-c", f'ulimit -S -n {int(nofile_soft)} && exec "$0" "$@"', *command]
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    with _open_log(log_path) as log_file:
        proc = await asyncio.create_subprocess_exec(
            *command,
            *sluice_args,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            cwd=directory,
            env=child_env,
        )
    gateway: GatewayProcess | None = None
    try:
        url = await _wait_listening(proc, log_path)
        probe_port = await _wait_probe(proc, port_file) if probe else None
        gateway = GatewayProcess(proc, url, log_path, probe_port)
        yield gateway
    finally:
        if gateway is None:
            gateway = GatewayProcess(proc, "", log_path, None)
        await gateway.stop()


def _open_log(path: Path) -> BinaryIO:
    return path.open("wb")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return None


async def _wait_listening(proc: asyncio.subprocess.Process, log_path: Path) -> str:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        text = _read(log_path) or ""
        if found := _LISTENING.search(text):
            return found.group(1)
        if proc.returncode is not None or time.monotonic() > deadline:
            exit_code = proc.returncode
            raise AssertionError(f"sluice serve did not start (exit {exit_code}):\n{text[-3000:]}")
        await asyncio.sleep(0.05)


async def _wait_probe(proc: asyncio.subprocess.Process, port_file: Path) -> int:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        text = _read(port_file)
        if text:
            return int(text)
        if proc.returncode is not None or time.monotonic() > deadline:
            raise AssertionError("the probe side channel did not start")
        await asyncio.sleep(0.05)
