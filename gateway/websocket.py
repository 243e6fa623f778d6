"""GET /v1/ws: chat completions over a WebSocket, with `cancel` mid-answer.

One socket carries any number of requests, one after another or several at once, each
named by the client's `id`. Every request runs through `Proxy.serve` exactly like an HTTP
one (same auth, routing, limits, plugins and metrics); only the sink differs. The message
protocol is documented in docs/websocket.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from gateway.context import Endpoint, Outcome, RequestContext, request_id_from
from gateway.errors import GatewayError, bad_request
from gateway.proxy import Inbound, Proxy
from gateway.sinks import ClientGone
from gateway.sse import SSEEvent
from gateway.stream import draining_error

MAX_IN_FLIGHT = 8  # concurrent requests on one socket
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")
_ENDPOINTS = {"chat.completions": Endpoint.CHAT, "completions": Endpoint.COMPLETIONS}
_START_HEADERS = ("x-request-id", "x-sluice-overhead-ms", "x-sluice-cache")


def _message(kind: str, rid: str | None, **fields: Any) -> str:
    return orjson.dumps({"type": kind, "id": rid, **fields}).decode()


def _error_message(rid: str | None, err: GatewayError) -> str:
    return _message("error", rid, status=err.status, **err.body())


class WsSink:
    """Sends one request's events as `chunk` messages (and a final error as `error`)."""

    def __init__(self, ws: web.WebSocketResponse, rid: str) -> None:
        self.ws = ws
        self.rid = rid
        self._prefix = b'{"type":"chunk","id":' + orjson.dumps(rid) + b',"data":'
        self.committed = False

    async def open(self, headers: Mapping[str, str]) -> bool:
        shown = {
            name: value
            for name, value in headers.items()
            if name.lower() in _START_HEADERS or name.lower().startswith("x-ratelimit-")
        }
        self.committed = True
        try:
            await self.ws.send_str(_message("start", self.rid, headers=shown))
        except ConnectionError:
            return False
        return not self.ws.closed

    async def send(self, events: list[SSEEvent]) -> int:
        sent = 0
        for event in events:
            data = event.data_bytes
            if data is None or event.is_done:
                continue
            if data.startswith(b'{"error"'):  # the final error event after `start`
                message = _message("error", self.rid, **orjson.loads(data))
            else:
                message = (self._prefix + data + b"}").decode()
            if self.ws.closed:
                raise ClientGone()
            try:
                await self.ws.send_str(message)
            except ConnectionError as err:
                raise ClientGone() from err
            sent += len(message)
        return sent

    async def close(self) -> bool:
        return not self.ws.closed


@dataclass(slots=True)
class _Running:
    ctx: RequestContext
    task: asyncio.Task[None]


class WsSession:
    """The requests of one socket; `receive` handles one client message."""

    def __init__(self, proxy: Proxy, ws: web.WebSocketResponse, headers: Mapping[str, str]):
        self.proxy = proxy
        self.ws = ws
        self.headers: CIMultiDict[str] = CIMultiDict(headers)
        self.running: dict[str, _Running] = {}

    async def receive(self, text: str) -> None:
        """Act on one text message from the client."""
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            await self._send(_error_message(None, bad_request("The message is not valid JSON.")))
            return
        if not isinstance(message, dict):
            await self._send(_error_message(None, bad_request("A message is a JSON object.")))
            return
        kind = message.get("type")
        if kind == "request":
            await self._request(message)
        elif kind == "cancel":
            self._cancel(message.get("id"))
        elif kind == "auth":
            await self._auth(message)
        else:
            err = bad_request("`type` must be one of request, cancel, auth.", param="type")
            await self._send(_error_message(None, err))

    async def _auth(self, message: dict[str, Any]) -> None:
        key = message.get("api_key")
        if not isinstance(key, str) or not key:
            err = bad_request("`api_key` must be a non-empty string.", param="api_key")
            await self._send(_error_message(None, err))
            return
        if self.proxy.keys is not None:
            try:
                self.proxy.keys.authenticate(key)
            except GatewayError as err:
                await self._send(_error_message(None, err))
                return
        self.headers["Authorization"] = f"Bearer {key}"
        self.headers.popall("x-api-key", None)
        await self._send(_message("auth", None, ok=True))

    async def _request(self, message: dict[str, Any]) -> None:
        rid = message.get("id")
        if not (isinstance(rid, str) and _SANE_ID.fullmatch(rid)):
            bad_id = bad_request("`id` must be 1-64 characters of A-Z a-z 0-9 . _ : -", param="id")
            await self._send(_error_message(None, bad_id))
            return
        body = message.get("body")
        endpoint = _ENDPOINTS.get(message.get("endpoint", "chat.completions"))
        err = self._refusal(rid)
        if endpoint is None:
            err = bad_request("`endpoint` must be chat.completions or completions.")
        elif not isinstance(body, dict):
            err = bad_request("`body` must be a JSON object (a completions request).")
        if err is not None or endpoint is None or not isinstance(body, dict):
            if err is not None:
                await self._send(_error_message(rid, err))
            await self._send(_message("done", rid, outcome=Outcome.REJECTED.value, usage=None))
            return
        ctx = RequestContext(request_id_from(None), endpoint)
        body = {**body, "stream": True}
        task = asyncio.create_task(self._run(rid, ctx, body))
        self.running[rid] = _Running(ctx, task)
        await asyncio.sleep(0)  # let it start, so a `cancel` right after finds it running

    def _refusal(self, rid: str) -> GatewayError | None:
        if rid in self.running:
            return bad_request(f"Request `{rid}` is still running.", param="id")
        if len(self.running) >= MAX_IN_FLIGHT:
            message = f"At most {MAX_IN_FLIGHT} requests run at once on one socket."
            return GatewayError(429, message, code="too_many_requests_on_socket")
        if self.proxy.draining:
            return draining_error()
        return None

    async def _run(self, rid: str, ctx: RequestContext, body: dict[str, Any]) -> None:
        async def read_body() -> dict[str, Any]:
            return body

        inbound = Inbound(self.headers, read_body, WsSink(self.ws, rid))
        try:
            served = await self.proxy.serve(ctx, inbound)
            if isinstance(served, GatewayError):
                await self._send(_error_message(rid, served))
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
        finally:
            self.running.pop(rid, None)
        outcome = ctx.outcome.value if ctx.outcome is not None else None
        usage = ctx.usage
        tokens = None
        if usage.source != "none":
            tokens = {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
                "source": usage.source,
            }
        await self._send(_message("done", rid, outcome=outcome, usage=tokens))

    def _cancel(self, rid: object) -> None:
        running = self.running.get(rid) if isinstance(rid, str) else None
        if running is None:
            return  # already over: its `done` is on the way or was sent
        running.ctx.outcome = Outcome.CANCELLED
        running.task.cancel()

    async def _send(self, text: str) -> None:
        if not self.ws.closed:
            with contextlib.suppress(ConnectionError):
                await self.ws.send_str(text)

    async def close(self) -> None:
        """The socket is gone: cancel what still runs (their upstreams are aborted)."""
        tasks = [running.task for running in self.running.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def origin_allowed(request: web.Request, allowed: Collection[str]) -> bool:
    """Browsers send `Origin` on a WebSocket handshake and apply no CORS to it, so the gateway
    checks it: its own origin and `server.cors.allow_origins` may connect; clients that send
    no `Origin` (not browsers) may too."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    return urlsplit(origin).netloc.lower() == request.host.lower()


def websocket_handler(
    proxy: Proxy, max_message_bytes: int, allowed_origins: Collection[str] = ()
) -> Any:
    """The aiohttp handler for GET /v1/ws."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if not origin_allowed(request, allowed_origins):
            return GatewayError(
                403,
                "This origin may not open a WebSocket here (see server.cors.allow_origins).",
                type="permission_error",
                code="origin_not_allowed",
            ).to_response()
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=max_message_bytes)
        await ws.prepare(request)
        session = WsSession(proxy, ws, request.headers)
        try:
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    await session.receive(message.data)
                elif message.type is WSMsgType.BINARY:
                    err = bad_request("Send requests as text messages (JSON).")
                    await session._send(_error_message(None, err))
        finally:
            await session.close()
        return ws

    return handle
