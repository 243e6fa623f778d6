"""Sans-IO Server-Sent Events codec (WHATWG ``text/event-stream``), byte-faithful for proxying.

:class:`SSEDecoder` turns arbitrary byte chunks into :class:`SSEEvent` objects; every event
keeps the exact bytes it was parsed from (``raw``) so unchanged events are re-sent verbatim.
Events are meant to be treated as immutable: derive changed ones with :meth:`SSEEvent.replace`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final, NoReturn

import orjson

__all__ = ["SSEDecoder", "SSEError", "SSEEvent", "encode_events"]

_BOM: Final = b"\xef\xbb\xbf"
_DONE: Final = b"[DONE]"
_DONE_STR: Final = "[DONE]"
_UNSET: Final[Any] = object()  # "json not parsed yet" marker
_SPLIT_EOL_BYTES: Final = re.compile(rb"\r\n|\r|\n")
_FIELDS: Final = frozenset({"data", "event", "id", "retry", "comments"})
# Event names decoded once: the ones Anthropic's streams repeat on every event.
_NAMES: Final[dict[bytes, str]] = {
    name.encode(): name
    for name in (
        "content_block_delta",
        "content_block_start",
        "content_block_stop",
        "message_start",
        "message_delta",
        "message_stop",
        "ping",
        "error",
    )
}


class SSEError(Exception):
    """The byte stream broke a codec limit (line or event too long)."""


def _single_line(value: str, what: str) -> bytes:
    """UTF-8 encode a field value that must fit on one SSE line."""
    out = value.encode()
    if 10 in out or 13 in out:
        raise ValueError(f"SSE {what} must not contain CR or LF: {value!r}")
    return out


class SSEEvent:
    """One event: its fields, its comment lines, and ``raw``, the bytes it was decoded from.

    ``raw`` (None for built events) runs from the end of the previous event to the end of this
    one's blank line, so it may start with stray blank lines; ``encode()`` returns it verbatim.
    ``id`` is this block's own id field (not the sticky last-event-ID of the browser API).
    """

    __slots__ = ("_data", "_json", "_view", "comments", "event", "id", "raw", "retry")

    _data: str | bytes | None
    _json: Any
    _view: Any  # a view of the data derived once and cached (see gateway.deltas)
    event: str | None
    id: str | None
    retry: int | None
    comments: tuple[str, ...]
    raw: bytes | None

    def __init__(
        self,
        data: str | bytes | None = None,
        *,
        event: str | None = None,
        id: str | None = None,
        retry: int | None = None,
        comments: tuple[str, ...] = (),
        raw: bytes | None = None,
    ) -> None:
        self._data = data
        self.event = event
        self.id = id
        self.retry = retry
        self.comments = comments
        self.raw = raw
        self._json = self._view = _UNSET

    @property
    def data(self) -> str | None:
        """The data field as text (UTF-8, invalid bytes replaced); lines joined with "\\n"."""
        d = self._data
        if d is None or isinstance(d, str):
            return d
        return d.decode("utf-8", "replace")

    @property
    def data_bytes(self) -> bytes | None:
        """The data field as bytes (lines joined with b"\\n"), without any decoding."""
        d = self._data
        if d is None or isinstance(d, bytes):
            return d
        return d.encode()

    @property
    def is_done(self) -> bool:
        """True for OpenAI's terminal ``data: [DONE]`` sentinel."""
        d = self._data
        if isinstance(d, bytes):
            return d == _DONE
        return d == _DONE_STR

    def json(self) -> Any:
        """The data parsed as JSON (cached; shared, so do not mutate it in place).

        Raises ValueError if there is no data or it is not valid JSON.
        """
        obj = self._json
        if obj is _UNSET:
            d = self._data
            if d is None:
                raise ValueError("SSE event has no data field")
            obj = self._json = orjson.loads(d)
        return obj

    @classmethod
    def from_json(cls, obj: Any, *, event: str | None = None, id: str | None = None) -> SSEEvent:
        """An event whose data is ``obj`` serialised with orjson; ``json()`` returns ``obj``."""
        ev = cls(orjson.dumps(obj), event=event, id=id)
        ev._json = obj
        return ev

    def replace(self, **changes: Any) -> SSEEvent:
        """A copy with the given fields (data, event, id, retry, comments) changed; raw is None."""
        unknown = changes.keys() - _FIELDS
        if unknown:
            raise TypeError(f"SSEEvent.replace() got unknown fields: {sorted(unknown)}")
        return SSEEvent(
            changes.get("data", self._data),
            event=changes.get("event", self.event),
            id=changes.get("id", self.id),
            retry=changes.get("retry", self.retry),
            comments=changes.get("comments", self.comments),
        )

    def encode(self) -> bytes:
        """Wire bytes: ``raw`` if set (verbatim pass-through), else a fresh serialisation."""
        raw = self.raw
        if raw is not None:
            return raw
        d = self._data
        if isinstance(d, str):
            d = d.encode()
        if self.event is None and self.id is None and self.retry is None and not self.comments:
            if d is None:
                return b""  # nothing to send; a lone blank line would be ignored anyway
            if 10 not in d and 13 not in d:
                return b"data: " + d + b"\n\n"
        return self._serialise(d)

    def _serialise(self, d: bytes | None) -> bytes:
        """Serialise all fields: comments, event, id, retry, then one line per data line."""
        lines = [b":" + _single_line(c, "comment") for c in self.comments]
        if self.event is not None:
            lines.append(b"event: " + _single_line(self.event, "event"))
        if self.id is not None:
            if "\0" in self.id:
                raise ValueError(f"SSE id must not contain NUL (receivers ignore it): {self.id!r}")
            lines.append(b"id: " + _single_line(self.id, "id"))
        if self.retry is not None:
            if self.retry < 0:
                raise ValueError(f"SSE retry must be a non-negative integer: {self.retry!r}")
            lines.append(b"retry: %d" % self.retry)
        if d is not None:
            lines.extend([b"data: " + line for line in _SPLIT_EOL_BYTES.split(d)])
        if not lines:
            return b""
        lines.append(b"\n")
        return b"\n".join(lines)

    def __repr__(self) -> str:
        parts = [] if self._data is None else [repr(self.data)]
        for name in ("event", "id", "retry"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        if self.comments:
            parts.append(f"comments={self.comments!r}")
        return f"SSEEvent({', '.join(parts)})"


_new_event = SSEEvent.__new__


def encode_events(events: Iterable[SSEEvent]) -> bytes:
    """Concatenate the wire bytes of ``events``."""
    return b"".join([ev.encode() for ev in events])


def _split_cr(chunk: bytes) -> list[bytes]:
    """Cut ``chunk`` at every LF and lone CR (one-byte cuts); CRLF lines keep their CR."""
    pieces = chunk.split(b"\n")
    tail = pieces.pop()  # cannot end in the CR of a CRLF: a final CR is a line end
    lines: list[bytes] = []
    for piece in pieces:
        if 13 in piece:
            if piece[-1] == 13:
                lines.extend(piece[:-1].split(b"\r"))
                lines[-1] += b"\r"
            else:
                lines.extend(piece.split(b"\r"))
        else:
            lines.append(piece)
    lines.extend(tail.split(b"\r"))
    return lines


class SSEDecoder:
    """Incremental event-stream parser: feed() byte chunks, get completed events.

    Follows WHATWG parsing (LF/CRLF/CR line ends, leading BOM stripped, comments kept) except
    that every block of lines is dispatched, even without data, and ``id`` is per event rather
    than sticky. After an SSEError the decoder is unusable and raises again on every feed().
    """

    __slots__ = (
        "_buf",
        "_check_above",
        "_comments",
        "_dl",
        "_error",
        "_event",
        "_extra",
        "_head",
        "_id",
        "_in_block",
        "_max_event",
        "_max_line",
        "_partial",
        "_retry",
        "_skip_lf",
        "_slow",
        "_start",
    )

    def __init__(self, *, max_line_bytes: int = 1 << 20, max_event_bytes: int = 4 << 20) -> None:
        self._max_line = max_line_bytes
        self._max_event = max_event_bytes
        self._check_above = min(max_line_bytes, max_event_bytes)
        self._buf = bytearray()  # raw bytes of the event in progress, partial line last
        self._partial = 0  # length of the unterminated line at the end of _buf
        self._head = b""  # a possible BOM prefix held at the start of the stream
        self._start = True  # nothing past a possible BOM seen yet
        self._skip_lf = False  # last chunk ended in "\r": a leading "\n" completes the CRLF
        self._slow = True  # _start or _skip_lf or _error: feed() must run _prelude()
        self._error: str | None = None
        self._in_block = False  # a non-blank line of the current event was seen
        self._dl: list[bytes] = []  # data lines of the current event
        self._extra = 0  # fields other than data seen: 1 an event name (only), 2 others
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._comments: list[str] = []

    @property
    def has_pending(self) -> bool:
        """True if an unterminated line or event is held (at EOF: a truncated stream)."""
        return self._in_block or self._partial > 0 or bool(self._head)

    @property
    def pending_bytes(self) -> int:
        """Number of stream bytes held right now, awaiting the end of an event."""
        return len(self._buf) + len(self._head)

    def flush(self) -> list[SSEEvent]:
        """End of stream: an unterminated event is discarded (WHATWG), so this returns [].

        Leaves the state alone so ``has_pending`` still tells whether the stream was truncated.
        """
        return []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse the next chunk of the stream; return the events it completed.

        Raises SSEError if a line or an event outgrows its limit.
        """
        if self._slow:
            chunk = self._prelude(chunk)
        if 13 in chunk:  # int membership is a plain memchr, much faster than b"\r"
            self._skip_lf = self._slow = chunk[-1] == 13
            return self._run(chunk, _split_cr(chunk), True)
        return self._run(chunk, chunk.split(b"\n"), False)

    def _prelude(self, chunk: bytes) -> bytes:
        """Handle the sticky error, the leading BOM, and the "\\n" of a CRLF split over chunks."""
        if self._error is not None:
            raise SSEError(self._error)
        if self._start:
            head = self._head + chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._head = head
                return b""
            self._head = b""
            self._start = self._slow = False
            chunk = head[len(_BOM) :] if head.startswith(_BOM) else head
        elif chunk:
            self._skip_lf = self._slow = False
            if chunk[0] == 10:
                self._buf.append(10)  # part of the raw bytes of the next event
                chunk = chunk[1:]
        return chunk

    def _run(self, chunk: bytes, lines: list[bytes], crlf: bool) -> list[SSEEvent]:
        """Consume ``chunk`` cut into ``lines`` at one-byte line ends (the last one unterminated).

        If ``crlf``, a line may end in the CR of a CRLF, which is dropped from its content.
        """
        buf = self._buf
        tail = lines.pop()
        partial = self._partial
        pos = 0
        if partial and lines:
            lines[0] = bytes(buf[-partial:]) + lines[0]
            pos = -partial  # so that ends stay offsets into chunk
        # Below the smaller limit no line or event can break one: skip the checks.
        careful = len(buf) + len(chunk) > self._check_above
        if careful:
            self._check_lines(lines, crlf)
        events: list[SSEEvent] = []
        start = 0
        in_block = self._in_block
        dl = self._dl
        for line in lines:
            end = pos + len(line) + 1
            pos = end
            if crlf and line[-1:] == b"\r":
                line = line[:-1]
            if line:
                in_block = True
                if line[:6] == b"data: ":
                    dl.append(line[6:])
                elif line[:7] == b"event: ":  # named events (Anthropic's): no partition
                    value = line[7:]
                    self._event = _NAMES.get(value) or value.decode("utf-8", "replace")
                    self._extra |= 1
                else:
                    self._field(line)
            elif in_block:
                raw = chunk[start:end]
                if buf:
                    raw = bytes(buf) + raw
                    buf.clear()
                if careful:
                    self._check_event(raw)
                if len(dl) == 1 and self._extra < 2:  # the common cases, inlined:
                    ev = _new_event(SSEEvent)  # one data line, maybe a name (Anthropic's)
                    ev._data = dl.pop()
                    ev.event = self._event
                    ev.id = ev.retry = self._event = None
                    ev.comments = ()
                    ev.raw = raw
                    ev._json = ev._view = _UNSET
                    self._extra = 0
                    events.append(ev)
                else:
                    events.append(self._dispatch(raw))
                in_block = False
                start = end
        self._in_block = in_block
        self._hold(chunk, start, len(tail) if lines else partial + len(tail), careful)
        return events

    def _hold(self, chunk: bytes, start: int, partial: int, careful: bool) -> None:
        """Keep the bytes of the unfinished event, ``partial`` of them an unterminated line."""
        if start < len(chunk):
            self._buf += chunk[start:] if start else chunk
        self._partial = partial
        if careful:
            self._check_held()

    def _field(self, line: bytes) -> None:
        """Apply one non-blank line other than ``data:...`` to the event in progress."""
        if line[0] == 58:  # ":" starts a comment
            self._comments.append(line[1:].decode("utf-8", "replace"))
            self._extra |= 2
            return
        name, colon, value = line.partition(b":")  # no colon: the whole line names the field
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._dl.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
            self._extra |= 1
        elif name == b"id":
            if b"\0" not in value:
                self._id = value.decode("utf-8", "replace")
                self._extra |= 2
        elif name == b"retry" and value.isdigit():
            try:
                self._retry = int(value)
            except ValueError:  # more digits than int() accepts: ignore like any bad value
                return
            self._extra |= 2

    def _dispatch(self, raw: bytes) -> SSEEvent:
        """Build the event from the fields gathered so far and reset them."""
        dl = self._dl
        ev = _new_event(SSEEvent)
        if dl:
            ev._data = dl[0] if len(dl) == 1 else b"\n".join(dl)
            dl.clear()
        else:
            ev._data = None
        ev.raw = raw
        ev._json = ev._view = _UNSET
        if self._extra:
            ev.event = self._event
            ev.id = self._id
            ev.retry = self._retry
            ev.comments = tuple(self._comments)
            self._event = self._id = self._retry = None
            self._comments.clear()
            self._extra = 0
        else:
            ev.event = ev.id = ev.retry = None
            ev.comments = ()
        return ev

    def _check_lines(self, lines: list[bytes], crlf: bool) -> None:
        """Raise if a complete line (without its line end) is longer than max_line_bytes."""
        limit = self._max_line
        if lines and max(map(len, lines)) > limit:
            for line in lines:
                if len(line) - (crlf and line[-1:] == b"\r") > limit:
                    self._fail(f"SSE line exceeds max_line_bytes={limit}")

    def _check_event(self, raw: bytes) -> None:
        """Raise if a complete event is longer than max_event_bytes."""
        if len(raw) > self._max_event:
            self._fail(f"SSE event exceeds max_event_bytes={self._max_event}")

    def _check_held(self) -> None:
        """Raise if the held partial line or event is over its limit."""
        if self._partial > self._max_line:
            self._fail(f"SSE line exceeds max_line_bytes={self._max_line}")
        if len(self._buf) > self._max_event:
            self._fail(f"SSE event exceeds max_event_bytes={self._max_event}")

    def _fail(self, message: str) -> NoReturn:
        """Drop all held state, poison the decoder and raise SSEError."""
        self._error = message
        self._slow = True
        self._buf = bytearray()
        self._partial = 0
        self._head = b""
        self._in_block = False
        self._extra = 0
        self._dl = []
        self._comments = []
        raise SSEError(message)
