"""`sluice chat`: a terminal client that streams answers from an OpenAI-compatible gateway.

One conversation per run. Each answer is printed delta by delta as it arrives. Ctrl-C during
an answer stops it (the HTTP stream is closed, so the gateway cancels the upstream) and the
partial answer stays in the history, marked interrupted; Ctrl-C or Ctrl-D at the prompt exits.
With stdin not a terminal every line is one prompt; `--once` answers one prompt and exits.

Everything runs on one event loop whose SIGINT handler cancels what is current, the answer
or the wait for the prompt (read by `input()` in a thread, so readline still edits lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from gateway.chat_terminal import (
    Interrupted,
    Interrupts,
    Prompter,
    Reply,
    Terminal,
    stats_line,
)
from gateway.sse import SSEDecoder, SSEError, SSEEvent

DEFAULT_URL = "http://127.0.0.1:8080"
INTERRUPTED_MARK = "[answer interrupted by the user]"
_ERROR_BODY_LIMIT = 64 * 1024
_SERVE_HINT = "start a gateway with `sluice serve` (the demo model, no setup), or pass --url"


@dataclass(frozen=True, slots=True)
class ChatOptions:
    """The command-line options of `sluice chat`."""

    url: str = DEFAULT_URL
    model: str | None = None
    key: str | None = None
    system: str | None = None
    max_tokens: int | None = None
    once: str | None = None


class ChatError(Exception):
    """A failure shown to the user as one line, with a hint of what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(slots=True)
class Turn:
    """One message of the conversation."""

    role: str
    content: str
    interrupted: bool = False

    def message(self) -> dict[str, str]:
        """The message as sent; an interrupted answer says so to the model."""
        content = self.content
        if self.interrupted:
            content = f"{content}\n\n{INTERRUPTED_MARK}" if content else INTERRUPTED_MARK
        return {"role": self.role, "content": content}


@dataclass(slots=True)
class History:
    """The conversation so far; a turn that failed is left out."""

    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        """The `messages` array of the next request."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [turn.message() for turn in self.turns]


def base_url(url: str) -> str:
    """The gateway's root: `http://h:p/v1/` and `http://h:p` both give `http://h:p`."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def api_key(given: str | None, env: Mapping[str, str]) -> str | None:
    """--key, else SLUICE_API_KEY, else OPENAI_API_KEY (empty values count as unset)."""
    return given or env.get("SLUICE_API_KEY") or env.get("OPENAI_API_KEY") or None


def describe_error(error: Any) -> str:
    """The text of an OpenAI-style `error` value: its message, and its code if any."""
    if isinstance(error, dict):
        message = str(error.get("message") or "unknown error")
        code = error.get("code") or error.get("type")
        return f"{message} ({code})" if code else message
    return str(error)


@contextlib.contextmanager
def _http_failures(url: str) -> Iterator[None]:
    """Turn aiohttp's connection failures into ChatErrors that say what to do."""
    try:
        yield
    except aiohttp.ClientConnectorError as err:
        if isinstance(err.os_error, ConnectionRefusedError):
            raise ChatError(f"cannot connect to {url}: connection refused", _SERVE_HINT) from None
        reason = err.os_error.strerror or str(err.os_error)
        raise ChatError(f"cannot connect to {url}: {reason}") from None
    except aiohttp.ClientError as err:
        detail = str(err) or type(err).__name__
        raise ChatError(f"the connection to the gateway failed: {detail}") from None


async def _http_error(resp: aiohttp.ClientResponse) -> ChatError:
    """A ChatError from an error response (OpenAI-shaped JSON, or any text)."""
    raw = await resp.content.read(_ERROR_BODY_LIMIT)
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        payload = None
    if isinstance(payload, dict) and "error" in payload:
        detail = describe_error(payload["error"])
    else:
        detail = raw.decode("utf-8", "replace").strip()[:300] or (resp.reason or "")
    hint = None
    if resp.status in (401, 403):
        hint = "pass --key, or set SLUICE_API_KEY"
    elif resp.status == 404 and "model" in detail:
        hint = "choose a model with --model (the gateway lists them at /v1/models)"
    return ChatError(f"{resp.status} {detail}".rstrip(), hint)


class ChatClient:
    """HTTP to the gateway: list models, stream one answer."""

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str | None) -> None:
        self.session = session
        self.url = base_url(url)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    @classmethod
    async def open(cls, url: str, key: str | None) -> ChatClient:
        """A client with its own session (no overall timeout: answers can be long)."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        return cls(aiohttp.ClientSession(timeout=timeout), url, key)

    async def close(self) -> None:
        """Close the session and its connections."""
        await self.session.close()

    async def first_model(self) -> str:
        """The first model GET /v1/models lists."""
        with _http_failures(self.url):
            async with self.session.get(f"{self.url}/v1/models", headers=self.headers) as resp:
                if resp.status >= 400:
                    raise await _http_error(resp)
                raw = await resp.read()
        try:
            listed = orjson.loads(raw).get("data") or []
            ids: list[str] = [
                m["id"] for m in listed if isinstance(m, dict) and isinstance(m.get("id"), str)
            ]
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            raise ChatError("GET /v1/models did not answer a model list") from None
        if not ids:
            raise ChatError("the gateway lists no models", "pass --model")
        return ids[0]

    async def stream(
        self, body: dict[str, Any], reply: Reply, write: Callable[[str], None]
    ) -> None:
        """POST a streaming chat request; write each text delta and record it in `reply`.

        Raises ChatError for an error status, an error event or a broken stream. If this is
        cancelled mid-stream the connection is closed, not reused: the gateway sees the
        disconnect and cancels the upstream.
        """
        url = f"{self.url}/v1/chat/completions"
        with _http_failures(self.url):
            async with self.session.post(url, json=body, headers=self.headers) as resp:
                if resp.status >= 400:
                    raise await _http_error(resp)
                try:
                    if resp.content_type == "text/event-stream":
                        await _read_events(resp, reply, write)
                    else:  # a server that ignored "stream": one JSON completion
                        _read_completion(await resp.read(), reply, write)
                finally:
                    if not reply.done:
                        resp.close()
        if not reply.done:
            raise ChatError("the stream ended before the answer was complete")


async def _read_events(
    resp: aiohttp.ClientResponse, reply: Reply, write: Callable[[str], None]
) -> None:
    decoder = SSEDecoder()
    async for chunk in resp.content.iter_any():
        try:
            events = decoder.feed(chunk)
        except SSEError as err:
            raise ChatError(f"the gateway sent a malformed stream: {err}") from None
        for event in events:
            if event.is_done:
                reply.done = True
                return
            _apply_event(event, reply, write)
    # Some servers end without [DONE]; a finish_reason and a clean EOF are a complete answer.
    reply.done = reply.finish_reason is not None and not decoder.has_pending


def _apply_event(event: SSEEvent, reply: Reply, write: Callable[[str], None]) -> None:
    if event.data is None:  # a comment or keep-alive
        return
    try:
        chunk = event.json()
    except ValueError:
        raise ChatError(
            f"the gateway sent an event that is not JSON: {event.data[:80]!r}"
        ) from None
    if not isinstance(chunk, dict):
        return
    if "error" in chunk:
        raise ChatError(f"the answer failed mid-stream: {describe_error(chunk['error'])}")
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        reply.usage_tokens = usage["completion_tokens"]
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str) and content:
            reply.add(content, time.perf_counter())
            write(content)
        if choice.get("finish_reason"):
            reply.finish_reason = str(choice["finish_reason"])


def _read_completion(raw: bytes, reply: Reply, write: Callable[[str], None]) -> None:
    try:
        payload = orjson.loads(raw)
        if "error" in payload:
            raise ChatError(describe_error(payload["error"]))
        content = payload["choices"][0]["message"]["content"] or ""
        reply.usage_tokens = (payload.get("usage") or {}).get("completion_tokens")
    except (orjson.JSONDecodeError, LookupError, TypeError, AttributeError):
        raise ChatError("the gateway answered with neither a stream nor a completion") from None
    reply.add(str(content), time.perf_counter())
    write(str(content))
    reply.finish_reason = "stop"
    reply.done = True


class ChatSession:
    """The conversation, and how each turn is asked and shown."""

    def __init__(
        self,
        client: ChatClient,
        model: str,
        options: ChatOptions,
        term: Terminal,
        interrupts: Interrupts,
    ) -> None:
        self.client = client
        self.model = model
        self.max_tokens = options.max_tokens
        self.history = History(options.system)
        self.term = term
        self.interrupts = interrupts

    def request(self) -> dict[str, Any]:
        """The next request body (usage asked for, so the stats can count tokens exactly)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.history.messages(),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    async def turn(self, prompt: str) -> Reply | None:
        """Ask `prompt` and show the answer; None if it failed (and was left out of history).

        Ctrl-C meanwhile interrupts the answer: the partial reply is kept, marked interrupted.
        """
        self.history.turns.append(Turn("user", prompt))
        reply = Reply(started=time.perf_counter())
        try:
            await self.interrupts.run(self.client.stream(self.request(), reply, self.term.text))
        except Interrupted:
            reply.interrupted = True
        except ChatError as err:
            self.history.turns.pop()
            self.term.error(err.message, err.hint)
            return None
        finally:
            reply.ended = time.perf_counter()
        self.history.turns.append(Turn("assistant", reply.text, interrupted=reply.interrupted))
        if reply.interrupted:
            self.term.notice("answer interrupted (the partial answer stays in the history)")
        elif reply.finish_reason not in (None, "stop"):
            self.term.notice(f"answer stopped early: finish_reason={reply.finish_reason}")
        self.term.dim(stats_line(reply))
        return reply

    async def once(self, prompt: str) -> int:
        """`--once`: 0 when answered, 1 on an error, 130 if interrupted."""
        reply = await self.turn(prompt)
        if reply is None:
            return 1
        return 130 if reply.interrupted else 0

    async def repl(self, prompter: Prompter) -> int:
        """Prompts until EOF or Ctrl-C at the prompt; piped input: 1 if any answer failed."""
        interactive = prompter.interactive
        if interactive:
            self.term.dim(
                f"sluice chat: model {self.model} at {self.client.url} | Ctrl-C stops an "
                "answer, Ctrl-C or Ctrl-D at the prompt exits, /reset clears the history"
            )
        failed = False
        while True:
            try:
                line = await self.interrupts.run(prompter.read())
            except Interrupted:  # Ctrl-C at the prompt
                break
            if line is None:  # Ctrl-D, or the end of piped input
                break
            prompt = line.strip()
            if prompt in ("/exit", "/quit"):
                break
            if prompt == "/reset":
                self.history.turns.clear()
                self.term.dim("history cleared")
            elif prompt and await self.turn(prompt) is None:
                failed = True
        return 1 if failed and not interactive else 0


async def chat(options: ChatOptions, term: Terminal, env: Mapping[str, str]) -> int:
    """The whole `sluice chat` run, on one event loop; returns the exit code."""
    interactive = options.once is None and sys.stdin.isatty()
    with Prompter(interactive) as prompter, Interrupts() as interrupts:
        client = await ChatClient.open(options.url, api_key(options.key, env))
        try:
            model = options.model
            if not model:
                model = await interrupts.run(client.first_model())
            session = ChatSession(client, model, options, term, interrupts)
            if options.once is not None:
                return await session.once(options.once)
            return await session.repl(prompter)
        except ChatError as err:
            term.error(err.message, err.hint)
            return 1
        except Interrupted:  # Ctrl-C before the first prompt
            return 130
        finally:
            await client.close()


def run_chat(options: ChatOptions, env: Mapping[str, str] | None = None) -> int:
    """Run `sluice chat` on this process's terminal (or pipes); returns the exit code."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):  # never a Unicode error on odd terminals
            stream.reconfigure(errors="replace")
    environ = os.environ if env is None else env
    color = sys.stderr.isatty() and not environ.get("NO_COLOR")  # no-color.org: non-empty
    term = Terminal(sys.stdout, sys.stderr, color=color)
    try:
        return asyncio.run(chat(options, term, environ))
    except KeyboardInterrupt:  # only where the loop cannot handle SIGINT itself (Windows)
        term.end_answer()
        return 130
