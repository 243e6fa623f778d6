"""Claude Code, the real one from npm, against a gateway in front of a fake Anthropic upstream.

Opt-in (`SLUICE_AGENTS=1`; deselected otherwise, never skipped): the test installs
`@anthropic-ai/claude-code` with npm into `SLUICE_AGENTS_PREFIX` (default
`~/.cache/sluice-agents`) unless it is there, then runs `claude -p` non-interactively with
`ANTHROPIC_BASE_URL` pointed at the gateway. The fake answers every Messages request with
a short text (streamed when asked) and records what it received.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.testing.fake_upstream import Exchange, FakeUpstream, Script, json_script
from gateway.testing.harness import run_gateway
from tests.integration.provider_fakes import (
    anthropic_message,
    anthropic_message_end,
    anthropic_message_start,
    anthropic_text_block,
    root_url,
)

pytestmark = pytest.mark.agents

ANSWER = "Hi from the fake upstream."
PACKAGE = "@anthropic-ai/claude-code"


def _prefix() -> Path:
    default = Path.home() / ".cache" / "sluice-agents"
    return Path(os.environ.get("SLUICE_AGENTS_PREFIX", str(default)))


async def _claude() -> Path:
    """The `claude` binary, installed with npm into the prefix if missing."""
    binary = _prefix() / "node_modules" / ".bin" / "claude"
    if not binary.exists():
        npm = shutil.which("npm")
        assert npm is not None, "SLUICE_AGENTS=1 needs npm on PATH"
        process = await asyncio.create_subprocess_exec(
            npm, "install", "--prefix", str(_prefix()), PACKAGE
        )
        assert await asyncio.wait_for(process.wait(), 600) == 0
    return binary


def _answer(exchange: Exchange) -> Script:
    body = exchange.body if isinstance(exchange.body, dict) else {}
    if exchange.path.endswith("/count_tokens"):
        return json_script({"input_tokens": 100})
    if body.get("stream"):
        events = [
            anthropic_message_start(model=str(body.get("model"))),
            *anthropic_text_block(0, [ANSWER[:8], ANSWER[8:]], ping=True),
            *anthropic_message_end("end_turn", 7),
        ]
        return Script(events)
    return json_script(anthropic_message([{"type": "text", "text": ANSWER}]))


async def test_claude_code_completes_a_prompt_through_the_native_lane(tmp_path: Path) -> None:
    claude = await _claude()
    async with FakeUpstream(responder=_answer) as fake:
        config: dict[str, Any] = {
            "upstreams": {
                "claude": {"kind": "anthropic", "base_url": root_url(fake), "api_key": "sk-ant-x"}
            },
            # Claude Code asks for several models (main, small/fast): route them all.
            "routes": [{"model_prefix": "claude-", "upstream": "claude", "retries": 0}],
        }
        async with run_gateway(config) as gw:
            env = {
                "PATH": os.environ.get("PATH", ""),
                "HOME": str(tmp_path),
                "ANTHROPIC_BASE_URL": gw.url,
                "ANTHROPIC_API_KEY": "sk-ant-client-test",
                "DISABLE_TELEMETRY": "1",
                "DISABLE_AUTOUPDATER": "1",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            }
            process = await asyncio.create_subprocess_exec(
                str(claude),
                "-p",
                "say hi",
                "--max-turns",
                "1",
                "--output-format",
                "json",
                env=env,
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, (out + err).decode(errors="replace")
    result = orjson.loads(out)
    assert result["is_error"] is False, result
    assert ANSWER in result["result"]
    main = [e for e in fake.exchanges if e.path == "/v1/messages" and e.body.get("tools")]
    assert main, [e.path for e in fake.exchanges]
