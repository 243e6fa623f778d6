"""Upstream kind `openai`: OpenAI, vLLM, llama.cpp, TGI, Ollama /v1 and other compatibles."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from gateway.config import OpenAIUpstream
from gateway.context import Endpoint, RequestContext
from gateway.errors import GatewayError, timeout_error, upstream_error
from gateway.sse import SSEEvent
from gateway.upstreams.base import Batch, StreamObserver, Upstream, UpstreamCall
from gateway.upstreams.errors import error_from_event

_PATHS = {
    Endpoint.CHAT: "/chat/completions",
    Endpoint.COMPLETIONS: "/completions",
    Endpoint.EMBEDDINGS: "/embeddings",
}
_DONE = SSEEvent(data="[DONE]")


class AiohttpCall(UpstreamCall):
    """An upstream response read through aiohttp's client."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = response.headers
        self._content = response.content

    async def read_chunk(self) -> bytes:
        return await self._content.readany()

    def abort(self) -> None:
        self._response.close()

    def release(self) -> None:
        self._response.release()


# In-band error objects lead with their key: OpenAI and TGI `{"error": ...}`, vLLM
# `{"object": "error", ...}`; a prefix test per event is all the hot path pays for them.
_ERROR_HEADS = (b'{"error"', b'{ "error"', b'{"object":"error"', b'{"object": "error"')


class OpenAIObserver(StreamObserver):
    """OpenAI's chunk stream: `[DONE]` ends it; usage rides on the last chunks.

    Usage is read once, at the end, from the last data events: OpenAI sends it in the last
    chunk before `[DONE]`, llama.cpp on the final chunk, vLLM's continuous usage as running
    totals on every chunk (so the last one is the truth). Nothing is parsed per event.
    """

    def __init__(self) -> None:
        self._last: SSEEvent | None = None
        self._before_last: SSEEvent | None = None

    def observe(self, ctx: RequestContext, event: SSEEvent) -> GatewayError | None:
        data = event.data_bytes
        if data is None:
            return None
        if data == b"[DONE]":
            self.done = True
            return None
        if data.startswith(_ERROR_HEADS):
            error = _error_of(event)
            if error is not None:
                return error
        self._before_last, self._last = self._last, event
        return None

    def classify(self, ctx: RequestContext, events: list[SSEEvent]) -> Batch:
        """The hot path: `observe` inlined over a batch."""
        batch = Batch([])
        out = batch.events
        last = before_last = None
        for event in events:
            data = event.data_bytes
            if data is None:
                out.append(event)
                continue
            batch.has_data = True
            if data == b"[DONE]":
                self.done = True
                batch.terminal = event
                break
            if data.startswith(_ERROR_HEADS) and (error := _error_of(event)) is not None:
                batch.error = error
                break
            out.append(event)
            before_last, last = last, event
        if last is not None:
            self._before_last = before_last if before_last is not None else self._last
            self._last = last
        return batch

    def finish(self, ctx: RequestContext) -> None:
        for event in (self._before_last, self._last):
            data = event.data_bytes if event is not None else None
            if data is None or b'"usage"' not in data:
                continue
            payload = _parse(event)
            usage = payload.get("usage") if isinstance(payload, dict) else None
            if isinstance(usage, dict):
                ctx.usage.set_from_upstream(usage)

    def error_event(self, err: GatewayError) -> SSEEvent:
        return SSEEvent.from_json(err.body())

    def terminal_event(self) -> SSEEvent | None:
        return _DONE


def _error_of(event: SSEEvent) -> GatewayError | None:
    payload = _parse(event)
    if isinstance(payload, dict) and ("error" in payload or payload.get("object") == "error"):
        return error_from_event(payload)
    return None


def _parse(event: SSEEvent | None) -> Any:
    if event is None:
        return None
    try:
        return event.json()
    except ValueError:
        return None


class OpenAICompatible(Upstream):
    """Adapter for `kind: openai`; one pooled aiohttp session per upstream."""

    def __init__(self, name: str, config: OpenAIUpstream) -> None:
        super().__init__(name, config.timeouts)
        self.config = config
        self._base = config.base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._auth: dict[str, str] = dict(config.headers)
        if config.api_key is not None and config.api_key.get_secret_value():
            self._auth["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.config.verify_tls:
            return False
        if self.config.ca_bundle is not None:
            return ssl.create_default_context(cafile=str(self.config.ca_bundle))
        return True

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections, ssl=self._ssl(), keepalive_timeout=30
        )
        # sock_connect only: `connect` would also count the wait for a free pooled
        # connection, which is not a connect failure (concurrency limits live elsewhere).
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=True,
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def open(
        self, ctx: RequestContext, body: dict[str, Any], headers: Mapping[str, str]
    ) -> UpstreamCall:
        if self._session is None:
            raise RuntimeError(f"upstream {self.name} used before start()")
        url = self._base + _PATHS[ctx.endpoint]
        try:
            response = await self._session.post(
                url, data=orjson.dumps(body), headers={**headers, **self._auth}
            )
        except aiohttp.ServerTimeoutError:
            raise timeout_error("connect") from None
        except aiohttp.ClientConnectorError as err:
            raise upstream_error(
                f"Could not connect to upstream {self.name!r}: {err.strerror or 'refused'}.",
                code="upstream_connect_error",
            ) from None
        except aiohttp.ClientError as err:
            raise upstream_error(
                f"Upstream {self.name!r} failed before answering ({type(err).__name__}).",
            ) from None
        return AiohttpCall(response)

    def observer(self, ctx: RequestContext) -> StreamObserver:
        return OpenAIObserver()
