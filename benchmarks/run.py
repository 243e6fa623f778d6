"""Sluice streaming benchmark: direct vs bare aiohttp proxy vs Sluice (vs peers if installed).

    python -m benchmarks.run [--quick] [--json PATH] [--config PATH] [--targets direct,bare,...]

`sluice` is the default config (one route, no plugins); `production` is what a platform team
runs (benchmarks/configs/production.yaml: a hashed key, token_count, rate_limit on a
redis-server the run starts itself, access_log to a file, latency).

Peers (nginx, LiteLLM's proxy) are measured when installed: python -m benchmarks.peers setup.

See benchmarks/README.md for what every number means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks._runtime import raise_fd_limit, run
from benchmarks.orchestrate import READY_TIMEOUT_S, Context, run_targets
from benchmarks.phases import FakeControl, Plan
from benchmarks.report import (
    build_rows,
    criteria_summary,
    derived,
    peer_ratios,
    render_peer_ratios,
    render_table,
)
from benchmarks.targets import LOOPBACK, REPO_ROOT, fake_process, free_port, launch
from gateway.testing.redis_server import RedisServer

KNOWN_TARGETS = ("direct", "bare", "sluice", "production", "nginx", "litellm")
DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "latest.json"
RUN_BUDGET_S = 900.0  # a hard ceiling; a healthy full run takes about 2.5 minutes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run (CI)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    parser.add_argument(
        "--config",
        type=Path,
        help="Sluice config to use as is: route model 'bench', "
        "upstream base_url: ${SLUICE_BENCH_UPSTREAM}",
    )
    parser.add_argument(
        "--targets",
        default=",".join(KNOWN_TARGETS),
        help="comma-separated subset of " + ",".join(KNOWN_TARGETS) + " (default: all)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a Sluice target is missed"
    )
    args = parser.parse_args(argv)
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(names) - set(KNOWN_TARGETS))
    if unknown or not names:
        parser.error(f"--targets: unknown {unknown}; choose from {', '.join(KNOWN_TARGETS)}")
    args.target_names = [t for t in KNOWN_TARGETS if t in names]
    if args.config is not None and not args.config.is_file():
        parser.error(f"--config: {args.config} is not a file")
    return args


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _meta(args: argparse.Namespace, plan: Plan, fd_limit: int) -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": _git_revision(),
        "quick": bool(args.quick),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "aiohttp": aiohttp.__version__,
        "fd_limit": fd_limit,
        "sluice_config": str(args.config) if args.config else "generated",
        "plan": asdict(plan),
    }


async def run_all(args: argparse.Namespace, plan: Plan, workdir: Path) -> dict[str, Any]:
    """Start the fake upstream, run the targets, always stop everything."""
    fake_port = free_port()
    fake_proc = fake_process(workdir, fake_port)
    await launch(fake_proc, f"http://{LOOPBACK}:{fake_port}/readyz", READY_TIMEOUT_S)
    try:
        fake = FakeControl(f"http://{LOOPBACK}:{fake_port}", fake_proc.pid)
        ctx = Context(plan, workdir, fake, fake_port, args.config)
        async with contextlib.AsyncExitStack() as stack:
            if "production" in args.target_names:
                redis = await stack.enter_async_context(RedisServer())
                ctx.redis_url = redis.url
            async with asyncio.timeout(RUN_BUDGET_S):
                return await run_targets(ctx, args.target_names)
    finally:
        fake_proc.stop()


def _save_logs(workdir: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for log in workdir.glob("*.log"):
        shutil.copy(log, dest / log.name)


def _problems(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, res in results.items():
        if "skipped" in res:
            lines.append(f"{name}: skipped ({res['skipped']})")
        elif "error" in res:
            lines.append(f"{name}: ERROR {res['error']}")
        if res.get("correctness") not in (None, "ok"):
            lines.append(f"{name}: stream not relayed intact: {res['correctness']}")
        phases = [("memory", res.get("memory")), ("saturation", res.get("saturation"))]
        phases += [(f"latency {k}", v) for k, v in (res.get("latency") or {}).items()]
        for phase, data in phases:
            if isinstance(data, dict) and data.get("errors"):
                lines.append(f"{name} {phase}: errors {data['errors']}")
    return lines


def print_report(report: dict[str, Any], columns: list[str]) -> None:
    plan = report["meta"]["plan"]
    print()
    print(
        f"Sluice streaming benchmark ({'quick' if report['meta']['quick'] else 'full'} run,"
        f" {report['meta']['cpus']} CPUs, Python {report['meta']['python']},"
        f" git {report['meta']['git']})"
    )
    print(
        f"NOTE: the load generator, the fake upstream and the proxy under test share the same"
        f" {report['meta']['cpus']} CPU cores; compare columns, not absolute capacity."
    )
    print(
        f"latency {plan['latency_s']:.0f}s per concurrency and saturation"
        f" {plan['saturation_s']:.0f}s per target, in {plan['rounds']} round(s)"
        " alternating target order;"
        f" memory {plan['memory_streams']} streams; 'added' = through-proxy minus direct."
    )
    print()
    print(report["table"])
    print()
    if report["peers_table"]:
        print(report["peers_table"])
        print()
    for line in report["problems"]:
        print(line)
    verdicts = [c["result"] for c in report["criteria"]]
    print(f"Sluice targets: {verdicts.count('PASS')} pass, {verdicts.count('FAIL')} fail,"
          f" {verdicts.count('n/a')} n/a")  # fmt: skip


async def main_async(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    fd_limit = raise_fd_limit()
    plan = Plan.quick() if args.quick else Plan()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        workdir = Path(tmp)
        try:
            results = await run_all(args, plan, workdir)
        finally:
            _save_logs(workdir, args.json.parent / "logs")
    columns = [n for n in args.target_names if "skipped" not in results.get(n, {})]
    rows = build_rows(plan.latency_concurrency)
    report: dict[str, Any] = {
        "meta": _meta(args, plan, fd_limit),
        "targets": results,
        "criteria": criteria_summary(results, rows),
        "table_values": derived(results, rows),
        "table": render_table(results, columns, rows),
        "peers": peer_ratios(results, rows),
        "peers_table": render_peer_ratios(results, rows, columns),
        "problems": _problems(results),
        "elapsed_s": time.perf_counter() - started,
    }
    print_report(report, columns)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"JSON written to {args.json} (total {report['elapsed_s']:.0f}s)")
    broken = any("error" in r or r.get("correctness", "ok") != "ok" for r in results.values())
    missed = args.strict and any(c["result"] == "FAIL" for c in report["criteria"])
    return 1 if broken or missed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every process started by the benchmark was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
