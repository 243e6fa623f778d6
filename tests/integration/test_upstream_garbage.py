"""Upstreams that misbehave on the wire: garbage, bad JSON, endless lines, HTML, trickles.

Whatever the upstream sends, the client gets a well-formed answer: an OpenAI-shaped JSON
error before headers, or the events so far and one final `data: {"error": ...}` event
after; never a hang, never a traceback. (Timeouts, resets and truncation have their own
tests in test_timeouts.py and test_errors.py; these are the remaining byte-level cases.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from gateway.testing.fake_upstream import FakeUpstream, Script, openai_stream, rechunk
from gateway.testing.harness import run_gateway
from tests.integration._support import (
    BOUND,
    CHAT,
    DONE,
    GatedUpstream,
    chat_body,
    config_for,
    final_error,
    gated_script,
    json_error,
    split_events,
)

GOOD = openai_stream(["Hel", "lo"])
HTML = (
    b"<!DOCTYPE html>\n<html>\n<head><title>Welcome</title></head>\n\n"
    b"<body>It works!</body>\n</html>\n"
)
SMALL_LIMITS = {"max_line_bytes": 1024, "max_event_bytes": 4096}


@pytest.fixture(autouse=True)
def no_gateway_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A gateway bug shows up as a logged exception (then a 500): none may happen here."""
    caplog.set_level(logging.WARNING)
    yield
    crashes = [r for r in caplog.records if r.exc_info and r.name.startswith("sluice")]
    assert not crashes, [r.getMessage() for r in crashes]


async def _post(
    http: aiohttp.ClientSession, url: str, *, stream: bool = True, within: float = BOUND
) -> tuple[int, str, bytes]:
    try:
        async with (
            asyncio.timeout(within),
            http.post(url + CHAT, json=chat_body(stream=stream)) as resp,
        ):
            raw = await resp.read()
    except TimeoutError:
        pytest.fail(f"no complete answer within {within} s")
    assert b"Traceback" not in raw
    return resp.status, resp.content_type, raw


def _json_502(status: int, content_type: str, raw: bytes) -> dict[str, Any]:
    assert status == 502, raw[:300]
    assert content_type == "application/json"
    error = json_error(raw)
    assert error["type"] == "upstream_error"
    return error


# ----- garbage --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([b"\x00\xff\xfe\x01 binary noise, no line end"], id="no-line-end"),
        pytest.param([b"\x00\xff junk\n\nmore junk\r\n\r\n"], id="junk-blocks-without-data"),
        pytest.param([b"HTTP/1.1 200 OK\r\n\r\n" * 3], id="http-inside-http"),
        pytest.param([bytes(range(256)) * 4], id="every-byte-value"),
    ],
)
async def test_garbage_instead_of_a_stream_is_502_json(
    fake: FakeUpstream, http: aiohttp.ClientSession, chunks: list[bytes]
) -> None:
    fake.queue(Script(chunks))
    async with run_gateway(config_for(fake)) as gw:
        error = _json_502(*await _post(http, gw.v1))
    assert error["code"] == "upstream_truncated"


async def test_garbage_after_good_events_ends_with_one_error_event(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    good = GOOD[:2]
    script, (gate,) = gated_script([*good, b"\x00\xff\xfe binary noise, no line end"], 2)
    gated.queue(script)
    async with (
        run_gateway(config_for(gated)) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body()) as resp,
    ):
        assert resp.status == 200
        head = await resp.content.readexactly(len(b"".join(good)))
        gate.set()
        raw = head + await resp.content.read()
    assert split_events(raw)[:-1] == good
    error = final_error(raw)
    assert error["code"] == "upstream_truncated"
    assert "middle of an event" in error["message"]


# ----- JSON that does not parse inside an event ------------------------------------------------


async def test_invalid_json_in_an_event_is_relayed_verbatim(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """The gateway does not parse events nobody asked it to parse (docs/streaming.md): an
    event whose data is not JSON passes through byte for byte, like every unchanged event,
    and the client's SDK reports it. The stream itself stays well-formed to its [DONE]."""
    bad = b"data: {not json, \xff\n\n"
    upstream = [GOOD[0], bad, *GOOD[1:]]
    fake.queue(Script(upstream))
    async with run_gateway(config_for(fake)) as gw:
        status, _, raw = await _post(http, gw.v1)
    assert status == 200
    assert raw == b"".join(upstream)


async def test_invalid_json_that_looks_like_an_error_is_not_an_error(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream = [b'data: {"error": oops\n\n', *GOOD]
    fake.queue(Script(upstream))
    async with run_gateway(config_for(fake)) as gw:
        status, _, raw = await _post(http, gw.v1)
    assert status == 200
    assert raw == b"".join(upstream)


@pytest.mark.parametrize("stream", [True, False])
async def test_invalid_json_with_parsing_plugins_is_survived(
    fake: FakeUpstream, http: aiohttp.ClientSession, stream: bool
) -> None:
    """token_count and content_filter parse events: a bad one must not crash the request."""
    if stream:
        fake.queue(Script([GOOD[0], b"data: {not json\n\n", *GOOD[1:]]))
    else:
        fake.queue(Script([b'{"choices": [ nope'], content_type="application/json"))
    plugins = [{"name": "token_count"}, {"name": "content_filter"}]
    async with run_gateway(config_for(fake, plugins=plugins)) as gw:
        status, content_type, raw = await _post(http, gw.v1, stream=stream)
    if stream:
        assert status == 200
        assert raw.endswith(DONE)
        assert b"{not json" in raw
    else:
        _json_502(status, content_type, raw)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"data: {not json\n\n", id="not-json"),
        pytest.param(b'data: {"id":"x","error":{"message":"boom"}}\n\n', id="error-not-first-key"),
    ],
)
async def test_untranslatable_event_for_an_anthropic_client_is_never_a_silent_end(
    fake: FakeUpstream, http: aiohttp.ClientSession, bad: bytes
) -> None:
    """/v1/messages must parse every event to translate it. Whatever it does with one it
    cannot translate, the answer must end with `message_stop` or one `event: error`."""
    fake.queue(Script([GOOD[0], GOOD[1], bad, *GOOD[2:]]))
    body = {
        "model": "m",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with (
        run_gateway(config_for(fake)) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.url + "/v1/messages", json=body) as resp,
    ):
        raw = await resp.read()
    assert resp.status == 200
    assert b'"text":"Hel"' in raw
    last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith((b"event: message_stop\n", b"event: error\n")), raw[-300:]


# ----- lines and events that never end ---------------------------------------------------------


async def test_endless_line_before_any_event_is_502_at_the_line_cap(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """The line cap ends it as soon as the line outgrows it: no wait for a timeout."""
    fake.queue(Script([b"data: " + b"x" * 5000], then="hang"))
    config = config_for(fake, server=SMALL_LIMITS, timeouts={"first_byte": 60.0})
    async with run_gateway(config) as gw:
        started = time.perf_counter()
        error = _json_502(*await _post(http, gw.v1))
        elapsed = time.perf_counter() - started
    assert "max_line_bytes=1024" in error["message"]
    assert elapsed < 3.0


@pytest.mark.parametrize(
    "endless",
    [
        pytest.param(b"data: " + b"y" * 5000, id="line-over-max_line_bytes"),
        pytest.param(b"data: y\n" * 1000, id="event-over-max_event_bytes"),
    ],
)
async def test_endless_line_or_event_after_headers_ends_with_one_error_event(
    gated: GatedUpstream, http: aiohttp.ClientSession, endless: bytes
) -> None:
    good = GOOD[:2]
    script, (gate,) = gated_script([*good, *rechunk(endless, [300])], 2, then="hang")
    gated.queue(script)
    config = config_for(gated, server=SMALL_LIMITS, timeouts={"idle": 60.0})
    async with run_gateway(config) as gw:
        async with asyncio.timeout(BOUND), http.post(gw.v1 + CHAT, json=chat_body()) as resp:
            assert resp.status == 200
            head = await resp.content.readexactly(len(b"".join(good)))
            gate.set()
            raw = head + await resp.content.read()
        (exchange,) = gated.exchanges
        async with asyncio.timeout(BOUND):
            await exchange.finished.wait()
    assert split_events(raw)[:-1] == good
    error = final_error(raw)
    assert error["type"] == "upstream_error"
    assert "exceeds max_" in error["message"]
    assert b"yyyy" not in raw  # nothing of the oversized event reached the client
    assert exchange.closed_by_peer, "the gateway must close the upstream connection"


# ----- a 200 that is a web page -----------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_200_with_an_html_body_is_502_json(
    fake: FakeUpstream, http: aiohttp.ClientSession, stream: bool
) -> None:
    """A captive portal or a misrouted base_url: 200, text/html."""
    fake.queue(Script(rechunk(HTML, [17]), content_type="text/html"))
    async with run_gateway(config_for(fake)) as gw:
        error = _json_502(*await _post(http, gw.v1, stream=stream))
    assert error["code"] == "upstream_not_an_api"
    assert "HTML page" in error["message"]
    assert "<html" not in error["message"]
    assert "It works" not in error["message"]


async def test_200_html_that_never_ends_is_refused_at_its_headers(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """The Content-Type says enough: no waiting for a first event that cannot come."""
    fake.queue(Script([HTML], content_type="text/html", then="hang"))
    config = config_for(fake, timeouts={"first_byte": 60})
    async with run_gateway(config) as gw, asyncio.timeout(BOUND):
        status, _, raw = await _post(http, gw.v1)
    assert status == 502
    assert json_error(raw)["code"] == "upstream_not_an_api"


# ----- a trickle: one byte at a time --------------------------------------------------------------
#
# The watchdog's `idle` limit is the longest gap between two upstream *reads* (any bytes),
# not between two events: a stream that trickles one byte at a time is alive and is
# relayed intact, however long its events take to complete. What bounds a trickle is
# `first_byte` (the first whole data event must arrive in time, bytes or not), `total`, and
# the decoder's line and event caps.


async def test_one_byte_at_a_time_is_relayed_intact(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """Every gap (10 ms) is far below `idle`, though the stream lasts many idle periods."""
    data = b"".join(GOOD)
    fake.queue(Script(rechunk(data, [1]), delays=0.01))
    config = config_for(fake, timeouts={"idle": 0.25, "first_byte": 30.0, "total": 60.0})
    async with run_gateway(config) as gw:
        started = time.perf_counter()
        status, _, raw = await _post(http, gw.v1, within=60.0)
        elapsed = time.perf_counter() - started
    assert status == 200
    assert raw == data
    assert elapsed > 0.25 * 4, "the trickle outlasted several idle periods"


async def test_trickle_slower_than_first_byte_is_504(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """Bytes flowing do not stand in for the first event."""
    fake.queue(Script(rechunk(b"".join(GOOD), [1]), delays=0.02))
    config = config_for(fake, timeouts={"first_byte": 0.4, "idle": 5.0})
    async with run_gateway(config) as gw:
        status, _, raw = await _post(http, gw.v1)
    assert status == 504
    assert json_error(raw)["code"] == "upstream_first_byte_timeout"


async def test_trickle_of_an_event_that_never_completes_ends_at_total(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """After the first event, an endless trickle (under the caps) is cut by `total`."""
    trickle = [b"data: " + b"z" * 5 for _ in range(1)] + [b"z"] * 400
    fake.queue(Script([GOOD[0], *trickle], delays=[0.0, *[0.02] * 401]))
    config = config_for(fake, timeouts={"idle": 0.3, "first_byte": 5.0, "total": 1.0})
    async with run_gateway(config) as gw:
        started = time.perf_counter()
        status, _, raw = await _post(http, gw.v1)
        elapsed = time.perf_counter() - started
    assert status == 200
    assert split_events(raw)[:-1] == [GOOD[0]]
    assert final_error(raw)["code"] == "upstream_total_timeout"
    assert 1.0 <= elapsed < 4.0
