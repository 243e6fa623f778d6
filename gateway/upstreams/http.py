"""Shared plumbing of HTTP upstreams: one pooled aiohttp session each, and the call wrapper."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import ssl
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
import orjson

from gateway.config import ConfigError, HttpUpstreamConfig
from gateway.errors import GatewayError, timeout_error, upstream_error
from gateway.headers import merge_headers
from gateway.upstreams.base import Upstream, UpstreamCall
from gateway.upstreams.failures import upstream_broken

log = logging.getLogger("sluice.upstream")

_MIN_SECRET = 12  # shorter header values (versions, org names) are not treated as secrets
_TAIL_START = re.compile(r"[-_.]")


def secret_forms(values: Iterable[str]) -> list[str]:
    """Each credential and the forms an upstream may echo it in: without its scheme
    (`Bearer x` -> `x`) and without its prefixes (`sk-proj-abc...` -> `proj-abc...`,
    `abc...`), longest first. Parts shorter than 12 characters are left alone."""
    forms: set[str] = set()
    for value in values:
        scheme, _, rest = value.partition(" ")
        token = rest.strip() if rest and scheme.lower() in ("bearer", "basic") else value
        for candidate in (value, token):
            forms.add(candidate)
            forms.update(candidate[m.end() :] for m in _TAIL_START.finditer(candidate))
    return sorted((f for f in forms if len(f) >= _MIN_SECRET), key=len, reverse=True)


def scrub(text: str | None, secrets: list[str]) -> str | None:
    """`text` with every form of the upstream's credentials replaced by `[redacted]`."""
    if text is None:
        return None
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
    return text


def _connect_failure(err: aiohttp.ClientConnectorError) -> str:
    """Why a connection failed, without the upstream's address (internal topology)."""
    os_error = err.os_error
    if isinstance(os_error, socket.gaierror):
        return "its host name did not resolve"
    if os_error.errno:
        return os.strerror(os_error.errno).lower()
    return "connection failed"


def _retrieve(closed: asyncio.Future[None]) -> None:
    """Mark a connection's closing error as seen (asyncio logs unread future errors)."""
    if not closed.cancelled():
        closed.exception()


class AiohttpCall(UpstreamCall):
    """An upstream response read through aiohttp's client."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = response.headers
        self._content = response.content
        self._closed: asyncio.Future[None] | None = None
        self._failure: Exception | None = None  # why the body ended early (see below)
        connection = response.connection
        self._protocol = connection.protocol if connection is not None else None
        if self._protocol is not None:
            closed = self._protocol.closed
            if closed is None:  # already lost
                self._connection_lost()
            else:
                closed.add_done_callback(self._on_closed)
                self._closed = closed

    def _on_closed(self, closed: asyncio.Future[None]) -> None:
        _retrieve(closed)
        self._closed = None
        self._connection_lost()

    def _connection_lost(self) -> None:
        """End a body the connection died under, so that its reads fail once drained.

        When aiohttp's C parser finds broken chunked framing it closes the connection but
        neither ends nor fails the response body, so a pending read would wait for a
        timeout and the next one would raise RuntimeError. End the body instead: what it
        holds is still read, then `read_chunk` says what happened.
        """
        content = self._content
        if content.is_eof() or content.exception() is not None:
            return
        protocol = self._protocol
        failure = protocol.exception() if protocol is not None else None
        error = aiohttp.ClientPayloadError(f"Response payload is not completed: {failure!r}")
        if failure is not None:
            error.__cause__ = failure
        self._failure = error
        content.feed_eof()

    def _unwatch(self) -> None:
        closed, self._closed = self._closed, None
        if closed is not None:
            closed.remove_done_callback(self._on_closed)
            # One static reader stays, for a pooled connection that closes with an error.
            closed.remove_done_callback(_retrieve)
            closed.add_done_callback(_retrieve)

    async def read_chunk(self) -> bytes:
        try:
            chunk = await self._content.readany()
        except Exception as err:
            # Raise a fresh exception, never the one aiohttp holds: a response closed while
            # a read is pending fails that read with one module-level ClientConnectionError
            # shared across responses, and raising an exception extends its traceback, so
            # every raise of that instance would keep the frames, hence the whole request,
            # of every such stream alive for good.
            broken = upstream_broken(err)
            err.__traceback__ = err.__context__ = None
            if type(err) is aiohttp.ClientConnectionError:
                err.__cause__ = None
            raise broken from None
        if not chunk and self._failure is not None:
            raise upstream_broken(self._failure)
        return chunk

    def abort(self) -> None:
        self._unwatch()
        self._response.close()

    def release(self) -> None:
        self._unwatch()
        self._response.release()


class HttpUpstream(Upstream):
    """An upstream reached over HTTP(S): pooling, TLS settings and connection errors."""

    def __init__(self, name: str, config: HttpUpstreamConfig) -> None:
        super().__init__(name, config.timeouts, config.request_id_header)
        self._http = config
        self._session: aiohttp.ClientSession | None = None
        self._static_headers: dict[str, str] = dict(config.headers)
        self._secrets: list[str] | None = None  # from _static_headers, once they are complete
        self._tls = self._ssl()

    def _ssl(self) -> ssl.SSLContext | bool:
        """Verify TLS against the system CAs, or `ca_bundle`'s; or not at all (`verify_tls`).

        A `ca_bundle` that cannot be loaded is a ConfigError naming the key, at build time.
        """
        if not self._http.verify_tls:
            return False
        bundle = self._http.ca_bundle
        if bundle is not None:
            try:
                return ssl.create_default_context(cafile=str(bundle))
            except (OSError, ssl.SSLError) as err:
                reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
                raise ConfigError(
                    f"upstreams.{self.name}.ca_bundle: cannot load {str(bundle)!r}: {reason}"
                ) from None
        return True

    def map_status_error(self, status: int, body: bytes) -> GatewayError:
        """The base mapping, minus any echo of this upstream's own credentials (an error body
        may quote the key, with or without its `sk-` prefix)."""
        return self.scrubbed(super().map_status_error(status, body))

    def scrubbed(self, error: GatewayError) -> GatewayError:
        """`error` without any echo of this upstream's credentials (changed in place)."""
        if self._secrets is None:
            self._secrets = secret_forms(self._static_headers.values())
        error.message = scrub(error.message, self._secrets) or ""
        error.type = scrub(error.type, self._secrets) or "upstream_error"
        error.code = scrub(error.code, self._secrets)
        return error

    async def start(self) -> None:
        if not self._http.verify_tls:
            log.warning(
                "upstream %r: TLS certificate verification is off (verify_tls: false); "
                "use ca_bundle for a private CA instead",
                self.name,
            )
        connector = aiohttp.TCPConnector(
            limit=self._http.max_connections, ssl=self._tls, keepalive_timeout=30
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

    @property
    def session_open(self) -> bool:
        """True between `start` and `close`: the connection pool exists."""
        return self._session is not None and not self._session.closed

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(
        self,
        url: str,
        body: dict[str, Any],
        headers: Mapping[str, str],
        *,
        client_wins: frozenset[str] = frozenset(),
    ) -> UpstreamCall:
        """POST JSON; connection failures become the client's 502/504 (GatewayError), or
        UpstreamBroken when the connection or the response's head broke.

        The configured headers replace the client's, except those named (lower case) in
        `client_wins` (a native lane's API version header).
        """
        return await self.request("POST", url, body, headers, client_wins=client_wins)

    async def request(
        self,
        method: str,
        url: str,
        body: dict[str, Any] | None,
        headers: Mapping[str, str],
        *,
        client_wins: frozenset[str] = frozenset(),
    ) -> UpstreamCall:
        """`post` for any method; no body when `body` is None (GET, DELETE)."""
        if self._session is None:
            raise RuntimeError(f"upstream {self.name} used before start()")
        if client_wins:
            sent = merge_headers(headers, self._static_headers, client_wins)
        else:
            sent = {**headers, **self._static_headers}
        data = orjson.dumps(body) if body is not None else None
        try:
            response = await self._session.request(method, url, data=data, headers=sent)
        except aiohttp.ServerTimeoutError:
            raise timeout_error("connect") from None
        except aiohttp.ClientConnectorCertificateError as err:
            cert_error = err.certificate_error
            reason = getattr(cert_error, "verify_message", None) or str(cert_error)
            raise upstream_error(
                f"TLS verification of upstream {self.name!r} failed: {reason}. Trust its CA "
                "with ca_bundle.",
                code="upstream_tls_error",
            ) from None
        except aiohttp.ClientSSLError as err:
            reason = getattr(err.os_error, "reason", None) or type(err.os_error).__name__
            raise upstream_error(
                f"TLS handshake with upstream {self.name!r} failed ({reason}).",
                code="upstream_tls_error",
            ) from None
        except aiohttp.ClientConnectorError as err:
            raise upstream_error(
                f"Could not connect to upstream {self.name!r}: {_connect_failure(err)}.",
                code="upstream_connect_error",
            ) from None
        except aiohttp.ClientError as err:
            raise upstream_broken(err) from None
        return AiohttpCall(response)
