"""The resumable stream log: ids, replay, the size bound, and lost events."""

from __future__ import annotations

import pytest

from gateway.sse import SSEDecoder, SSEEvent
from gateway.streamlog import (
    ResumeExpired,
    StreamLog,
    new_stream_id,
    parse_event_id,
    valid_stream_id,
    with_id,
)


def _decoded(raw: bytes) -> list[SSEEvent]:
    return SSEDecoder().feed(raw)


def test_ids_are_numbered_from_one_and_replayed_after_any_of_them() -> None:
    log = StreamLog("rs_test1234", "", {}, 1 << 20)
    sent = log.append(_decoded(b"data: a\n\ndata: b\n\n: keep-alive\n\ndata: c\n\n"))
    assert sent == (
        b"id: rs_test1234.1\ndata: a\n\nid: rs_test1234.2\ndata: b\n\n"
        b": keep-alive\n\nid: rs_test1234.3\ndata: c\n\n"
    )
    assert [seq for seq, _ in log.since(1)] == [2, 3]
    assert log.since(3) == []
    decoded = SSEDecoder().feed(b"".join(data for _, data in log.since(0)))
    assert [(e.id, e.data) for e in decoded] == [
        ("rs_test1234.1", "a"),
        ("rs_test1234.2", "b"),
        ("rs_test1234.3", "c"),
    ]


def test_with_id_replaces_an_upstream_id_and_keeps_stray_blank_lines_out() -> None:
    (own,) = _decoded(b"id: up-7\nevent: x\ndata: d\n\n")
    assert SSEDecoder().feed(with_id(own, "rs_a.1"))[0].id == "rs_a.1"
    (stray,) = _decoded(b"\n\r\ndata: d\n\n")
    assert with_id(stray, "rs_a.2") == b"id: rs_a.2\ndata: d\n\n"
    built = SSEEvent.from_json({"k": 1})
    assert with_id(built, "rs_a.3") == b'id: rs_a.3\ndata: {"k":1}\n\n'


def test_the_size_bound_drops_the_oldest_and_refuses_resumes_before_them() -> None:
    log = StreamLog("rs_test1234", "", {}, 4096)
    for _ in range(50):
        log.append([SSEEvent(b"x" * 200)])
    assert log.size <= 4096
    assert log.first_seq > 1
    assert log.lost  # nobody was sent the dropped ones
    with pytest.raises(ResumeExpired):
        log.since(log.first_seq - 2)
    assert log.since(log.first_seq - 1)[0][0] == log.first_seq


def test_dropping_events_a_client_already_got_loses_nothing() -> None:
    log = StreamLog("rs_test1234", "", {}, 4096)
    for _ in range(50):
        log.append([SSEEvent(b"x" * 200)])
        log.mark_delivered(log.last_seq)
    assert not log.lost


def test_event_and_stream_ids_parse_strictly() -> None:
    sid = new_stream_id()
    assert valid_stream_id(sid)
    assert parse_event_id(f"{sid}.12") == (sid, 12)
    assert parse_event_id("7") == (None, 7)
    for bad in ("", "x", "rs_short.1", f"{sid}.", f"{sid}.-1", "1.2.3", f"{sid}\r\n.1"):
        assert parse_event_id(bad) is None, bad
    assert not valid_stream_id("rs_../../etc")
