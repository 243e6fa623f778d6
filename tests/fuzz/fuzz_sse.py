"""Coverage-guided fuzzing of the SSE decoder with atheris (opt-in, not part of pytest).

    pip install atheris
    python tests/fuzz/fuzz_sse.py -max_total_time=60            # libFuzzer flags
    python tests/fuzz/fuzz_sse.py crash-<sha1>                   # replay a finding

Each input picks the limits and the read boundaries, then is decoded in those reads and in
one read. Checked: only SSEError ever escapes; no event, line or held buffer outgrows its
limit; the stream's events do not depend on the reads (up to the documented one byte of
slack on the event limit when a CRLF is split); a refusing decoder stays refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

with atheris.instrument_imports():
    from gateway.sse import SSEDecoder, SSEError, SSEEvent

_BOM = b"\xef\xbb\xbf"
Fields = tuple[bytes | None, str | None, str | None, int | None, tuple[str, ...]]


def _fields(event: SSEEvent) -> Fields:
    return (event.data_bytes, event.event, event.id, event.retry, event.comments)


def _decode(chunks: list[bytes], max_line: int, max_event: int) -> tuple[list[Fields], bool]:
    """Events before any error, and whether the decoder refused; checks the bounds as it goes."""
    decoder = SSEDecoder(max_line_bytes=max_line, max_event_bytes=max_event)
    events: list[Fields] = []
    try:
        for chunk in chunks:
            for event in decoder.feed(chunk):
                raw = event.raw
                assert raw is not None
                assert len(raw) <= max_event, (len(raw), max_event)
                for line in raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
                    assert len(line) <= max_line, (len(line), max_line)
                events.append(_fields(event))
            assert decoder.pending_bytes <= max(max_event, len(_BOM) - 1)
        assert decoder.flush() == []
    except SSEError:
        assert decoder.pending_bytes == 0
        try:
            decoder.feed(b"data: x\n\n")
        except SSEError:
            return events, True
        raise AssertionError("a decoder that refused took more input") from None
    return events, False


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_line = fdp.ConsumeIntInRange(1, 64)
    max_event = fdp.ConsumeIntInRange(1, 256)
    sizes = fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 16), 1, 32)
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    chunks, pos = [], 0
    for size in sizes:
        chunks.append(stream[pos : pos + size])
        pos += size
    chunks.append(stream[pos:])
    whole, whole_failed = _decode([stream], max_line, max_event)
    split, split_failed = _decode(chunks, max_line, max_event)
    if not whole_failed:
        assert _decode(chunks, max_line, max_event + 1) == (whole, False)
    if not split_failed:
        assert _decode([stream], max_line, max_event + 1) == (split, False)
    shorter = min(len(whole), len(split))
    assert whole[:shorter] == split[:shorter]


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
