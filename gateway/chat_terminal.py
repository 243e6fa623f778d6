"""The terminal side of `sluice chat`: output, the stats line, prompt input and Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

_DIM = "\x1b[2m"
_RED = "\x1b[31m"
_YELLOW = "\x1b[33m"
_RESET = "\x1b[0m"


@dataclass(slots=True)
class Reply:
    """What arrived of one answer, filled in while it streams (an interrupted one keeps it).

    Times are `time.perf_counter()` values: `started` when the request was sent, `first` and
    `last` when the first and last text delta arrived, `ended` when the answer was over.
    """

    started: float
    parts: list[str] = field(default_factory=list)
    first: float | None = None
    last: float | None = None
    ended: float | None = None
    deltas: int = 0
    usage_tokens: int | None = None  # completion_tokens from the server's usage chunk
    finish_reason: str | None = None
    done: bool = False  # the stream ended as it should (`[DONE]`, or EOF after a finish)
    interrupted: bool = False

    @property
    def text(self) -> str:
        """The answer so far."""
        return "".join(self.parts)

    def add(self, text: str, now: float) -> None:
        """Record one text delta that arrived at `now`."""
        if self.first is None:
            self.first = now
        self.last = now
        self.deltas += 1
        self.parts.append(text)


def stats_line(reply: Reply) -> str:
    """`ttft 252 ms | 56 tokens (usage) | 33.1 tok/s | total 2.10 s`.

    Tokens are the server's `usage.completion_tokens` when it sent a usage chunk, else the
    number of text deltas (said as "counted deltas"). Tokens/s is the decode rate: tokens
    after the first over the time from the first delta to the last.
    """
    end = reply.ended if reply.ended is not None else reply.last or reply.started
    total = f"total {_duration(end - reply.started)}"
    if reply.first is None or reply.last is None:
        return f"no tokens | {total}"
    if reply.usage_tokens is not None:
        tokens, source = reply.usage_tokens, "usage"
    else:
        tokens, source = reply.deltas, "counted deltas"
    span = reply.last - reply.first
    rate = f"{(tokens - 1) / span:.1f} tok/s" if tokens > 1 and span > 0 else "- tok/s"
    ttft = f"ttft {_duration(reply.first - reply.started)}"
    return f"{ttft} | {tokens} tokens ({source}) | {rate} | {total}"


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


class Terminal:
    """Answer text goes to `out` as it arrives; notices, errors and stats go to `err`.

    So `sluice chat --once "..." > answer.txt` keeps only the answer. Colours are used only
    when `color` is set (a terminal, and NO_COLOR unset).
    """

    def __init__(self, out: TextIO, err: TextIO, *, color: bool) -> None:
        self.out = out
        self.err = err
        self.color = color
        self._column0 = True  # the last thing written to `out` ended a line

    def text(self, text: str) -> None:
        """Write a piece of the answer now (write and flush per delta)."""
        self.out.write(text)
        self.out.flush()
        self._column0 = text.endswith("\n")

    def end_answer(self) -> None:
        """Finish the answer's line, if it did not end with a newline."""
        if not self._column0:
            self.text("\n")

    def dim(self, line: str) -> None:
        """A low-key line: the stats, the banner."""
        self._line(line, _DIM)

    def notice(self, line: str) -> None:
        """Something the user should see, e.g. that an answer was interrupted."""
        self._line(line, _YELLOW)

    def error(self, message: str, hint: str | None = None) -> None:
        """An error as one clear line (never a traceback), with an optional hint."""
        self._line(f"error: {message}", _RED)
        if hint:
            self._line(f"hint: {hint}", _DIM)

    def _line(self, line: str, style: str) -> None:
        self.end_answer()
        if self.color:
            line = f"{style}{line}{_RESET}"
        self.err.write(line + "\n")
        self.err.flush()


class Interrupted(Exception):
    """SIGINT (Ctrl-C) cancelled what `Interrupts.run` was running."""


class Interrupts:
    """SIGINT handled by the event loop for the whole session: it cancels what is current.

    The loop's handler is woken through its wakeup fd, so a Ctrl-C is never lost, whether it
    comes during an answer (which is then interrupted) or at the prompt (which then exits).
    A Ctrl-C between the two is kept and interrupts the next `run`.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None
        self._hit = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> Interrupts:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no loop signals: Windows
            loop.add_signal_handler(signal.SIGINT, self._on_sigint)
            self._loop = loop
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGINT)
            self._loop = None

    def _on_sigint(self) -> None:
        self._hit = True
        if self._task is not None:
            self._task.cancel()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` as a task that Ctrl-C cancels; raises Interrupted if it did."""
        if self._take_hit():
            coro.close()
            raise Interrupted
        task: asyncio.Task[T] = asyncio.create_task(coro)
        self._task = task
        try:
            return await task
        except asyncio.CancelledError:
            if self._hit and task.cancelled():
                raise Interrupted from None
            raise
        finally:
            self._task = None
            self._hit = False  # a Ctrl-C that came as the task ended was meant for it

    def _take_hit(self) -> bool:
        """Whether a Ctrl-C came while nothing ran (it is meant for what runs next)."""
        hit, self._hit = self._hit, False
        return hit


class Prompter:
    """Reads prompts, and owns the terminal's settings while it does (a context manager).

    Each line is read by a daemon thread, so the loop (and its SIGINT handler) keeps running
    and a read abandoned by Ctrl-C at the prompt does not keep the process alive. On a
    terminal `input()` gets readline's line editing and history; readline switches the
    terminal to raw mode while it reads, so the settings are saved at the start and put back
    at the end, after the abandoned read (if any) has set the terminal up, never before.
    """

    _SETUP_WAIT = 1.0  # seconds an exit waits for a just-started read to set the terminal up

    def __init__(self, interactive: bool, prompt: str = "you> ") -> None:
        self.interactive = interactive
        self.prompt = prompt
        self._reader: threading.Thread | None = None
        self._set_up = threading.Event()  # readline has prepared the terminal for this read
        self._readline: Any = None
        self._restore: Callable[[], None] | None = None

    def __enter__(self) -> Prompter:
        if self.interactive:
            with contextlib.suppress(ImportError):
                self._readline = importlib.import_module("readline")
                self._readline.set_pre_input_hook(self._set_up.set)
            with contextlib.suppress(ImportError, OSError):
                import termios

                fd = sys.stdin.fileno()
                saved = termios.tcgetattr(fd)
                self._restore = functools.partial(termios.tcsetattr, fd, termios.TCSADRAIN, saved)
        return self

    def __exit__(self, *exc: object) -> None:
        reader = self._reader
        if reader is not None and reader.is_alive():  # a read abandoned by Ctrl-C
            if self._readline is not None:
                self._set_up.wait(self._SETUP_WAIT)
            if self.interactive:
                _newline()  # the cursor is after the prompt
        if self._readline is not None:
            self._readline.set_pre_input_hook(None)
        if self._restore is not None:
            with contextlib.suppress(OSError):
                self._restore()

    async def read(self) -> str | None:
        """The next line of input; None at its end (Ctrl-D, or EOF of piped input)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str | None] = loop.create_future()

        def settle(value: str | None) -> None:
            if not done.done():
                done.set_result(value)

        def work() -> None:
            value: str | None
            try:
                if self.interactive:
                    try:
                        value = input(self.prompt)
                    except EOFError:  # Ctrl-D: the cursor is after the prompt
                        _newline()
                        raise
                else:
                    line = sys.stdin.readline()
                    value = line.rstrip("\r\n") if line else None
            except (EOFError, OSError, ValueError):
                value = None
            with contextlib.suppress(RuntimeError):  # the loop is gone: we are exiting
                loop.call_soon_threadsafe(settle, value)

        self._set_up.clear()
        self._reader = threading.Thread(target=work, name="sluice-chat-input", daemon=True)
        self._reader.start()
        return await done


def _newline() -> None:
    sys.stdout.write("\n")
    sys.stdout.flush()
