"""Per-stream state of the content filter: held text per choice, events waiting whole."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from gateway.context import RequestContext, StateKey
from gateway.deltas import (
    without_choices,
)
from gateway.sse import SSEEvent
from plugins.content_filter.stats import FilterStats

# ----- per-stream state ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Choice:
    buf: str = ""  # context already released (for lookbehind), then the held text
    start: int = 0  # where the held text begins in buf
    done: bool = False  # finished upstream or stopped by the filter

    @property
    def held(self) -> int:
        """Characters held back (not released yet)."""
        return len(self.buf) - self.start


@dataclass(slots=True)
class _Stream:
    stats: FilterStats
    n: int
    choices: dict[int, _Choice] = field(default_factory=dict)
    stopped: set[int] = field(default_factory=set)
    template: SSEEvent | None = None  # an event of this stream, for id/model of new events
    # Events held whole (one-choice streams): text events of choice `whole`, oldest first.
    # Their texts are `settled` (released, not sent yet, never redacted) + the choice's held
    # text, so once decided unchanged they go out as they came, original bytes and all.
    waiting: list[SSEEvent] = field(default_factory=list)
    waiting_texts: list[str] = field(default_factory=list)
    waiting_chars: int = 0
    settled: str = ""
    whole: int = 0

    def clear_waiting(self) -> None:
        self.waiting = []
        self.waiting_texts = []
        self.waiting_chars = 0
        self.settled = ""

    def choice(self, index: int) -> _Choice:
        ch = self.choices.get(index)
        if ch is None:
            ch = self.choices[index] = _Choice()
        return ch

    def all_done(self) -> bool:
        done = sum(1 for ch in self.choices.values() if ch.done)
        return done >= max(self.n, len(self.choices))


_STREAM: StateKey[_Stream] = StateKey("content_filter.stream")


@dataclass(slots=True)
class _Edit:
    """How one event changes: choices to drop, new texts, events to put before and after."""

    drop: set[int]
    texts: dict[int, str] = field(default_factory=dict)
    before: list[SSEEvent] = field(default_factory=list)
    after: list[SSEEvent] = field(default_factory=list)
    stopped: bool = False  # the filter ended a choice in this event


_WORD: Final = re.compile(r"[^\W_]")  # a letter or a digit


def _has_word(text: str, start: int) -> bool:
    """True if `text[start:]` has a letter or digit (not just spaces and punctuation)."""
    return _WORD.search(text, start) is not None


def _without_choice(ctx: RequestContext, events: list[SSEEvent], index: int) -> list[SSEEvent]:
    """`events` without choice `index` (those left with nothing are dropped)."""
    kept = [without_choices(ctx, event, {index}) for event in events]
    return [event for event in kept if event is not None]
