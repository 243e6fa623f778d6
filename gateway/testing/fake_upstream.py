"""A scriptable fake upstream on loopback, for tests of Sluice and of plugins.

It replays byte-exact responses with controlled chunking and pacing, records what it
received (path, headers, JSON body), and records when the gateway closed each connection,
so tests can assert on cancellation without sleeping. Responses come from a queue of
Scripts, else from a `responder` that picks one from the request (for load tests whose
clients say what they want), else the default.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Script:
    """One response: status, headers, body chunks written one by one, and what happens after.

    `delays[i]` is slept before chunk i (a single float applies to every chunk). `then` is
    "eof" (end the body), "hang" (keep the connection open, send nothing more) or "reset"
    (abort the TCP connection). `reset_before_headers` aborts the connection instead of
    answering at all (after `release`, if set).
    """

    chunks: Sequence[bytes] = ()
    status: int = 200
    content_type: str = "text/event-stream"
    headers: dict[str, str] = field(default_factory=dict)
    delays: Sequence[float] | float = 0.0
    then: str = "eof"
    release: asyncio.Event | None = None  # if set, wait for it before the first chunk
    reset_before_headers: bool = False

    def delay(self, index: int) -> float:
        """Seconds to wait before chunk `index`."""
        if isinstance(self.delays, float | int):
            return float(self.delays)
        return self.delays[index] if index < len(self.delays) else 0.0


@dataclass
class Exchange:
    """What the fake saw of one request, and how the connection ended."""

    path: str
    headers: dict[str, str]
    body: Any
    chunks_written: int = 0
    bytes_written: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    closed_by_peer: bool = False
    closed_at: float | None = None  # time.perf_counter() when the gateway closed the connection


Responder = Callable[["Exchange"], Script]


class FakeUpstream:
    """An aiohttp server that answers each request with the next queued Script.

    With the queue empty, `responder(exchange)` picks the script (it sees the request's
    path, headers and JSON body), else `default` plays. `keepalive_timeout` is how long
    an idle keep-alive connection stays open (aiohttp's default is 75 s); a short one
    lets leak tests see the gateway's pooled upstream connections go away once idle.
    """

    def __init__(
        self,
        default: Script | None = None,
        *,
        responder: Responder | None = None,
        keepalive_timeout: float = 75.0,
    ) -> None:
        self.default = default or Script(openai_stream(["Hello", " world"]))
        self.responder = responder
        self.keepalive_timeout = keepalive_timeout
        self.scripts: deque[Script] = deque()
        self.exchanges: list[Exchange] = []
        self.arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT/v1`, for an `openai` upstream's base_url."""
        return f"http://127.0.0.1:{self.port}/v1"

    def queue(self, *scripts: Script) -> None:
        """Answer the next requests with these scripts, in order (then the default)."""
        self.scripts.extend(scripts)

    async def start(self) -> FakeUpstream:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=self.keepalive_timeout,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        """Stop listening and close open connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_for_requests(self, count: int, within: float = 10.0) -> list[Exchange]:
        """Block until at least `count` requests arrived (TimeoutError after `within` s)."""
        async with asyncio.timeout(within), self.arrived:
            await self.arrived.wait_for(lambda: len(self.exchanges) >= count)
        return self.exchanges

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw
        exchange = Exchange(request.path, dict(request.headers), body)
        async with self.arrived:
            self.exchanges.append(exchange)
            self.arrived.notify_all()
        if self.scripts:
            script = self.scripts.popleft()
        elif self.responder is not None:
            script = self.responder(exchange)
        else:
            script = self.default
        try:
            return await self._play(request, script, exchange)
        except (asyncio.CancelledError, ConnectionError):
            exchange.closed_by_peer = True
            exchange.closed_at = time.perf_counter()
            raise
        finally:
            exchange.finished.set()

    async def _play(
        self, request: web.Request, script: Script, exchange: Exchange
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=script.status, headers=script.headers)
        response.content_type = script.content_type
        response.enable_chunked_encoding()
        if script.release is not None:
            await script.release.wait()
        if script.reset_before_headers:
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.prepare(request)
        for i, chunk in enumerate(script.chunks):
            if (pause := script.delay(i)) > 0:
                await asyncio.sleep(pause)
            await response.write(chunk)
            exchange.chunks_written += 1
            exchange.bytes_written += len(chunk)
        if script.then == "hang":
            await asyncio.Event().wait()  # until the gateway goes away (cancelled)
        if script.then == "reset":
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write_eof()
        return response


# ----- wire-format builders -----------------------------------------------------------------


def sse(obj: Any) -> bytes:
    """One `data:` event as OpenAI writes it."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def openai_chunk(
    content: str | None,
    *,
    model: str = "gpt-test",
    finish_reason: str | None = None,
    role: bool = False,
    index: int = 0,
    cid: str = "chatcmpl-test",
) -> dict[str, Any]:
    """A chat.completion.chunk object."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ],
    }


def openai_stream(
    tokens: Iterable[str],
    *,
    model: str = "gpt-test",
    usage: dict[str, int] | None = None,
    done: bool = True,
) -> list[bytes]:
    """A whole OpenAI chat stream, one event per list item: role, tokens, finish, usage, [DONE]."""
    events = [sse(openai_chunk("", model=model, role=True))]
    events += [sse(openai_chunk(token, model=model)) for token in tokens]
    events.append(sse(openai_chunk(None, model=model, finish_reason="stop")))
    if usage is not None:
        events.append(
            sse(
                {
                    "id": "chatcmpl-test",
                    "object": "chat.completion.chunk",
                    "created": 1700000000,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        )
    if done:
        events.append(b"data: [DONE]\n\n")
    return events


def rechunk(data: bytes, sizes: Sequence[int]) -> list[bytes]:
    """Split `data` into pieces of the given sizes (cycled), e.g. [1, 7, 3] for awkward splits."""
    out, pos, i = [], 0, 0
    while pos < len(data):
        size = max(1, sizes[i % len(sizes)])
        out.append(data[pos : pos + size])
        pos += size
        i += 1
    return out


def openai_completion(content: str, *, model: str = "gpt-test") -> dict[str, Any]:
    """A non-streaming chat.completion object."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def json_script(obj: Any, status: int = 200) -> Script:
    """A JSON (non-streaming) response."""
    return Script([orjson.dumps(obj)], status=status, content_type="application/json")
