"""Shared plumbing of HTTP upstreams: one pooled aiohttp session each, and the call wrapper."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from gateway.config import HttpUpstreamConfig
from gateway.errors import timeout_error, upstream_error
from gateway.upstreams.base import Upstream, UpstreamCall


class AiohttpCall(UpstreamCall):
    """An upstream response read through aiohttp's client."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = response.headers
        self._content = response.content

    async def read_chunk(self) -> bytes:
        try:
            return await self._content.readany()
        except aiohttp.ClientConnectionError as err:
            # A response closed while a read is pending (a timeout, a drain) fails that read
            # with one module-level ClientConnectionError that aiohttp shares across responses
            # (subclasses are fresh per failure). Raising an exception extends its traceback,
            # so every raise of that instance would chain onto the last one and keep the
            # frames, hence the whole request, of every such stream alive for good. Detach it
            # and raise a fresh one instead.
            if type(err) is not aiohttp.ClientConnectionError:
                raise
            err.__traceback__ = err.__context__ = err.__cause__ = None
            raise aiohttp.ClientConnectionError(*err.args) from None

    def abort(self) -> None:
        self._response.close()

    def release(self) -> None:
        self._response.release()


class HttpUpstream(Upstream):
    """An upstream reached over HTTP(S): pooling, TLS settings and connection errors."""

    def __init__(self, name: str, config: HttpUpstreamConfig) -> None:
        super().__init__(name, config.timeouts)
        self._http = config
        self._session: aiohttp.ClientSession | None = None
        self._static_headers: dict[str, str] = dict(config.headers)

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self._http.verify_tls:
            return False
        if self._http.ca_bundle is not None:
            return ssl.create_default_context(cafile=str(self._http.ca_bundle))
        return True

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._http.max_connections, ssl=self._ssl(), keepalive_timeout=30
        )
        # sock_connect only: `connect` would also count the wait for a free pooled
        # connection, which is not a connect failure (concurrency limits live elsewhere).
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(
        self, url: str, body: dict[str, Any], headers: Mapping[str, str]
    ) -> UpstreamCall:
        """POST JSON; connection failures become the client's 502/504."""
        if self._session is None:
            raise RuntimeError(f"upstream {self.name} used before start()")
        try:
            response = await self._session.post(
                url, data=orjson.dumps(body), headers={**headers, **self._static_headers}
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
