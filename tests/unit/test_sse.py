"""Tests for the sans-IO SSE codec in gateway.sse."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from itertools import pairwise

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.sse import SSEDecoder, SSEError, SSEEvent, encode_events

BOM = b"\xef\xbb\xbf"
Fields = tuple[bytes | None, str | None, str | None, int | None, tuple[str, ...]]


def fields(ev: SSEEvent) -> Fields:
    return (ev.data_bytes, ev.event, ev.id, ev.retry, ev.comments)


def decode(chunks: Iterable[bytes], **limits: int) -> tuple[list[SSEEvent], SSEDecoder]:
    dec = SSEDecoder(**limits)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += dec.feed(chunk)
    events += dec.flush()
    return events, dec


def decode_fields(chunks: Iterable[bytes]) -> list[Fields]:
    return [fields(ev) for ev in decode(chunks)[0]]


def split_at(stream: bytes, points: Iterable[int]) -> list[bytes]:
    cuts = [0, *sorted(set(points)), len(stream)]
    return [stream[a:b] for a, b in pairwise(cuts)]


# --- an independent, deliberately naive reference parser --------------------------------------

_EOL_RE = re.compile(rb"\r\n|\r|\n")


def _ref_block(lines: Sequence[bytes]) -> Fields:
    data: list[bytes] = []
    event = id_ = None
    retry = None
    comments: list[str] = []
    for line in lines:
        if line.startswith(b":"):
            comments.append(line[1:].decode("utf-8", "replace"))
            continue
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
        elif name == b"id" and b"\0" not in value:
            id_ = value.decode("utf-8", "replace")
        elif name == b"retry" and value and all(48 <= c <= 57 for c in value):
            retry = int(value)
    return (b"\n".join(data) if data else None, event, id_, retry, tuple(comments))


def reference(stream: bytes) -> tuple[list[Fields], int]:
    """Events of a whole stream (BOM already removed) and how many bytes they span."""
    events: list[Fields] = []
    block: list[bytes] = []
    pos = consumed = 0
    for m in _EOL_RE.finditer(stream):
        line, pos = stream[pos : m.start()], m.end()
        if line:
            block.append(line)
        elif block:
            events.append(_ref_block(block))
            block, consumed = [], pos
    return events, consumed


def strip_bom(stream: bytes) -> bytes:
    return stream.removeprefix(BOM)


# --- concrete cases ---------------------------------------------------------------------------


def test_lf_event() -> None:
    [ev] = decode([b'data: {"x": 1}\n\n'])[0]
    assert ev.data == '{"x": 1}'
    assert ev.data_bytes == b'{"x": 1}'
    assert (ev.event, ev.id, ev.retry, ev.comments) == (None, None, None, ())
    assert ev.raw == b'data: {"x": 1}\n\n'
    assert ev.json() == {"x": 1}


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    stream = eol.join([b"event: e", b"id: 7", b"retry: 300", b"data: a", b"data: b", b"", b""])
    [ev] = decode([stream])[0]
    assert fields(ev) == (b"a\nb", "e", "7", 300, ())
    assert ev.data == "a\nb"
    assert ev.raw == stream


def test_multiline_data_and_empty_data_lines() -> None:
    [ev] = decode([b"data: a\ndata:\ndata\ndata: b\n\n"])[0]
    assert ev.data == "a\n\n\nb"


def test_empty_data_is_not_none() -> None:
    [ev] = decode([b"data:\n\n"])[0]
    assert ev.data == ""
    assert ev.data_bytes == b""


def test_retry_needs_ascii_digits() -> None:
    stream = b"retry: 12x\n\nretry: -1\n\nretry:\n\nretry: \xd9\xa1\n\nretry:1 \n\nretry:42\n\n"
    assert [ev.retry for ev in decode([stream])[0]] == [None] * 5 + [42]


def test_retry_with_huge_digit_string_is_ignored() -> None:
    [ev] = decode([b"retry: " + b"9" * 10_000 + b"\n\n"])[0]
    assert ev.retry is None


def test_id_with_nul_is_ignored() -> None:
    stream = b"id: a\x00b\ndata: x\n\nid: 1\nid: 2\x00\n\nid\n\n"
    assert [ev.id for ev in decode([stream])[0]] == [None, "1", ""]


def test_last_field_value_wins() -> None:
    [ev] = decode([b"event: a\nevent: b\nid: 1\nid: 2\nretry: 1\nretry: 2\n\n"])[0]
    assert (ev.event, ev.id, ev.retry) == ("b", "2", 2)


def test_comments_are_kept_verbatim() -> None:
    [ev] = decode([b": ping\n:\n:  two spaces\ndata: x\n\n"])[0]
    assert ev.comments == (" ping", "", "  two spaces")
    assert ev.data == "x"


def test_keepalive_comment_block_is_an_event_without_data() -> None:
    [ping, ev] = decode([b": ping\n\ndata: 1\n\n"])[0]
    assert fields(ping) == (None, None, None, None, (" ping",))
    assert ping.data is None
    assert ping.raw == b": ping\n\n"
    assert ev.data == "1"


def test_block_of_ignored_lines_is_still_an_event() -> None:
    [ev] = decode([b"foo: bar\nData: x\n\n"])[0]
    assert fields(ev) == (None, None, None, None, ())
    assert ev.raw == b"foo: bar\nData: x\n\n"


def test_field_without_colon() -> None:
    [ev] = decode([b"data\nevent\n\n"])[0]
    assert (ev.data, ev.event) == ("", "")


@pytest.mark.parametrize(
    ("line", "value"),
    [
        (b"data:x", "x"),
        (b"data: x", "x"),
        (b"data:  x", " x"),
        (b"data:x ", "x "),
        (b"data: :x:", ":x:"),
        (b"data:\tx", "\tx"),
    ],
)
def test_only_one_space_after_colon_is_removed(line: bytes, value: str) -> None:
    [ev] = decode([line + b"\n\n"])[0]
    assert ev.data == value


def test_field_names_are_case_sensitive_and_unknown_ignored() -> None:
    [ev] = decode([b"DATA: x\nEvent: y\nfoo: z\ndata: ok\n\n"])[0]
    assert fields(ev) == (b"ok", None, None, None, ())


def test_leading_bom_is_stripped_once() -> None:
    events, dec = decode([BOM + BOM + b"data: x\n\n" + BOM + b"data: y\n\n"])
    assert len(events) == 2
    # The second BOM is part of the first line's field name, so that line is an unknown field.
    assert fields(events[0]) == (None, None, None, None, ())
    assert events[0].raw == BOM + b"data: x\n\n"
    assert fields(events[1]) == (None, None, None, None, ())
    assert not dec.has_pending


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_bom_split_across_chunks(cut: int) -> None:
    stream = BOM + b"data: x\n\n"
    events, _ = decode([stream[:cut], stream[cut:]])
    assert [ev.raw for ev in events] == [b"data: x\n\n"]


def test_bom_prefix_that_is_not_a_bom_is_kept() -> None:
    events, _ = decode([b"\xef", b"\xbb", b"x\n", b"data: y\n\n"])
    assert [ev.raw for ev in events] == [b"\xef\xbbx\ndata: y\n\n"]


def test_bom_only_inside_the_stream_is_data() -> None:
    [ev] = decode([b"data: " + BOM + b"x\n\n"])[0]
    assert ev.data == "\ufeffx"


def test_blank_line_runs() -> None:
    stream = b"\n\n\r\n\rdata: a\n\n\n\n\ndata: b\r\n\r\n\r\n"
    events, dec = decode([stream])
    assert [ev.data for ev in events] == ["a", "b"]
    assert [ev.raw for ev in events] == [b"\n\n\r\n\rdata: a\n\n", b"\n\n\ndata: b\r\n\r\n"]
    assert not dec.has_pending
    assert dec.pending_bytes == 2  # the trailing blank line is held but is no event


def test_only_blank_lines_emit_nothing() -> None:
    events, dec = decode([b"\n\r\n\r\r\n\n"])
    assert events == []
    assert not dec.has_pending


@pytest.mark.parametrize(
    "tail", [b"data: partial", b"data: complete line\n", b"data: x\r", b"data: x\r\n", b":c\n"]
)
def test_unterminated_tail_is_discarded(tail: bytes) -> None:
    dec = SSEDecoder()
    assert [ev.data for ev in dec.feed(b"data: 1\n\n" + tail)] == ["1"]
    assert dec.has_pending
    assert dec.pending_bytes == len(tail)
    assert dec.flush() == []
    assert dec.has_pending  # flush() keeps the evidence of truncation


def test_has_pending_while_bom_prefix_is_held() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"\xef\xbb") == []
    assert dec.has_pending
    assert dec.pending_bytes == 2


def test_fresh_decoder_has_nothing_pending() -> None:
    dec = SSEDecoder()
    assert not dec.has_pending
    assert dec.pending_bytes == 0
    assert dec.feed(b"") == []
    assert dec.flush() == []


def test_split_inside_multibyte_utf8() -> None:
    stream = "data: héllo €𝄞\nevent: ü\n\n".encode()
    for cut in range(len(stream) + 1):
        [ev] = decode([stream[:cut], stream[cut:]])[0]
        assert (ev.data, ev.event) == ("héllo €𝄞", "ü")


def test_invalid_utf8_is_replaced_in_text_but_kept_in_bytes() -> None:
    [ev] = decode([b"data: a\xffb\xe2\x82\nevent: \xc3\n: \xfe\n\n"])[0]
    assert ev.data == "a\ufffdb\ufffd"
    assert ev.data_bytes == b"a\xffb\xe2\x82"
    assert ev.event == "\ufffd"
    assert ev.comments == (" \ufffd",)


def test_split_between_cr_and_lf() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\r") == []
    assert dec.feed(b"\ndata: b\r") == []
    assert [ev.data for ev in dec.feed(b"\n\r")] == ["a\nb"]
    assert dec.feed(b"\n") == []  # the LF of the split CRLF, not a second blank line
    assert not dec.has_pending
    [ev] = dec.feed(b"data: c\r\n\r\n")
    assert ev.raw == b"\ndata: c\r\n\r\n"  # the skipped LF travels with the next event


def test_lone_cr_at_chunk_end_is_a_line_end_at_once() -> None:
    dec = SSEDecoder()
    [ev] = dec.feed(b"data: a\r\r")
    assert ev.data == "a"
    assert ev.raw == b"data: a\r\r"


def test_cr_only_stream() -> None:
    stream = b"event: e\rdata: a\rdata: b\r\r:c\r\rdata: z\r\r"
    events, dec = decode([stream])
    assert [fields(ev) for ev in events] == [
        (b"a\nb", "e", None, None, ()),
        (None, None, None, None, ("c",)),
        (b"z", None, None, None, ()),
    ]
    assert b"".join(ev.raw or b"" for ev in events) == stream
    assert not dec.has_pending
    assert decode_fields(bytes([b]) for b in stream) == [fields(ev) for ev in events]


def test_mixed_line_endings_in_one_chunk() -> None:
    stream = b"data: a\r\ndata: b\rdata: c\ndata: d\r\r\ndata: e\n\r"
    events, _ = decode([stream])
    assert [ev.data for ev in events] == ["a\nb\nc\nd", "e"]
    assert b"".join(ev.raw or b"" for ev in events) == stream


def test_event_arriving_in_many_small_chunks() -> None:
    stream = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n' * 3
    events, _ = decode(stream[i : i + 3] for i in range(0, len(stream), 3))
    assert [ev.json() for ev in events] == [{"choices": [{"delta": {"content": "hi"}}]}] * 3
    assert b"".join(ev.raw or b"" for ev in events) == stream


def test_line_limit() -> None:
    ok, _ = decode([b"data: " + b"x" * 10 + b"\n\n"], max_line_bytes=16)
    assert ok[0].data == "x" * 10
    # exactly at the limit is fine, whole or trickled, with either line end
    for eol in (b"\n", b"\r\n", b"\r"):
        line = b"data: " + b"x" * 10
        assert len(decode([line + eol + eol], max_line_bytes=16)[0]) == 1
        assert len(decode([bytes([b]) for b in line + eol + eol], max_line_bytes=16)[0]) == 1
    with pytest.raises(SSEError, match="max_line_bytes=16"):
        decode([b"data: " + b"x" * 11 + b"\n\n"], max_line_bytes=16)
    dec = SSEDecoder(max_line_bytes=16)
    dec.feed(b"data: " + b"x" * 10)
    with pytest.raises(SSEError, match="line"):
        dec.feed(b"y")  # held partial line grows past the limit


def test_line_limit_applies_to_unterminated_line_in_one_chunk() -> None:
    dec = SSEDecoder(max_line_bytes=8, max_event_bytes=1000)
    with pytest.raises(SSEError):
        dec.feed(b"data: 1\n\n" + b"x" * 9)


def test_event_limit() -> None:
    event = b"data: 1234\n" * 3 + b"\n"  # 34 bytes
    assert len(decode([event], max_line_bytes=16, max_event_bytes=34)[0]) == 1
    with pytest.raises(SSEError, match="max_event_bytes=33"):
        decode([event], max_line_bytes=16, max_event_bytes=33)
    dec = SSEDecoder(max_line_bytes=16, max_event_bytes=33)
    for b in event[:-1]:
        dec.feed(bytes([b]))
    assert dec.pending_bytes == 33
    with pytest.raises(SSEError, match="event"):
        dec.feed(event[-1:])


def test_event_limit_counts_leading_blank_lines() -> None:
    dec = SSEDecoder(max_line_bytes=8, max_event_bytes=8)
    dec.feed(b"\n" * 8)
    with pytest.raises(SSEError):
        dec.feed(b"\n")


def test_decoder_is_unusable_after_error() -> None:
    dec = SSEDecoder(max_line_bytes=4)
    with pytest.raises(SSEError):
        dec.feed(b"data: toolong\n\n")
    assert dec.pending_bytes == 0
    with pytest.raises(SSEError):
        dec.feed(b"\n\n")


# --- SSEEvent ---------------------------------------------------------------------------------


def test_constructor_defaults() -> None:
    ev = SSEEvent()
    assert fields(ev) == (None, None, None, None, ())
    assert ev.raw is None
    assert ev.data is None
    assert not ev.is_done


def test_str_and_bytes_data_views() -> None:
    assert SSEEvent("é").data_bytes == "é".encode()
    assert SSEEvent("é".encode()).data == "é"
    assert SSEEvent(b"\xff").data == "\ufffd"
    assert SSEEvent(b"\xff").data_bytes == b"\xff"


def test_encode_simple_and_full() -> None:
    assert SSEEvent('{"a":1}').encode() == b'data: {"a":1}\n\n'
    assert SSEEvent(b"x").encode() == b"data: x\n\n"
    ev = SSEEvent("a\r\nb\rc\nd", event="e", id="1", retry=5, comments=(" hi", ""))
    assert ev.encode() == (
        b": hi\n:\nevent: e\nid: 1\nretry: 5\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    )
    assert SSEEvent("").encode() == b"data: \n\n"
    assert SSEEvent("a\n").encode() == b"data: a\ndata: \n\n"
    assert SSEEvent(comments=(" ping",)).encode() == b": ping\n\n"
    assert SSEEvent().encode() == b""


def test_encode_returns_raw_verbatim() -> None:
    stream = b"\r\n:c\r\ndata:x\r\n\r\n"
    [ev] = decode([stream])[0]
    assert ev.encode() == stream
    assert encode_events(decode([stream * 3])[0]) == stream * 3


@pytest.mark.parametrize(
    "ev",
    [
        SSEEvent("x", event="a\nb"),
        SSEEvent("x", id="a\rb"),
        SSEEvent("x", id="a\0b"),
        SSEEvent("x", retry=-1),
        SSEEvent(comments=("a\nb",)),
    ],
)
def test_encode_rejects_fields_that_break_framing(ev: SSEEvent) -> None:
    with pytest.raises(ValueError, match="SSE"):
        ev.encode()


def test_encode_roundtrip_concrete() -> None:
    ev = SSEEvent("é\n€", event="message", id="42", retry=1000, comments=(" keep", ":x"))
    [back] = decode([ev.encode()])[0]
    assert fields(back) == fields(ev)


def test_json_and_from_json() -> None:
    obj = {"choices": [{"delta": {"content": "é"}}], "n": None}
    ev = SSEEvent.from_json(obj, event="chunk", id="3")
    assert ev.data_bytes == orjson.dumps(obj)
    assert ev.json() is obj
    assert (ev.event, ev.id, ev.raw) == ("chunk", "3", None)
    [back] = decode([ev.encode()])[0]
    parsed = back.json()
    assert parsed == obj
    assert back.json() is parsed  # cached


def test_json_errors() -> None:
    with pytest.raises(ValueError, match="no data"):
        SSEEvent().json()
    with pytest.raises(orjson.JSONDecodeError):  # a ValueError subclass
        SSEEvent("[DONE]").json()
    assert issubclass(orjson.JSONDecodeError, ValueError)
    assert SSEEvent("[1, 2]").json() == [1, 2]


def test_replace() -> None:
    [ev] = decode([b"event: e\nid: 1\n: c\ndata: x\n\n"])[0]
    assert ev.raw is not None
    new = ev.replace(data="y")
    assert fields(new) == (b"y", "e", "1", None, (" c",))
    assert new.raw is None
    assert ev.data == "x"
    same = ev.replace()
    assert fields(same) == fields(ev)
    assert same.raw is None
    assert same.encode() == b": c\nevent: e\nid: 1\ndata: x\n\n"
    assert ev.replace(event=None, comments=()).encode() == b"id: 1\ndata: x\n\n"
    with pytest.raises(TypeError, match="raw"):
        ev.replace(raw=b"")


def test_replace_drops_json_cache() -> None:
    ev = SSEEvent.from_json({"a": 1})
    assert ev.replace(data=b'{"a": 2}').json() == {"a": 2}


def test_is_done() -> None:
    assert decode([b"data: [DONE]\n\n"])[0][0].is_done
    assert decode([b"data:[DONE]\n\n"])[0][0].is_done
    assert not decode([b"data: [DONE] \n\n"])[0][0].is_done
    assert not decode([b": [DONE]\n\n"])[0][0].is_done
    assert SSEEvent("[DONE]").is_done
    assert SSEEvent(b"[DONE]").is_done
    assert not SSEEvent("{}").is_done
    assert not SSEEvent().is_done


def test_repr() -> None:
    text = repr(SSEEvent("hi", event="e", retry=3, comments=("c",)))
    assert text == "SSEEvent('hi', event='e', retry=3, comments=('c',))"
    assert repr(SSEEvent()) == "SSEEvent()"


def test_encode_events_empty() -> None:
    assert encode_events([]) == b""


# --- every split point of fixed transcripts --------------------------------------------------

TRANSCRIPTS = [
    b'data: {"a":"h\xc3\xa9llo \xe2\x82\xac"}\n\ndata: {"b":2}\n\n: ping\n\ndata: [DONE]\n\n',
    BOM + b"event: start\r\nid: 1\r\ndata: a\r\ndata: b\r\n\r\n:c\r\n\r\ndata: tail",
    b"data: x\r\rdata: y\rdata:z\r\r\r",
    b"\n\n\r\ndata\ndata:\n\nretry: 10\nretry: x\r\n\r\nid: a\x00\n\n",
    b"data: \xf0\x9f\x98\x80\r\n\r\ndata: \xe2\x82\xac\r\r\n\n",
]


@pytest.mark.parametrize("stream", TRANSCRIPTS)
def test_every_split_point(stream: bytes) -> None:
    body = strip_bom(stream)
    expected, consumed = reference(body)
    assert decode_fields([stream]) == expected
    for cut in range(len(stream) + 1):
        events, _ = decode([stream[:cut], stream[cut:]])
        assert [fields(ev) for ev in events] == expected, cut
        joined = b"".join(ev.raw or b"" for ev in events)
        assert body.startswith(joined)
        assert consumed - 1 <= len(joined) <= consumed  # the LF of a split CRLF may be held
    assert decode_fields(bytes([b]) for b in stream) == expected


@pytest.mark.parametrize("stream", TRANSCRIPTS[2:])
def test_every_pair_of_split_points(stream: bytes) -> None:
    expected = reference(strip_bom(stream))[0]
    n = len(stream)
    for i in range(n + 1):
        for j in range(i, n + 1):
            assert decode_fields([stream[:i], stream[i:j], stream[j:]]) == expected, (i, j)


# --- property-based tests ---------------------------------------------------------------------

_EOLS = st.sampled_from([b"\n", b"\r\n", b"\r"])
_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
_RAW_VALUE = st.binary(max_size=10).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_VALUES = st.one_of(_TEXT.map(str.encode), _RAW_VALUE)
_DIGITS = st.integers(0, 10**12).map(lambda n: str(n).encode())
_NAMES = st.sampled_from([b"data", b"data", b"data", b"event", b"id", b"retry", b"foo", b""])


@st.composite
def sse_lines(draw: st.DrawFn) -> bytes:
    """One non-blank line: a field (any spacing), a comment, or a bare field name."""
    kind = draw(st.sampled_from(["field", "field", "field", "comment", "bare"]))
    if kind == "comment":
        return b":" + draw(_VALUES)
    name = draw(_NAMES)
    if kind == "bare" and name:
        return name
    value = draw(_DIGITS) if name == b"retry" and draw(st.booleans()) else draw(_VALUES)
    if name == b"id" and draw(st.booleans()):
        value += b"\x00"
    return name + draw(st.sampled_from([b":", b": ", b":  "])) + value


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """Events with random fields and a random line end per line, maybe a BOM and a tail."""
    out = [BOM] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 5))):
        out += draw(st.lists(_EOLS, max_size=2))  # stray blank lines
        out += [line + draw(_EOLS) for line in draw(st.lists(sse_lines(), min_size=1, max_size=5))]
        out.append(draw(_EOLS))
    if draw(st.booleans()):
        out.append(draw(sse_lines()))
        if draw(st.booleans()):
            out.append(draw(_EOLS))
    return b"".join(out)


@st.composite
def streams_and_chunks(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    stream = draw(sse_streams())
    if draw(st.integers(0, 9)) == 0:
        return stream, [bytes([b]) for b in stream]
    points = draw(st.lists(st.integers(0, len(stream)), max_size=12))
    return stream, split_at(stream, points)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams_and_chunks())
def test_any_chunking_gives_the_same_events(case: tuple[bytes, list[bytes]]) -> None:
    stream, chunks = case
    expected = reference(strip_bom(stream))[0]
    assert decode_fields([stream]) == expected
    assert decode_fields(chunks) == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams_and_chunks())
def test_raw_bytes_reassemble_the_stream(case: tuple[bytes, list[bytes]]) -> None:
    stream, chunks = case
    body = strip_bom(stream)
    _, consumed = reference(body)
    whole, dec = decode([stream])
    assert b"".join(ev.raw or b"" for ev in whole) == body[:consumed]
    events, dec = decode(chunks)
    joined = b"".join(ev.raw or b"" for ev in events)
    rest = body[len(joined) :]
    assert body.startswith(joined)
    assert consumed - 1 <= len(joined) <= consumed  # a split CRLF's LF may be held back
    assert dec.pending_bytes == len(rest)
    assert reference(rest)[0] == []
    # Pending iff the unconsumed rest holds more than line ends (a partial line or block).
    assert dec.has_pending == bool(rest.strip(b"\r\n"))


@st.composite
def lf_streams_and_chunks(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """LF-only streams of mostly one-line `data: ` events (what OpenAI-compatible servers
    send), mixed with other fields, comments, multi-line events and stray blank lines,
    randomly chunked."""
    out: list[bytes] = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.integers(0, 3)):
            out.append(b"data: " + draw(_VALUES) + b"\n\n")
        else:
            out += [b"\n"] * draw(st.integers(0, 1))
            lines = draw(st.lists(sse_lines(), min_size=1, max_size=3))
            out.append(b"".join(line + b"\n" for line in lines) + b"\n")
    if draw(st.booleans()):
        out.append(b"data: " + draw(_VALUES) + draw(st.sampled_from([b"", b"\n"])))
    stream = b"".join(out)
    points = draw(st.lists(st.integers(0, len(stream)), max_size=6))
    return stream, split_at(stream, points)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lf_streams_and_chunks())
def test_lf_streams_of_one_line_data_events_decode_like_the_reference(
    case: tuple[bytes, list[bytes]],
) -> None:
    stream, chunks = case
    expected, consumed = reference(stream)
    for parts in ([stream], chunks):
        assert decode_fields(parts) == expected
        events, dec = decode(parts)
        assert b"".join(ev.raw or b"" for ev in events) == stream[:consumed]
        assert dec.pending_bytes == len(stream) - consumed


_FIELD_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)


@st.composite
def constructed_events(draw: st.DrawFn) -> SSEEvent:
    data = draw(st.one_of(st.none(), st.text(st.characters(codec="utf-8")), st.binary()))
    ev = SSEEvent(
        data,
        event=draw(st.none() | _FIELD_TEXT),
        id=draw(st.none() | _FIELD_TEXT.filter(lambda s: "\0" not in s)),
        retry=draw(st.none() | st.integers(0, 2**63)),
        comments=tuple(draw(st.lists(_FIELD_TEXT, max_size=3))),
    )
    assume(fields(ev) != (None, None, None, None, ()))
    return ev


def normalised(ev: SSEEvent) -> Fields:
    data = ev.data_bytes
    if data is not None:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return (data, ev.event, ev.id, ev.retry, ev.comments)


@settings(max_examples=300, deadline=None)
@given(st.lists(constructed_events(), max_size=6))
def test_encode_then_decode_roundtrips(events: list[SSEEvent]) -> None:
    wire = encode_events(events)
    decoded, dec = decode([wire])
    assert [fields(ev) for ev in decoded] == [normalised(ev) for ev in events]
    assert not dec.has_pending
    assert b"".join(ev.raw or b"" for ev in decoded) == wire
    assert encode_events(decoded) == wire


@settings(max_examples=200, deadline=None)
@given(constructed_events())
def test_encode_then_decode_data_text(ev: SSEEvent) -> None:
    [back] = decode([ev.encode()])[0]
    text = ev.data
    assert back.data == (None if text is None else re.sub(r"\r\n?", "\n", text))


_NOISE = st.binary(max_size=300) | st.lists(
    st.sampled_from([b"data: ", b"data:", b":", b"\r", b"\n", b"\r\n", b"x", b"\xef", b"\xbb\xbf"]),
    max_size=80,
).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _NOISE,
    st.lists(st.integers(0, 300), max_size=10),
    st.integers(1, 40),
    st.integers(1, 80),
)
def test_arbitrary_bytes_only_raise_sseerror_and_stay_bounded(
    stream: bytes, points: list[int], max_line: int, max_event: int
) -> None:
    dec = SSEDecoder(max_line_bytes=max_line, max_event_bytes=max_event)
    try:
        for chunk in split_at(stream, [p for p in points if p <= len(stream)]):
            for ev in dec.feed(chunk):
                assert ev.raw is not None
                assert len(ev.raw) <= max_event
                assert all(len(line) <= max_line for line in _EOL_RE.split(ev.raw))
            assert dec.pending_bytes <= max(max_event, len(BOM) - 1)
        assert dec.flush() == []
    except SSEError:
        assert dec.pending_bytes == 0


def _outcome(chunks: Iterable[bytes], max_line: int, max_event: int) -> tuple[list[Fields], bool]:
    """The events decoded before any error, and whether a limit was hit."""
    dec = SSEDecoder(max_line_bytes=max_line, max_event_bytes=max_event)
    events: list[Fields] = []
    try:
        for chunk in chunks:
            events += [fields(ev) for ev in dec.feed(chunk)]
    except SSEError:
        with pytest.raises(SSEError):  # poisoned: it keeps refusing
            dec.feed(b"data: x\n\n")
        return events, True
    return events, False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams_and_chunks(), st.integers(1, 40), st.integers(1, 120))
def test_whether_a_limit_fires_does_not_depend_on_chunking(
    case: tuple[bytes, list[bytes]], max_line: int, max_event: int
) -> None:
    """A stream within the limits passes however it is cut; before an error, the events
    delivered are a prefix of the stream's events (one read may be refused whole).

    One byte of slack on the event limit: the LF of a CRLF split across two reads belongs
    to the next event's raw bytes (test_raw_bytes_reassemble_the_stream), so an event's
    size, and whether it is just over max_event_bytes, can move by one byte with the cut.
    """
    stream, chunks = case
    expected = reference(strip_bom(stream))[0]
    whole, whole_failed = _outcome([stream], max_line, max_event)
    split, split_failed = _outcome(chunks, max_line, max_event)
    if not whole_failed:
        assert _outcome(chunks, max_line, max_event + 1) == (expected, False)
    if not split_failed:
        assert _outcome([stream], max_line, max_event + 1) == (expected, False)
    assert split == expected[: len(split)]
    assert whole == expected[: len(whole)]


def test_event_limit_slack_of_a_split_crlf() -> None:
    """The case above, concretely: the first event is 21 bytes in one read, but 20 when its
    last LF arrives in the next read (and the second event 8 bytes instead of 7)."""
    stream = b"data: " + b"x" * 11 + b"\r\n\r\ndata:\n\n"
    assert _outcome([stream], 17, 20) == ([], True)
    cut = len(stream) - len(b"\ndata:\n\n")
    both = [(b"x" * 11, None, None, None, ()), (b"", None, None, None, ())]
    assert _outcome([stream[:cut], stream[cut:]], 17, 20) == (both, False)
    assert _outcome([stream], 17, 21) == (both, False)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TEXT.map(str.encode), min_size=1, max_size=5), st.sampled_from([b"\n", b"\r\n"]))
def test_limits_are_inclusive_and_exact(lines: list[bytes], eol: bytes) -> None:
    """A line of exactly max_line_bytes (line end not counted) and an event of exactly
    max_event_bytes (raw bytes, line ends counted) pass; one byte less of limit fails."""
    stream = b"".join(b"data: " + line + eol for line in lines) + eol
    longest = max(len(b"data: " + line) for line in lines)
    events, failed = _outcome([stream], longest, len(stream))
    assert not failed
    assert len(events) == 1
    assert _outcome([stream], longest - 1, len(stream))[1]
    assert _outcome([stream], longest, len(stream) - 1)[1]
    assert _outcome([bytes([b]) for b in stream], longest - 1, len(stream))[1]


def test_named_events_split_anywhere_keep_name_data_and_bytes() -> None:
    """Anthropic's framing (`event:` then one `data:` line) has a fast path of its own; an
    id, a second data line or `event:` without its space take the general one."""
    stream = (
        b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n'
        b"event: ping\nid: 7\ndata: {}\n\n"
        b"event:custom\ndata: a\ndata: b\n\n"
        b"data: plain\n\n"
        b"event: message_stop\ndata: {}\n\n"
    )
    expected = [
        ("content_block_delta", '{"type":"content_block_delta"}', None),
        ("ping", "{}", "7"),
        ("custom", "a\nb", None),
        (None, "plain", None),
        ("message_stop", "{}", None),
    ]
    for cut in range(len(stream) + 1):
        decoder = SSEDecoder()
        events = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert [(e.event, e.data, e.id) for e in events] == expected, cut
        assert b"".join(e.encode() for e in events) == stream
