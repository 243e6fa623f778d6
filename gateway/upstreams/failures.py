"""aiohttp client failures in words: what the client is told when an upstream connection
or its HTTP framing breaks (the exception's class goes to the log only)."""

from __future__ import annotations

import errno
import os

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError, TransferEncodingError

from gateway.upstreams.base import UpstreamBroken

TRUNCATED = "the upstream closed the connection before the answer was complete"
RESET = "the upstream reset the connection"
_MALFORMED_CHUNKS = "the upstream sent a malformed chunked body"


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and its causes (a few levels: aiohttp wraps parser errors twice)."""
    chain: list[BaseException] = []
    at: BaseException | None = err
    while at is not None and len(chain) < 5 and at not in chain:
        chain.append(at)
        at = at.__cause__
    return chain


def _chunk_failure(text: str) -> str:
    """Which part of a chunked body's framing broke, from the parsers' messages."""
    if "extension" in text:
        return f"{_MALFORMED_CHUNKS} (bad chunk extension)"
    if "lf" in text.split() or "crlf" in text or "lf after" in text:
        return f"{_MALFORMED_CHUNKS} (a chunk not ended by CRLF)"
    return f"{_MALFORMED_CHUNKS} (bad chunk size)"


def failure_reason(err: BaseException) -> str:
    """What an aiohttp client failure means, in words for the client (no class names,
    no upstream bytes, no addresses)."""
    chain = _chain(err)
    text = " ".join(str(e) for e in chain).lower()
    if "connection reset" in text or "connectionreseterror" in text:  # in a payload error's text
        return RESET
    if isinstance(err, aiohttp.ServerDisconnectedError) or "not enough data" in text:
        return TRUNCATED
    if any(isinstance(e, TransferEncodingError) for e in chain):
        return _chunk_failure(text)
    if any(isinstance(e, HttpProcessingError) for e in chain):
        return (
            _chunk_failure(text)
            if "chunk" in text
            else "the upstream sent a malformed HTTP response"
        )
    if isinstance(err, aiohttp.ClientPayloadError):
        return TRUNCATED
    for e in chain:
        if isinstance(e, OSError) and e.errno:
            if e.errno in (errno.ECONNRESET, errno.EPIPE):
                return RESET
            return f"the upstream connection failed ({os.strerror(e.errno).lower()})"
    if isinstance(err, aiohttp.ClientConnectionError | RuntimeError):
        return "the upstream connection was closed"
    return "the upstream connection failed"


def upstream_broken(err: BaseException) -> UpstreamBroken:
    """`err` from an aiohttp response or request as an UpstreamBroken."""
    return UpstreamBroken(failure_reason(err), type(err).__name__)
