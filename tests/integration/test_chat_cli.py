"""`sluice chat` as a real subprocess against a real gateway on loopback.

Piped stdin (one prompt per line) for most tests; a pseudo-terminal where Ctrl-C must come
from the terminal itself (the tty driver turns the typed ^C into SIGINT).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from gateway.auth import hash_key
from gateway.chat_client import INTERRUPTED_MARK
from gateway.testing.fake_upstream import FakeUpstream, Script, openai_stream
from gateway.testing.harness import RunningGateway, run_gateway
from tests.integration._support import BOUND, GatedUpstream, closed_port, config_for, gated_script

REPO_ROOT = Path(__file__).resolve().parents[2]
STATS = re.compile(r"ttft \d+ ms \| (\d+) tokens \((usage|counted deltas)\) \| [\d.]+ tok/s")
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def _env(**extra: str) -> dict[str, str]:
    """The environment of a chat subprocess: this tree's code first on the path.

    No API keys, colours or PYTHONUNBUFFERED from the caller: the client must flush each
    delta itself for the streaming test to see it.
    """
    dropped = ("SLUICE_API_KEY", "OPENAI_API_KEY", "PYTHONUNBUFFERED")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    return {**env, "NO_COLOR": "1", **extra}


class Output:
    """Bytes collected from a stream as they arrive; waits until some text shows up."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.changed = asyncio.Event()
        self.closed = False

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        self.changed.set()

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    async def wait_for(self, text: str, times: int = 1) -> None:
        """Block until `text` was received `times` times (fails at the end, or after BOUND)."""
        try:
            async with asyncio.timeout(BOUND):
                while self.text.count(text) < times:
                    assert not self.closed, f"stream ended without {text!r}: {self.text!r}"
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {text!r} within {BOUND} s in {self.text!r}") from None


class Chat:
    """A `sluice chat` subprocess with piped stdin, stdout and stderr."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        assert proc.stderr is not None
        self.proc = proc
        self.out, self.err = Output(), Output()
        self._pumps = [
            asyncio.create_task(self._pump(proc.stdout, self.out)),
            asyncio.create_task(self._pump(proc.stderr, self.err)),
        ]

    @staticmethod
    async def _pump(stream: asyncio.StreamReader, into: Output) -> None:
        while chunk := await stream.read(4096):
            into.add(chunk)
        into.close()

    async def send(self, line: str) -> None:
        """Type one prompt."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def finish(self) -> int:
        """Close stdin (EOF) and wait for the exit code."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        async with asyncio.timeout(BOUND):
            code = await self.proc.wait()
            await asyncio.gather(*self._pumps)
        assert "Traceback" not in self.err.text, self.err.text
        return code


@asynccontextmanager
async def chat(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[Chat]:
    """Start `python -m gateway.cli chat ARGS`; killed at the end if still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "chat",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(**(env or {})),
    )
    client = Chat(proc)
    try:
        yield client
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.gather(*client._pumps)


async def run_once(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run chat to completion with empty stdin; returns (exit code, stdout, stderr)."""
    async with chat(*args, env=env) as client:
        code = await client.finish()
        return code, client.out.text, client.err.text


@asynccontextmanager
async def gateway_for(fake: FakeUpstream, **upstream: Any) -> AsyncIterator[RunningGateway]:
    async with run_gateway(config_for(fake, **upstream)) as gw:
        yield gw


# ----- answers, stats, history -----------------------------------------------------------


async def test_streams_answers_with_stats_and_sends_the_history(fake: FakeUpstream) -> None:
    fake.queue(
        Script(openai_stream(["Hel", "lo", " there"], usage=USAGE)),
        Script(openai_stream(["Second", " answer"])),  # no usage chunk: deltas are counted
    )
    async with (
        gateway_for(fake) as gw,
        chat(
            "--url", gw.url, "--model", "m", "--system", "Be brief.", "--max-tokens", "50"
        ) as client,
    ):
        await client.send("first question")
        await client.send("second question")
        assert await client.finish() == 0

    assert client.out.text == "Hello there\nSecond answer\n"
    stats = STATS.findall(client.err.text)
    assert stats == [("3", "usage"), ("2", "counted deltas")], client.err.text
    first, second = (exchange.body for exchange in fake.exchanges)
    assert first["stream"] is True
    assert first["stream_options"] == {"include_usage": True}
    assert first["max_tokens"] == 50
    assert first["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
    ]
    assert second["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "second question"},
    ]


async def test_tokens_are_printed_as_they_arrive(gated: GatedUpstream) -> None:
    script, (gate,) = gated_script(openai_stream(["early", " bird", " late"]), 3)
    gated.queue(script)
    async with gateway_for(gated) as gw, chat("--url", gw.url, "--once", "hi") as client:
        await client.out.wait_for("early bird")  # while the upstream holds " late"
        assert "late" not in client.out.text.replace("early bird", "")
        assert not gate.is_set()
        gate.set()
        await client.out.wait_for("early bird late\n")
        assert await client.finish() == 0
    assert STATS.search(client.err.text), client.err.text


async def test_default_model_is_the_first_listed_by_the_embedded_demo() -> None:
    text = resources.files("gateway").joinpath("default_config.yaml").read_text("utf-8")
    async with run_gateway(yaml.safe_load(text)) as gw:
        code, out, err = await run_once(
            "--url", f"{gw.url}/v1", "--max-tokens", "4", "--once", "hi"
        )
    assert code == 0, err
    assert out == "Hello from Sluice! This\n"
    assert STATS.findall(err) == [("4", "usage")], err
    assert "finish_reason=length" in err


# ----- Ctrl-C ----------------------------------------------------------------------------


async def test_sigint_mid_answer_interrupts_it_and_the_chat_goes_on(gated: GatedUpstream) -> None:
    held, _gates = gated_script(openai_stream(["Once", " upon", " a time"]), 3)
    gated.queue(held, Script(openai_stream(["The", " end"])))
    async with gateway_for(gated) as gw, chat("--url", gw.url, "--model", "m") as client:
        await client.send("tell me a story")
        await client.out.wait_for("Once upon")
        client.proc.send_signal(signal.SIGINT)
        await client.err.wait_for("interrupted")
        (exchange,) = await gated.wait_for_requests(1)
        async with asyncio.timeout(BOUND):
            await exchange.finished.wait()
        assert exchange.closed_by_peer  # the gateway hung up on the upstream
        await client.send("go on")
        await client.out.wait_for("The end")
        assert await client.finish() == 0

    assert client.out.text == "Once upon\nThe end\n"
    assert gated.exchanges[1].body["messages"] == [
        {"role": "user", "content": "tell me a story"},
        {"role": "assistant", "content": f"Once upon\n\n{INTERRUPTED_MARK}"},
        {"role": "user", "content": "go on"},
    ]
    assert STATS.findall(client.err.text) == [("2", "counted deltas"), ("2", "counted deltas")]


class Pty:
    """`sluice chat` on a pseudo-terminal: what it writes, and keys typed into it."""

    BOOT = (
        "import os, sys; os.login_tty(os.open(sys.argv[1], os.O_RDWR)); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
    )

    def __init__(self, master: int, slave: int, proc: asyncio.subprocess.Process) -> None:
        self.master = master
        self.slave = slave
        self.proc = proc
        self.screen = Output()
        asyncio.get_running_loop().add_reader(master, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self.master, 4096)
        except OSError:
            chunk = b""
        if chunk:
            self.screen.add(chunk)
        else:
            asyncio.get_running_loop().remove_reader(self.master)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    async def exit_code(self) -> int:
        try:
            async with asyncio.timeout(BOUND):
                return await self.proc.wait()
        except TimeoutError:
            raise AssertionError(f"still running, screen: {self.screen.text!r}") from None


@asynccontextmanager
async def chat_in_pty(*args: str) -> AsyncIterator[Pty]:
    """Run chat as the session leader of a new pty (so ^C typed there is a real SIGINT)."""
    master, slave = os.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        Pty.BOOT,
        os.ttyname(slave),
        "-m",
        "gateway.cli",
        "chat",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env=_env(TERM="dumb", NO_COLOR=""),
    )
    pty = Pty(master, slave, proc)
    try:
        yield pty
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        asyncio.get_running_loop().remove_reader(master)
        os.close(master)
        os.close(slave)  # held open until now, so reads never fail before the child opens it
    assert "Traceback" not in pty.screen.text, pty.screen.text


async def test_ctrl_c_typed_in_a_terminal(gated: GatedUpstream) -> None:
    held, _gates = gated_script(openai_stream(["Once", " upon", " a time"]), 3)
    gated.queue(held, Script(openai_stream(["The", " end"], usage=USAGE)))
    async with gateway_for(gated) as gw, chat_in_pty("--url", gw.url) as term:
        await term.screen.wait_for("you> ")
        term.type(b"tell me a story\r")
        await term.screen.wait_for("Once upon")
        term.type(b"\x03")  # Ctrl-C mid-answer
        await term.screen.wait_for("answer interrupted")
        (exchange,) = await gated.wait_for_requests(1)
        async with asyncio.timeout(BOUND):
            await exchange.finished.wait()
        assert exchange.closed_by_peer
        await term.screen.wait_for("you> ", times=2)  # a prompt again
        term.type(b"go on\r")
        await term.screen.wait_for("The end")
        await term.screen.wait_for("\x1b[2mttft")  # the stats line, dim
        term.type(b"\x03")  # Ctrl-C at the prompt (readline is reading) exits
        assert await term.exit_code() == 0
        lflag = termios.tcgetattr(term.slave)[3]
        assert lflag & termios.ICANON  # readline's terminal changes are undone
        assert lflag & termios.ECHO


async def test_ctrl_d_at_the_prompt_exits_cleanly() -> None:
    # With --model given nothing is sent before the first prompt: no gateway needed.
    async with chat_in_pty("--url", f"http://127.0.0.1:{closed_port()}", "--model", "m") as term:
        await term.screen.wait_for("you> ")
        term.type(b"\x04")
        assert await term.exit_code() == 0


# ----- errors ----------------------------------------------------------------------------


async def test_unknown_model_is_shown_as_a_message(fake: FakeUpstream) -> None:
    async with gateway_for(fake) as gw:
        code, out, err = await run_once("--url", gw.url, "--model", "nope", "--once", "hi")
    assert code == 1
    assert out == ""
    assert "error: 404 The model `nope` does not exist" in err
    assert "model_not_found" in err
    assert not fake.exchanges


async def test_connection_refused_hints_at_sluice_serve() -> None:
    code, out, err = await run_once("--url", f"http://127.0.0.1:{closed_port()}", "--once", "hi")
    assert out == ""
    assert code == 1
    assert "connection refused" in err
    assert "sluice serve" in err


async def test_error_event_mid_stream_then_the_next_prompt_works(fake: FakeUpstream) -> None:
    fake.queue(
        Script(openai_stream(["Half", " an"], done=False)[:3], then="reset"),
        Script(openai_stream(["Fine"])),
    )
    async with gateway_for(fake) as gw, chat("--url", gw.url, "--model", "m") as client:
        await client.send("first")
        await client.err.wait_for("error: the answer failed mid-stream")
        await client.send("second")
        await client.out.wait_for("Fine")
        assert await client.finish() == 1  # piped input: a failed answer fails the run

    assert client.out.text == "Half an\nFine\n"
    # The failed turn is left out of the history.
    assert fake.exchanges[1].body["messages"] == [{"role": "user", "content": "second"}]


async def test_api_key_from_the_environment(fake: FakeUpstream) -> None:
    key = "sk-sluice-chat-test-key"
    config = {
        **config_for(fake),
        "teams": {"t": {"keys": [{"name": "k", "sha256": hash_key(key)}]}},
    }
    async with run_gateway(config) as gw:
        code, _out, err = await run_once("--url", gw.url, "--once", "hi")
        assert code == 1
        assert "error: 401" in err
        assert "SLUICE_API_KEY" in err  # the hint
        code, out, err = await run_once(
            "--url", gw.url, "--once", "hi", env={"SLUICE_API_KEY": key}
        )
    assert code == 0, err
    assert out == "Hello world\n"
