"""An OpenAI-compatible upstream on llama-cpp-python's server stack, run by uvicorn.

That server is a Starlette (FastAPI) app behind starlette-context's `RawContextMiddleware`
with `RequestIdPlugin()`, which answers an empty 400 to any `X-Request-Id` that is not a
UUID, and streams with sse-starlette's `EventSourceResponse` (`sep="\\n"`), one
`data: {chunk}` per token and `data: [DONE]`. This app is that stack with a canned answer.

    with StarletteUpstream() as upstream:
        upstream.base_url, upstream.seen  # what each request carried

uvicorn runs in a thread on a socket bound and listening before the thread starts, so a
connection made right away waits in the backlog: no start-up polling.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import uvicorn
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette_context import context
from starlette_context.header_keys import HeaderKeys
from starlette_context.middleware import RawContextMiddleware
from starlette_context.plugins.request_id import RequestIdPlugin

TOKENS = ("Hello", " from", " Starlette")


@dataclass(frozen=True)
class Seen:
    """One request the app answered: its headers (names lower-cased) and the request id
    starlette-context accepted or made up."""

    headers: dict[str, str]
    context_request_id: str


def _chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-starlette",
        "object": "chat.completion.chunk",
        "created": 1700000000 + index,
        "model": "smol",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _completion() -> dict[str, Any]:
    return {
        "id": "chatcmpl-starlette",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "smol",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(TOKENS)},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


async def _events() -> AsyncIterator[dict[str, str]]:
    yield {"data": json.dumps(_chunk(0, {"role": "assistant"}))}
    for index, token in enumerate(TOKENS, start=1):
        yield {"data": json.dumps(_chunk(index, {"content": token}))}
    yield {"data": json.dumps(_chunk(len(TOKENS) + 1, {}, "stop"))}
    yield {"data": "[DONE]"}


class StarletteUpstream:
    """The app on a free loopback port, in a uvicorn thread; `seen` lists its requests."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []  # appended on uvicorn's thread, read after each response
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = int(self._sock.getsockname()[1])
        app = Starlette(
            routes=[Route("/v1/chat/completions", self._chat, methods=["POST"])],
            middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),))],
        )
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=30)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, with `/v1`."""
        return f"http://127.0.0.1:{self.port}/v1"

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.seen.append(Seen(headers, str(context[HeaderKeys.request_id])))
        if body.get("stream"):
            return EventSourceResponse(_events(), sep="\n")
        return JSONResponse(_completion())

    def __enter__(self) -> StarletteUpstream:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()
