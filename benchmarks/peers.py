"""Other proxies to compare with, set up on demand; never part of CI.

    python -m benchmarks.peers setup     # nginx (Debian package) and LiteLLM's proxy (own venv)
    python -m benchmarks.peers status    # what `python -m benchmarks.run` will find

`python -m benchmarks.run` measures every peer it finds, in the same run and against the
same fake upstream as Sluice, and prints one line for each one it skips:

* ``nginx`` -- the ``nginx`` binary on ``PATH`` (``apt-get install nginx``), run as a plain
  reverse proxy with ``proxy_buffering off`` (the config is in ``benchmarks/targets.py``).
* ``litellm`` -- LiteLLM's proxy (``litellm[proxy]``, PyPI) in its own virtualenv at
  ``benchmarks/.peers/litellm`` (git-ignored), with one OpenAI-compatible model pointed at
  the fake upstream, no database, no master key, telemetry off and the model cost map read
  from the package (nothing is fetched at run time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.targets import LITELLM_VENV, litellm_binary, nginx_binary

LITELLM_REQUIREMENT = "litellm[proxy]"


def _run(argv: list[str], env: dict[str, str] | None = None) -> bool:
    print("+", " ".join(argv), flush=True)
    return subprocess.run(argv, check=False, env=env).returncode == 0


def setup_nginx() -> bool:
    """nginx from the Debian package (needs root and apt-get)."""
    if nginx_binary() is not None:
        print(f"nginx: already installed ({nginx_binary()})")
        return True
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        print("nginx: install it with your package manager, e.g. `apt-get install nginx`")
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    ok = _run(["apt-get", "update", "-qq"], env) and _run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx"], env
    )
    # The package may start a system nginx on port 80; the benchmark runs its own.
    subprocess.run(["service", "nginx", "stop"], check=False, capture_output=True)
    return ok and nginx_binary() is not None


def setup_litellm(requirement: str = LITELLM_REQUIREMENT) -> bool:
    """LiteLLM's proxy in its own virtualenv, so its dependencies never meet Sluice's."""
    if litellm_binary() is None:
        if not _run([sys.executable, "-m", "venv", str(LITELLM_VENV)]):
            return False
        pip = str(LITELLM_VENV / "bin" / "pip")
        if not _run([pip, "install", "-q", requirement]):
            return False
    binary = litellm_binary()
    print(f"litellm: {binary}" if binary else "litellm: installation failed")
    return binary is not None


def status() -> dict[str, Path | None]:
    """Where each peer was found (None: missing)."""
    nginx = nginx_binary()
    return {"nginx": Path(nginx) if nginx else None, "litellm": litellm_binary()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers", description=__doc__.splitlines()[0]
    )
    parser.add_argument("command", choices=["setup", "status"])
    parser.add_argument(
        "--litellm", default=LITELLM_REQUIREMENT, help="pip requirement for LiteLLM's proxy"
    )
    args = parser.parse_args(argv)
    if args.command == "setup":
        results = [setup_nginx(), setup_litellm(args.litellm)]
        return 0 if all(results) else 1
    for name, where in status().items():
        print(f"{name:8} {where or 'missing (python -m benchmarks.peers setup)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
