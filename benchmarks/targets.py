"""Starting, probing and stopping the processes under test (all on loopback).

Every process is started in its own session (process group) with stdout/stderr going to a log
file in the run's temporary directory, and is asked to die with its parent (PR_SET_PDEATHSIG).
`ManagedProcess.stop()` sends SIGTERM to the group, then SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
UPSTREAM_ENV = "SLUICE_BENCH_UPSTREAM"
STOP_GRACE_S = 5.0
PR_SET_PDEATHSIG = 1


class StartError(Exception):
    """A process under test did not become ready."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """A currently free loopback TCP port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ManagedProcess:
    """A child process we own: started once, stopped for sure."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    spawned_at: float = 0.0

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.spawned_at = time.perf_counter()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after a grace period; reap the child."""
        if self.popen is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                continue
            break
        # The leader is reaped; make sure nothing else of its group survives.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


async def wait_ready(proc: ManagedProcess, url: str, timeout_s: float) -> float:
    """Poll GET `url` until it answers 200; seconds since spawn. StartError on exit/timeout."""
    deadline = proc.spawned_at + timeout_s
    timeout = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.perf_counter() < deadline:
            code = proc.exit_code()
            if code is not None:
                raise StartError(f"{proc.name} exited with code {code}:\n{proc.log_tail()}")
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    if resp.status == 200:
                        return time.perf_counter() - proc.spawned_at
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(0.005)
    raise StartError(f"{proc.name} not ready after {timeout_s:.0f}s:\n{proc.log_tail()}")


async def launch(proc: ManagedProcess, ready_url: str, timeout_s: float = 30.0) -> float:
    """Start `proc` and wait until ready; on failure stop it and re-raise."""
    proc.start()
    try:
        return await wait_ready(proc, ready_url, timeout_s)
    except BaseException:
        proc.stop()
        raise


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def fake_process(workdir: Path, port: int) -> ManagedProcess:
    argv = _python("benchmarks.fake_upstream", "--host", LOOPBACK, "--port", str(port))
    return ManagedProcess("fake-upstream", argv, workdir / "fake.log", _child_env(), REPO_ROOT)


def bare_process(workdir: Path, port: int, fake_port: int) -> ManagedProcess:
    upstream = f"http://{LOOPBACK}:{fake_port}"
    argv = _python(
        "benchmarks.bare_proxy", "--host", LOOPBACK, "--port", str(port), "--upstream", upstream
    )
    return ManagedProcess("bare", argv, workdir / "bare.log", _child_env(), REPO_ROOT)


SLUICE_CONFIG = """\
# Generated by benchmarks/run.py.
upstreams:
  fake:
    kind: openai
    base_url: http://127.0.0.1:{fake_port}/v1
    # Sluice's default (256) caps concurrent upstream streams; the memory phase holds 1000.
    max_connections: {max_connections}
routes:
  - model: bench
    upstream: fake
"""


PRODUCTION_CONFIG = REPO_ROOT / "benchmarks" / "configs" / "production.yaml"
REDIS_ENV = "SLUICE_BENCH_REDIS"
LOGDIR_ENV = "SLUICE_BENCH_LOGDIR"


def sluice_process(
    workdir: Path,
    port: int,
    fake_port: int,
    config: Path | None,
    max_connections: int = 2048,
    *,
    name: str = "sluice",
    env: dict[str, str] | None = None,
) -> ManagedProcess:
    """`sluice serve`; with `config` the file is used as is and SLUICE_BENCH_UPSTREAM is set
    (plus `env`: the production target's Redis URL and log directory)."""
    if config is None:
        config = workdir / "sluice.yaml"
        text = SLUICE_CONFIG.format(fake_port=fake_port, max_connections=max_connections)
        config.write_text(text)
    argv = _python(
        "gateway.cli", "serve", "--config", str(config), "--host", LOOPBACK, "--port", str(port)
    )
    child_env = _child_env({UPSTREAM_ENV: f"http://{LOOPBACK}:{fake_port}/v1", **(env or {})})
    return ManagedProcess(name, argv, workdir / f"{name}.log", child_env, REPO_ROOT)


def production_process(workdir: Path, port: int, fake_port: int, redis_url: str) -> ManagedProcess:
    """`sluice serve` with benchmarks/configs/production.yaml on the run's own Redis."""
    logdir = workdir / "production-logs"
    logdir.mkdir(exist_ok=True)
    env = {REDIS_ENV: redis_url, LOGDIR_ENV: str(logdir)}
    return sluice_process(workdir, port, fake_port, PRODUCTION_CONFIG, name="production", env=env)


NGINX_CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream fake {{
        server 127.0.0.1:{fake_port};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /readyz {{ return 200 "ok\\n"; }}
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx")


def nginx_process(workdir: Path, port: int, fake_port: int) -> ManagedProcess:
    """nginx as one non-daemon process (master_process off) proxying with buffering off."""
    binary = nginx_binary()
    if binary is None:
        raise StartError("nginx: not installed")
    prefix = workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONFIG.format(dir=prefix, port=port, fake_port=fake_port))
    argv = [binary, "-p", str(prefix), "-c", str(conf)]
    return ManagedProcess("nginx", argv, workdir / "nginx.log", _child_env(), prefix)


PEERS_DIR = REPO_ROOT / "benchmarks" / ".peers"
LITELLM_VENV = PEERS_DIR / "litellm"
LITELLM_READY_PATH = "/health/liveliness"

LITELLM_CONFIG = """\
# Generated by benchmarks/run.py: one OpenAI-compatible model on the fake upstream.
model_list:
  - model_name: bench
    litellm_params:
      model: openai/bench
      api_base: http://127.0.0.1:{fake_port}/v1
      api_key: sk-bench-not-a-key
litellm_settings:
  telemetry: false
  drop_params: true
  set_verbose: false
  json_logs: false
general_settings:
  master_key: sk-bench-not-a-key  # what the load generator sends; LiteLLM needs one to start
  disable_spend_logs: true
"""

_LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the cost map shipped in the package, no fetch
    "LITELLM_LOG": "ERROR",
    "LITELLM_TELEMETRY": "False",
    "DISABLE_ADMIN_UI": "True",
    "NO_DOCS": "True",
    "NO_REDOC": "True",
}


def litellm_binary() -> Path | None:
    """LiteLLM's proxy CLI in the benchmark's own virtualenv (benchmarks.peers setup)."""
    binary = LITELLM_VENV / "bin" / "litellm"
    return binary if binary.is_file() else None


def litellm_process(workdir: Path, port: int, fake_port: int) -> ManagedProcess:
    """LiteLLM's proxy, one worker, no database, model `bench` on the fake upstream."""
    binary = litellm_binary()
    if binary is None:
        raise StartError("litellm: not installed")
    config = workdir / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(fake_port=fake_port))
    argv = [str(binary), "--config", str(config), "--host", LOOPBACK, "--port", str(port)]
    argv += ["--num_workers", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATABASE_URL")}
    env.update(_LITELLM_ENV)
    return ManagedProcess("litellm", argv, workdir / "litellm.log", env, workdir)


ProcessFactory = Callable[[int], ManagedProcess]


async def launch_repeatedly(
    factory: ProcessFactory, repeats: int, timeout_s: float, ready_path: str = "/readyz"
) -> tuple[ManagedProcess, int, list[float]]:
    """Spawn `repeats` times measuring spawn-to-ready; keep the last one running."""
    times: list[float] = []
    for attempt in range(max(1, repeats)):
        port = free_port()
        proc = factory(port)
        startup = await launch(proc, f"http://{LOOPBACK}:{port}{ready_path}", timeout_s)
        times.append(startup)
        if attempt == max(1, repeats) - 1:
            return proc, port, times
        proc.stop()
    raise AssertionError("unreachable")
