"""A throwaway ``redis-server`` on a free loopback port, for tests.

    async with RedisServer() as server:
        client = Redis.from_url(server.url)
        await server.stop()    # an outage: connections are refused
        await server.start()   # back on the same port, empty (no persistence)
        server.pause()         # a hung server (SIGSTOP): connects, never answers
        server.resume()

``redis_url()`` is the same as a context manager that yields only the URL. The server
runs in a temporary directory with persistence off. Raises FileNotFoundError when the
binary is missing; whether that skips or fails a test is the test-suite's policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

__all__ = ["RedisServer", "redis_url"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process, restartable on the same port."""

    def __init__(self, binary: str = "redis-server", *, startup_timeout: float = 10.0) -> None:
        path = shutil.which(binary)
        if path is None:
            raise FileNotFoundError(f"{binary!r} not found on PATH (install redis-server)")
        self.binary = path
        self.startup_timeout = startup_timeout
        self.port = _free_port()
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive (paused counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    async def start(self) -> None:
        """Start the server (again, on the same port) and wait until PING answers."""
        if self.running:
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="sluice-redis-"))
        log = self._dir / "redis.log"
        self._proc = proc = await asyncio.to_thread(self._spawn, self._dir, log)
        self._paused = False
        deadline = time.monotonic() + self.startup_timeout
        while not await self._ping():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                await self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}")
            await asyncio.sleep(0.01)

    def _spawn(self, directory: Path, log: Path) -> subprocess.Popen[bytes]:
        args = [
            *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            *("--dir", str(directory)),
        ]
        with log.open("ab") as out:
            return subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=directory
            )

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(0.5):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    writer.write(b"PING\r\n")
                    await writer.drain()
                    answer = await reader.readline()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError):
            return False
        return answer.startswith(b"+PONG")

    async def stop(self, *, graceful: bool = False) -> None:
        """Stop the server: killed at once (an outage, a crash), or SIGTERM if graceful.

        Connections are refused until ``start``; the data is gone (no persistence).
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if graceful and not self._paused:
                proc.terminate()
            else:
                proc.kill()
            try:
                await asyncio.to_thread(proc.wait, 5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self._paused = False

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it accepts connections but never answers."""
        if self._proc is not None and self.running:
            os.kill(self._proc.pid, signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """Unfreeze a paused server (SIGCONT)."""
        if self._proc is not None and self._paused:
            os.kill(self._proc.pid, signal.SIGCONT)
            self._paused = False

    async def close(self) -> None:
        """Stop the server and remove its directory."""
        await self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def __aenter__(self) -> RedisServer:
        for attempt in range(3):
            try:
                await self.start()
                return self
            except RuntimeError:  # most likely the free port was taken meanwhile
                if attempt == 2:
                    await self.close()
                    raise
                self.port = _free_port()
            except BaseException:
                await self.close()
                raise
        raise AssertionError("unreachable")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


@contextlib.asynccontextmanager
async def redis_url(binary: str = "redis-server") -> AsyncIterator[str]:
    """Run a throwaway redis-server; yield its URL; stop it on exit."""
    async with RedisServer(binary) as server:
        yield server.url
