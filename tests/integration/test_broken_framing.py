"""Upstreams whose HTTP framing or connection breaks, read byte for byte on both sides.

The upstream is a raw asyncio server writing exact bytes (broken chunked framing
included); the client is a raw socket that parses exactly what the gateway sent, or curl.
Whatever breaks, the client gets exactly one well-formed HTTP response: a JSON error
before headers, or the events so far and one final error event after, promptly, with a
message in words (the exception's class goes to the log only).
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from gateway.testing.fake_upstream import FakeUpstream, json_script, openai_stream
from gateway.testing.harness import RunningGateway, run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
    HTTP_200_CHUNKED_SSE,
    RawClient,
    RawHead,
    RawScript,
    RawUpstream,
    chat_body,
    config_for,
    final_error,
    http_chunk,
    json_error,
    split_events,
)

GOOD = openai_stream(["Hel", "lo"])
GOOD_BYTES = len(b"".join(GOOD[:2]))
# Long enough that only a prompt failure passes: the tests' own timeout is far below.
PATIENT = {"first_byte": 60.0, "idle": 60.0, "total": 120.0}
CLASS_NAME = re.compile(r"[A-Z][a-z]+(?:[A-Z][a-z]+)*(?:Error|Exception)")

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(autouse=True)
def no_gateway_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A gateway bug shows up as a logged exception: none may happen here."""
    caplog.set_level(logging.WARNING)
    yield
    crashes = [r for r in caplog.records if r.exc_info and r.name.startswith("sluice")]
    assert not crashes, [r.getMessage() for r in crashes]


async def _exchange(
    gw: RunningGateway, *, release: asyncio.Event | None = None, after: int = 0
) -> tuple[RawHead, list[bytes]]:
    """POST a streaming chat request on a raw socket (`Connection: close`); return the head
    and the body's chunks, checking the framing byte by byte: chunk sizes, the terminating
    zero chunk, and that nothing (a second response) follows it.

    `release` is set once the head and `after` bytes of the body arrived (so an upstream
    gated on it breaks after the gateway relayed what came before).
    """
    client = await RawClient.connect(gw.url)
    try:
        await client.post_json("/v1" + CHAT, chat_body(), [("Connection", "close")])
        head = await client.read_head()
        chunks: list[bytes] = []
        if release is not None and after == 0:
            release.set()
        if head.headers.get("transfer-encoding") == "chunked":
            while (chunk := await client.read_chunk()) is not None:
                chunks.append(chunk)
                if release is not None and sum(map(len, chunks)) >= after:
                    release.set()
        else:
            chunks.append(await client.reader.readexactly(int(head.headers["content-length"])))
        rest = await client.reader.read()
        assert rest == b"", f"bytes after the response: {rest[:200]!r}"
        return head, chunks
    finally:
        await client.close()


def _good_then(gate: asyncio.Event) -> list[bytes | asyncio.Event]:
    """A 200 chunked event stream's head and first two events, then `gate`."""
    return [HTTP_200_CHUNKED_SSE, *(http_chunk(event) for event in GOOD[:2]), gate]


def _in_words(message: str) -> None:
    assert not CLASS_NAME.search(message), message
    assert "aiohttp" not in message
    assert "127.0.0.1" not in message


def _broken_logged(caplog: pytest.LogCaptureFixture, cause: str) -> logging.LogRecord:
    """The WARNING that names the request and the exception class."""
    records = [
        r for r in caplog.records if r.levelno == logging.WARNING and cause in r.getMessage()
    ]
    assert records, [r.getMessage() for r in caplog.records]
    assert "req_" in records[0].getMessage()
    return records[0]


# ----- broken chunked framing --------------------------------------------------------------------


async def test_bad_chunk_size_right_after_the_headers_is_one_502(
    raw_upstream: RawUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Found while the headers are held: a plain 502, and nothing after it (it used to be
    a 200 with a whole `HTTP/1.1 500` response inside its chunked body)."""
    raw_upstream.queue(RawScript([HTTP_200_CHUNKED_SSE, b"zzzz not a chunk size\r\n\r\n"]))
    async with run_gateway(config_for(raw_upstream, timeouts=PATIENT)) as gw:
        head, chunks = await _exchange(gw)
    assert head.status == 502
    error = json_error(b"".join(chunks))
    assert error["code"] == "upstream_error"
    # Whether the garbage came with the head (aiohttp fails the response) or after it.
    assert error["message"] in (
        "The upstream sent a malformed chunked body (bad chunk size).",
        "Upstream 'fake' failed: the upstream sent a malformed chunked body (bad chunk size).",
    )
    _in_words(error["message"])
    _broken_logged(caplog, "Client")


async def test_bad_chunk_size_after_the_client_got_its_headers_is_one_final_event(
    raw_upstream: RawUpstream,
) -> None:
    """Headers committed before the first upstream byte (no header hold): one final error
    event in well-formed chunked framing, at once, not at a timeout."""
    client_has_head = asyncio.Event()
    script = RawScript([HTTP_200_CHUNKED_SSE, client_has_head, b"zzzz\r\n\r\n"], then="hang")
    raw_upstream.queue(script)
    config = config_for(raw_upstream, timeouts=PATIENT, server={"header_hold_seconds": 0})
    async with run_gateway(config) as gw:
        head, chunks = await _exchange(gw, release=client_has_head)
        async with asyncio.timeout(BOUND):
            await raw_upstream.closed_by_peer.wait()
    assert head.status == 200
    assert head.headers["transfer-encoding"] == "chunked"
    raw = b"".join(chunks)
    assert len(split_events(raw)) == 1
    error = final_error(raw)
    assert error["message"] == "The upstream sent a malformed chunked body (bad chunk size)."


async def test_bad_chunk_size_mid_stream_is_a_prompt_upstream_error(
    raw_upstream: RawUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream keeps its socket open after the broken chunk: the gateway must not wait
    for `idle` (60 s here) to notice; it ends the stream and closes the upstream."""
    gate = asyncio.Event()
    raw_upstream.queue(RawScript([*_good_then(gate), b"qq\r\n"], then="hang"))
    async with run_gateway(config_for(raw_upstream, timeouts=PATIENT)) as gw:
        head, chunks = await _exchange(gw, release=gate, after=GOOD_BYTES)
        async with asyncio.timeout(BOUND):
            await raw_upstream.closed_by_peer.wait()
    assert head.status == 200
    raw = b"".join(chunks)
    assert split_events(raw)[:-1] == GOOD[:2]
    error = final_error(raw)
    assert error["code"] == "upstream_error"
    assert error["type"] == "upstream_error"
    assert error["message"] == "The upstream sent a malformed chunked body (bad chunk size)."
    record = _broken_logged(caplog, "ClientPayloadError")
    assert "fake" in record.getMessage()


async def test_events_that_came_with_the_bad_chunk_are_relayed_before_the_error(
    raw_upstream: RawUpstream,
) -> None:
    """Good chunks and the broken one in one write: the good events still go out first."""
    client_has_head = asyncio.Event()
    body = b"".join(http_chunk(event) for event in GOOD[:2]) + b"qq\r\n"
    raw_upstream.queue(RawScript([HTTP_200_CHUNKED_SSE, client_has_head, body], then="hang"))
    config = config_for(raw_upstream, timeouts=PATIENT, server={"header_hold_seconds": 0})
    async with run_gateway(config) as gw:
        head, chunks = await _exchange(gw, release=client_has_head)
    assert head.status == 200
    raw = b"".join(chunks)
    assert split_events(raw)[:-1] == GOOD[:2]
    assert "bad chunk size" in final_error(raw)["message"]


@pytest.mark.parametrize(
    ("tail", "then", "message"),
    [
        pytest.param(
            b"HTTP/1.1 500 Internal Server Error\r\n\r\n",
            "eof",
            "The upstream sent a malformed chunked body (bad chunk size).",
            id="a-response-inside-the-body",
        ),
        pytest.param(
            b"5\r\nhelloXX",
            "hang",
            "The upstream sent a malformed chunked body (a chunk not ended by CRLF).",
            id="chunk-without-crlf",
        ),
        pytest.param(
            b'64\r\ndata: {"half',
            "eof",
            "The upstream closed the connection before the answer was complete.",
            id="closed-inside-a-chunk",
        ),
        pytest.param(
            b"",
            "eof",
            "The upstream closed the connection before the answer was complete.",
            id="closed-without-the-zero-chunk",
        ),
        pytest.param(b"", "reset", "The upstream reset the connection.", id="reset"),
    ],
)
async def test_a_broken_body_mid_stream_says_what_broke(
    raw_upstream: RawUpstream, tail: bytes, then: str, message: str
) -> None:
    gate = asyncio.Event()
    raw_upstream.queue(RawScript([*_good_then(gate), tail], then=then))
    async with run_gateway(config_for(raw_upstream, timeouts=PATIENT)) as gw:
        head, chunks = await _exchange(gw, release=gate, after=GOOD_BYTES)
    assert head.status == 200
    raw = b"".join(chunks)
    assert split_events(raw)[:-1] == GOOD[:2]
    error = final_error(raw)
    assert error["message"] == message
    _in_words(error["message"])


@pytest.mark.parametrize("http10", [False, True], ids=["http1.1", "http1.0"])
async def test_curl_gets_a_well_formed_stream_ending_in_the_error_event(
    raw_upstream: RawUpstream, http10: bool
) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed by this test"
    gate = asyncio.Event()
    raw_upstream.queue(RawScript([*_good_then(gate), b"qq\r\n"], then="hang"))
    async with run_gateway(config_for(raw_upstream, timeouts=PATIENT)) as gw:
        args = [curl, "-sS", "-N", *(["--http1.0"] if http10 else []), gw.v1 + CHAT]
        args += [
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}',
        ]
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        out = await proc.stdout.readexactly(GOOD_BYTES)  # relayed: now break the body
        gate.set()
        rest, err = await proc.communicate()
        out += rest
    assert proc.returncode == 0, err
    assert split_events(out)[:-1] == GOOD[:2]
    assert "malformed chunked body" in final_error(out)["message"]


# ----- failures in words, before headers and without streaming ---------------------------------


async def test_upstream_that_closes_without_answering_is_said_in_words(
    raw_upstream: RawUpstream, caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession
) -> None:
    raw_upstream.queue(RawScript([]))
    async with (
        run_gateway(config_for(raw_upstream)) as gw,
        http.post(gw.v1 + CHAT, json=chat_body()) as resp,
    ):
        raw = await resp.read()
    assert resp.status == 502
    message = json_error(raw)["message"]
    assert message == (
        "Upstream 'fake' failed: the upstream closed the connection before the answer was complete."
    )
    _in_words(message)
    _broken_logged(caplog, "ServerDisconnectedError")


async def test_non_streaming_body_cut_short_is_said_in_words(
    raw_upstream: RawUpstream, caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
    raw_upstream.queue(RawScript([head, b'{"id": "x", "choi']))
    async with (
        run_gateway(config_for(raw_upstream)) as gw,
        http.post(gw.v1 + CHAT, json=chat_body(stream=False)) as resp,
    ):
        raw = await resp.read()
    assert resp.status == 502
    message = json_error(raw)["message"]
    assert message == "The upstream closed the connection before the answer was complete."
    _broken_logged(caplog, "ClientPayloadError")


# ----- a JSON answer to a streaming request ------------------------------------------------------


async def _stream_status(http: aiohttp.ClientSession, gw: RunningGateway) -> tuple[int, Any]:
    async with http.post(gw.v1 + CHAT, json=chat_body()) as resp:
        return resp.status, json_error(await resp.read())


async def test_json_body_for_a_streaming_request_is_502_not_streaming(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(json_script({"id": "x", "object": "chat.completion", "choices": []}))
    async with run_gateway(config_for(fake)) as gw:
        status, error = await _stream_status(http, gw)
    assert status == 502
    assert error["code"] == "upstream_not_streaming"
    assert error["message"] == (
        "The upstream answered a streaming request with a JSON body instead of an event stream."
    )


async def test_json_error_for_a_streaming_request_is_mapped_like_an_error_status(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """vLLM's shape, with a 200: the error it says, as if it came with its status."""
    body = {"object": "error", "message": "max_tokens is too large", "type": "x", "code": 400}
    fake.queue(json_script(body))
    async with run_gateway(config_for(fake)) as gw:
        status, error = await _stream_status(http, gw)
    assert status == 400
    assert error["message"] == "max_tokens is too large"
