"""The `sluice` command line: check-config, serve's config handling, and one real serve run."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

import gateway.cli
from gateway.cli import main, parser
from tests.integration._process import gateway_process

REPO_ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
upstreams:
  sim:
    kind: demo
    ttft_ms: 0
    itl_ms: 0
routes:
  - model: demo
    upstream: sim
plugins:
  - name: latency
"""

BAD_ROUTE = """\
upstreams:
  sim: {kind: demo}
routes:
  - model: demo
    upstream: elsewhere
"""

BAD_PLUGIN_OPTION = """\
upstreams:
  sim: {kind: demo}
routes:
  - model: demo
    upstream: sim
plugins:
  - name: latency
    options: {colour: red}
"""


@pytest.fixture(autouse=True)
def _no_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() configures root logging; keep that from leaking into other tests."""

    def noop(**kwargs: Any) -> None:
        pass

    monkeypatch.setattr(logging, "basicConfig", noop)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sluice.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- check-config --------------------------------------------------------------------------


def test_check_config_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, GOOD)
    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: OK (1 upstreams, 1 routes, 1 global plugins)"
    assert err == ""


def test_check_config_bad_file_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, BAD_ROUTE)
    assert main(["check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("sluice: ")
    assert str(path) in err
    assert "routes[0].upstream" in err
    assert "'elsewhere'" in err


def test_check_config_validates_plugin_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, BAD_PLUGIN_OPTION)
    assert main(["check-config", str(path)]) == 1
    assert "plugins[0].options.colour: unknown key" in capsys.readouterr().err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.yaml"
    assert main(["check-config", str(path)]) == 1
    assert str(path) in capsys.readouterr().err


def test_check_config_example_needs_its_env_var(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = str(REPO_ROOT / "config.example.yaml")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["check-config", example]) == 1
    assert "OPENAI_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-real")
    assert main(["check-config", example]) == 0


EVERYTHING_WRONG = """\
upstreams:
  sim: {kind: demo, ttft_ms: -1}
routes:
  - model: demo
    upstream: sim
    plugins:
      - {name: latency, options: {colour: red}}
plugins:
  - name: latency
  - {name: latency, options: {colour: red}}
  - name: nosuch
  - name: content_filter
    options:
      rules: [{detector: api_key}, {detector: nope}, {name: w, words: 7}]
      prompt_action: maybe
"""

EVERYTHING_WRONG_PROBLEMS = [
    "upstreams.sim.ttft_ms: Input should be greater than or equal to 0",
    "plugins[1].options.colour: unknown key",
    "plugins[2].name: unknown plugin 'nosuch' (installed: ",
    "plugins[3].options.rules[1].detector: Input should be 'email', 'phone', 'credit_card' or",
    "plugins[3].options.rules[2].words: Input should be a valid list",
    "plugins[3].options.prompt_action: Input should be 'reject', 'redact' or 'off'",
    "routes[0].plugins[0].options.colour: unknown key",
]


def _report(err: str, path: Path) -> list[str]:
    """The problem lines of a `sluice: FILE: invalid configuration:` report."""
    head, *lines = err.rstrip("\n").split("\n")
    assert head == f"sluice: {path}: invalid configuration:"
    assert all(line.startswith("  ") for line in lines)
    return [line[2:] for line in lines]


@pytest.mark.parametrize("core_error", [True, False])
def test_check_config_reports_core_and_every_plugin_problem_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], core_error: bool
) -> None:
    text = EVERYTHING_WRONG if core_error else EVERYTHING_WRONG.replace("ttft_ms: -1", "ttft_ms: 0")
    expected = EVERYTHING_WRONG_PROBLEMS if core_error else EVERYTHING_WRONG_PROBLEMS[1:]
    path = _write(tmp_path, text)
    assert main(["check-config", str(path)]) == 1
    lines = _report(capsys.readouterr().err, path)
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start)


def test_check_config_reports_a_missing_variable_and_plugin_problems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SLUICE_TEST_UNSET", raising=False)
    text = BAD_PLUGIN_OPTION.replace("{colour: red}", "{colour: red, x: '${SLUICE_TEST_UNSET}'}")
    text += "  - {name: token_count, options: {image_tokens: '${SLUICE_TEST_UNSET}'}}\n"
    path = _write(tmp_path, text)
    assert main(["check-config", str(path)]) == 1
    assert _report(capsys.readouterr().err, path) == [
        "plugins[0].options.x: environment variable SLUICE_TEST_UNSET is not set",
        "plugins[1].options.image_tokens: environment variable SLUICE_TEST_UNSET is not set",
        "plugins[0].options.colour: unknown key",
        "plugins[0].options.x: unknown key",
    ]


# --- serve (in process, never binding) -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (BAD_ROUTE, "routes[0].upstream"),
        (BAD_PLUGIN_OPTION, "plugins[0].options.colour"),
        ("- not a mapping\n", "mapping"),
        ("routes: []\nroutes: []\n", "line 2, column 1: not valid YAML: duplicate key 'routes'"),
    ],
)
def test_serve_with_bad_config_returns_2_without_binding(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    needle: str,
) -> None:
    def must_not_run(*args: Any, **kwargs: Any) -> None:
        pytest.fail("serve tried to start the server with a bad config")

    monkeypatch.setattr(gateway.cli, "_run", must_not_run)
    path = _write(tmp_path, text)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sluice: ")
    assert needle in err


def test_serve_prints_the_same_full_report_as_check_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gateway.cli, "_run", lambda coro: pytest.fail("served a bad config"))
    path = _write(tmp_path, EVERYTHING_WRONG)
    assert main(["check-config", str(path)]) == 1
    checked = capsys.readouterr().err
    assert main(["serve", "--config", str(path)]) == 2
    assert capsys.readouterr().err == checked
    assert len(_report(checked, path)) == len(EVERYTHING_WRONG_PROBLEMS)


def test_serve_uses_config_host_and_port_unless_overridden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, int]] = []

    async def fake_serve(config: Any, host: str, port: int, **options: Any) -> None:
        seen.append((host, port))

    monkeypatch.setattr(gateway.cli, "serve", fake_serve)
    path = _write(tmp_path, GOOD + "server: {host: 0.0.0.0, port: 9123}\n")
    assert main(["serve", "--config", str(path)]) == 0
    assert main(["serve", "--config", str(path), "--host", "::1", "--port", "0"]) == 0
    assert seen == [("0.0.0.0", 9123), ("::1", 0)]


# --- parser --------------------------------------------------------------------------------


def test_parser_serve_options() -> None:
    args = parser().parse_args(
        ["serve", "--config", "conf.yaml", "--host", "0.0.0.0", "--port", "9000"]
    )
    assert args.command == "serve"
    assert args.config == Path("conf.yaml")
    assert args.host == "0.0.0.0"
    assert args.port == 9000


def test_parser_serve_defaults() -> None:
    args = parser().parse_args(["serve"])
    assert args.config is None
    assert args.host is None
    assert args.port is None
    assert args.log_level == "INFO"


def test_parser_check_config_takes_a_path() -> None:
    args = parser().parse_args(["check-config", "x.yaml"])
    assert args.file == Path("x.yaml")


@pytest.mark.parametrize("argv", [[], ["serve", "--port", "eighty"], ["check-config"], ["nope"]])
def test_parser_rejects_bad_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(argv)
    assert info.value.code == 2
    assert "usage: sluice" in capsys.readouterr().err


# --- serve (real process) ------------------------------------------------------------------

LISTENING = re.compile(rb"Sluice listening on http://127\.0\.0\.1:(\d+)")


async def _wait_for_port(proc: asyncio.subprocess.Process) -> int:
    assert proc.stdout is not None
    seen: list[bytes] = []
    async with asyncio.timeout(30):
        while line := await proc.stdout.readline():
            seen.append(line)
            if match := LISTENING.search(line):
                return int(match.group(1))
    pytest.fail(f"server exited before announcing its port: {b''.join(seen)!r}")


async def test_serve_subprocess_streams_the_demo_and_stops_on_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env,
    )
    try:
        port = await _wait_for_port(proc)
        assert port > 0
        base = f"http://127.0.0.1:{port}"
        request = {
            "model": "demo",
            "stream": True,
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}],
        }
        async with asyncio.timeout(30), aiohttp.ClientSession() as session:
            async with session.get(f"{base}/readyz") as ready:
                assert ready.status == 200
                assert await ready.json() == {"ready": True}
            async with session.post(f"{base}/v1/chat/completions", json=request) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/event-stream"
                body = await resp.read()
        assert b'"chat.completion.chunk"' in body
        assert body.rstrip().endswith(b"data: [DONE]")

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            code = await proc.wait()
        assert code == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        assert proc.stdout is not None
        assert proc.stderr is not None
        await proc.stdout.read()
        await proc.stderr.read()


def test_tokenizers_download_fills_a_cache_dir_from_a_mirror(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sluice tokenizers download` writes tiktoken's cache layout; `status` then sees it."""
    import tiktoken_ext

    from plugins.token_count.files import _BLOBS

    shipped = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    mirror = tmp_path / "mirror"
    blob = mirror / _BLOBS["cl100k_base"].path.lstrip("/")
    blob.parent.mkdir(parents=True)
    blob.write_bytes(shipped.read_bytes())
    cache = tmp_path / "cache"
    argv = ["tokenizers", "download", str(cache), "--names", "cl100k_base"]
    assert main([*argv, "--source", mirror.as_uri()]) == 0
    assert main(["tokenizers", "status", str(cache), "--names", "p50k_base"]) == 1  # missing
    out = capsys.readouterr().out
    assert "cl100k_base: cached" in out
    assert "o200k_base: bundled" in out  # the bpe-openai package ships it
    assert "p50k_base: missing" in out


def test_tokenizers_download_takes_packaged_files_without_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --source, o200k_base and cl100k_base come from the bpe-openai package: the
    command works offline, says where each file came from, and `status` sees them cached."""
    cache = tmp_path / "cache"
    assert main(["tokenizers", "download", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "o200k_base: copied from the bpe_openai package" in out
    assert "cl100k_base: copied from the bpe_openai package" in out
    assert main(["tokenizers", "status", str(cache)]) == 0  # what current models use
    assert main(["tokenizers", "status", str(cache), "--names", "r50k_base"]) == 1
    status = capsys.readouterr().out
    assert "o200k_base: cached" in status
    assert "cl100k_base: cached" in status


def test_tokenizers_download_failure_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["tokenizers", "download", str(tmp_path), "--names", "cl100k_base"]
    assert main([*argv, "--source", (tmp_path / "no-such-mirror").as_uri()]) == 1
    assert "tokenizer download failed" in capsys.readouterr().err


# --- the open-files limit ------------------------------------------------------------------


class _FakeLimits:
    """Stands in for resource.getrlimit/setrlimit (RLIMIT_NOFILE only)."""

    def __init__(self, soft: int, hard: int, *, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        if self.refuse:
            raise ValueError("not allowed")
        self.soft, self.hard = limits


@pytest.mark.parametrize(
    ("soft", "hard", "raised"),
    [
        pytest.param(1024, 65536, (1024, 65536), id="soft-below-hard"),
        pytest.param(65536, 65536, None, id="already-at-hard"),
        pytest.param(1024, resource.RLIM_INFINITY, (1024, 1 << 20), id="hard-unlimited"),
        pytest.param(resource.RLIM_INFINITY, resource.RLIM_INFINITY, None, id="unlimited"),
    ],
)
def test_raise_open_files_limit(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    soft: int,
    hard: int,
    raised: tuple[int, int] | None,
) -> None:
    limits = _FakeLimits(soft, hard)
    monkeypatch.setattr(resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", limits.setrlimit)
    with caplog.at_level(logging.INFO, logger="sluice"):
        assert gateway.cli.raise_open_files_limit() == raised
    if raised is None:
        assert (limits.soft, limits.hard) == (soft, hard)
        assert caplog.records == []
    else:
        assert (limits.soft, limits.hard) == (raised[1], hard)
        assert caplog.messages == [
            f"raised the open-files limit (RLIMIT_NOFILE) from {raised[0]} to {raised[1]}"
        ]


def test_raise_open_files_limit_refused_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    limits = _FakeLimits(1024, 4096, refuse=True)
    monkeypatch.setattr(resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", limits.setrlimit)
    with caplog.at_level(logging.INFO, logger="sluice"):
        assert gateway.cli.raise_open_files_limit() is None
    assert limits.soft == 1024
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "could not raise the open-files limit from 1024 to 4096" in record.getMessage()


async def test_serve_raises_its_soft_open_files_limit_to_the_hard_one(tmp_path: Path) -> None:
    """Started from a shell with a low `ulimit -n`, the gateway lifts its own soft limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    start = 256
    if hard != resource.RLIM_INFINITY and hard <= start:
        pytest.skip(f"the hard open-files limit ({hard}) leaves nothing to raise")
    target = (1 << 20) if hard == resource.RLIM_INFINITY else hard
    async with gateway_process(yaml.safe_load(GOOD), tmp_path, nofile_soft=start) as gw:
        assert gw.nofile() == (target, hard)
        log_text = gw.log_text()
    assert f"raised the open-files limit (RLIMIT_NOFILE) from {start} to {target}" in log_text


def test_settle_garbage_collector_freezes_start_up_objects() -> None:
    import gc

    from gateway.cli import settle_garbage_collector

    before = gc.get_threshold()
    try:
        settle_garbage_collector()
        assert gc.get_freeze_count() > 10_000  # the modules and objects built so far
        assert gc.get_threshold()[0] == 10_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
