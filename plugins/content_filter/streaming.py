"""Streamed completions: what the content filter holds back, releases, rewrites or stops."""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate

from gateway.context import RequestContext
from gateway.deltas import (
    event_texts,
    finish_reasons,
    stop_events,
    text_delta,
    text_event,
    with_texts,
    without_choices,
)
from gateway.plugin import EndStream
from gateway.sse import SSEEvent
from plugins.content_filter.scanner import Scanner
from plugins.content_filter.state import (
    _STREAM,
    _Choice,
    _Edit,
    _has_word,
    _Stream,
    _without_choice,
)
from plugins.content_filter.stats import CONTENT_FILTER


class StreamFilter:
    """The hold/release state machine of streamed completions (see the package docstring,
    "Streams"); mixed into `ContentFilter`, which sets the attributes below."""

    scanner: Scanner
    _stop: bool
    _whole: bool

    @property
    def window(self) -> int:
        """The most characters held back per choice."""
        return self.scanner.window

    def _feed(self, st: _Stream, ch: _Choice, text: str, final: bool) -> tuple[str, int, bool]:
        """Add `text` to a choice; return what to release now, the rule that stopped (-1)
        and whether the released text is unredacted (the text as it came)."""
        sc = self.scanner
        buf = ch.buf + text
        out, frontier, stopped, hits = sc.scan(buf, ch.start, final, self._stop)
        if stopped >= 0:
            ch.buf, ch.start = "", 0
            return out, stopped, False
        held = len(buf) - frontier
        if held > st.stats.held_max:
            st.stats.held_max = held
        keep = frontier - sc.context
        if keep > 0:
            ch.buf, ch.start = buf[keep:], sc.context
        else:
            ch.buf, ch.start = buf, frontier
        if hits:
            for rule in hits:
                st.stats.record(sc.names[rule], "completion_redact")
            return out, -1, False
        return out, -1, True

    def _stopped(
        self,
        ctx: RequestContext,
        st: _Stream,
        index: int,
        safe: str,
        rule: int,
        template: SSEEvent,
        edit: _Edit | None = None,
    ) -> list[SSEEvent]:
        """Events that end one choice: its text before the match, then the filter's finish."""
        st.choice(index).done = True
        st.stopped.add(index)
        st.stats.record(self.scanner.names[rule], "completion_stop")
        if edit is not None:
            edit.stopped = True
            edit.drop.add(index)
        events = [text_event(ctx, template, index, safe)] if safe else []
        events += stop_events(ctx, template, index, CONTENT_FILTER)
        return events

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        st = ctx.get(_STREAM)
        if st is None:
            return None
        return self._one(ctx, st, event)

    def on_events(self, ctx: RequestContext, events: list[SSEEvent]) -> list[SSEEvent] | None:
        """A batch (one upstream read): runs of one choice's text are decided in one scan."""
        st = ctx.get(_STREAM)
        if st is None:
            return None
        if len(events) == 1:
            return self._one(ctx, st, events[0]) if events[0].data_bytes is not None else None
        result: list[SSEEvent] = []
        run: list[SSEEvent] = []
        texts: list[str] = []
        index = -1
        try:
            for event in events:
                plain = text_delta(ctx, event)
                if plain is not None and plain[0] == index:
                    run.append(event)
                    texts.append(plain[1])
                    continue
                if run:
                    result += self._run(ctx, st, index, run, texts)
                    run, texts = [], []
                if plain is not None and not st.stopped:
                    index, run, texts = plain[0], [event], [plain[1]]
                    continue
                index = -1
                if event.data_bytes is None:  # a comment: not for plugins, keeps its place
                    result.append(event)
                    continue
                one = self._one(ctx, st, event)
                result += [event] if one is None else one
            if run:
                result += self._run(ctx, st, index, run, texts)
        except EndStream as end:
            end.events = [*result, *end.events]
            raise
        return result

    def _run(
        self, ctx: RequestContext, st: _Stream, index: int, run: list[SSEEvent], texts: list[str]
    ) -> list[SSEEvent]:
        out = self._take(ctx, st, index, run, texts)
        return run if out is None else out

    def _one(self, ctx: RequestContext, st: _Stream, event: SSEEvent) -> list[SSEEvent] | None:
        """One event, as `on_event`."""
        if not st.stopped:
            plain = text_delta(ctx, event)  # no JSON parse for the usual one-token chunk
            if plain is not None:
                return self._take(ctx, st, plain[0], [event], [plain[1]])
        texts = event_texts(ctx, event)
        finishes = finish_reasons(ctx, event)
        if not finishes and not st.stopped:
            if len(texts) == 1:
                ((index, text),) = texts.items()
                return self._take(ctx, st, index, [event], [text])
            if not texts:  # role or usage chunk: nothing of its own to hold
                return [*self._send_waiting(ctx, st), event] if st.waiting else None
        return self._on_chunk(ctx, st, event, texts, finishes)

    def _take(
        self,
        ctx: RequestContext,
        st: _Stream,
        index: int,
        events: list[SSEEvent],
        texts: list[str],
    ) -> list[SSEEvent] | None:
        """The hot path: events with text for one choice and nothing else, in order.

        Returns None when they all pass as they came. Their text is scanned in one go; each
        event whose whole text is released goes out unchanged. One whose text is only partly
        released waits, whole, when that part has no letter or digit (a space, punctuation);
        otherwise the released part goes out at once, in it.
        """
        ch = st.choice(index)
        if ch.done:
            out: list[SSEEvent] = []
            for event, text in zip(events, texts, strict=True):
                one = self._on_chunk(ctx, st, event, {index: text}, {})
                out += [event] if one is None else one
            return out
        sent = self._send_waiting(ctx, st) if st.waiting and index != st.whole else []
        if st.template is None:
            st.template = events[0]
        before = ch.held
        released, rule, clean = self._feed(st, ch, "".join(texts), False)
        if rule >= 0:
            return [*sent, *self._stop_run(ctx, st, index, events, released, rule)]
        given = events
        if st.waiting:
            lead, settled = "", st.settled + released
            events, texts = [*st.waiting, *events], [*st.waiting_texts, *texts]
            st.clear_waiting()
            if not clean:
                return [*sent, *self._redacted(ctx, st, index, events, texts, settled)]
        elif clean and before <= len(released):
            lead, settled = released[:before], released[before:]
        else:  # a redaction, or text held from earlier events still partly held
            return [*sent, *self._redacted(ctx, st, index, events, texts, released)]
        out = self._settle(ctx, st, index, events, texts, lead, settled)
        if out is given and not sent:
            return None  # all pass as they came
        return [*sent, *out]

    def _settle(
        self,
        ctx: RequestContext,
        st: _Stream,
        index: int,
        events: list[SSEEvent],
        texts: list[str],
        lead: str,
        settled: str,
    ) -> list[SSEEvent]:
        """What to send of `events`, whose text is `settled` (released, unredacted) followed
        by the choice's held text, and hold the rest; `lead` is earlier held text, released
        now, to go first. `events` itself when they all go as they came."""
        ends = list(accumulate(map(len, texts)))  # where each event's text ends
        k = bisect_right(ends, len(settled))  # the events whose text is all released
        if k == len(events) and not lead:
            return events
        pos = ends[k - 1] if k else 0
        rest = settled[pos:]
        waiting = ends[-1] - pos
        if k < len(events) and self._may_wait(st, waiting, rest, lead):
            self._wait(st, index, events[k:], texts[k:], rest, waiting)
            head = [text_event(ctx, events[0], index, lead)] if lead else []
            return [*head, *events[:k]]
        out = events[:k]
        if k < len(events):  # released text with letters or digits goes out at once
            out.append(with_texts(ctx, events[k], {index: rest}))
            out += [with_texts(ctx, event, {index: ""}) for event in events[k + 1 :]]
        if lead:
            out[0] = with_texts(ctx, events[0], {index: lead + (texts[0] if k else rest)})
        return out

    def _may_wait(self, st: _Stream, waiting: int, released: str, lead: str) -> bool:
        """May events holding `waiting` characters wait whole, `released` of theirs decided
        already (and `lead`, earlier held text, released now)?"""
        if st.n != 1 or waiting > self.window:
            return False
        return not _has_word(released, 0) if self._whole else not (released or lead)

    @staticmethod
    def _wait(
        st: _Stream, index: int, events: list[SSEEvent], texts: list[str], settled: str, chars: int
    ) -> None:
        """Hold `events` whole: their texts are `settled` followed by the choice's held text."""
        st.whole, st.settled = index, settled
        st.waiting, st.waiting_texts, st.waiting_chars = events, texts, chars
        if chars > st.stats.held_max:
            st.stats.held_max = chars

    def _redacted(
        self,
        ctx: RequestContext,
        st: _Stream,
        index: int,
        events: list[SSEEvent],
        texts: list[str],
        released: str,
    ) -> list[SSEEvent]:
        """`events` after a redaction (or with earlier held text in front of `released`):
        the events after the last redaction still go out as they came or wait whole, those
        before it too where their text is found unchanged; the others carry the rest."""
        ends = list(accumulate(map(len, texts)))
        frontier = ends[-1] - st.choice(index).held  # where the held text starts in `texts`
        if frontier <= 0:  # all of their text is held: `released` is earlier text's
            return self._spread(ctx, index, events, texts, released)
        k = bisect_right(ends, frontier)  # the events whose text is all released
        start = ends[k - 1] if k else 0
        tail = texts[k][: frontier - start] if k < len(events) else ""  # released of event k
        if not released.endswith(tail):  # the last redaction reaches into event k
            return self._spread(ctx, index, events, texts, released)
        head = released[: len(released) - len(tail)]
        if k == 0:
            out = [text_event(ctx, events[0], index, head)] if head else []
        else:
            out = self._spread_both(ctx, index, events[:k], texts[:k], head)
        if k == len(events):
            return out
        if self._may_wait(st, ends[-1] - start, tail, ""):
            self._wait(st, index, events[k:], texts[k:], tail, ends[-1] - start)
            return out
        out.append(with_texts(ctx, events[k], {index: tail}))
        return out + [with_texts(ctx, event, {index: ""}) for event in events[k + 1 :]]

    def _spread_both(
        self, ctx: RequestContext, index: int, events: list[SSEEvent], texts: list[str], text: str
    ) -> list[SSEEvent]:
        """`events` (at least one), all of whose text is released as `text`: those whose own
        text starts or ends it go as they came, the ones between carry the rest."""
        i = pos = 0
        while i < len(events) and text.startswith(texts[i], pos):
            pos += len(texts[i])
            i += 1
        j, end = len(events), len(text)
        while j > i and end - len(texts[j - 1]) >= pos and text.endswith(texts[j - 1], pos, end):
            end -= len(texts[j - 1])
            j -= 1
        if i == j:  # every event matched: text left between them goes with a neighbour
            if pos == end:
                return list(events)
            if j < len(events):
                fused = with_texts(ctx, events[j], {index: text[pos:end] + texts[j]})
                return [*events[:j], fused, *events[j + 1 :]]
            fused = with_texts(ctx, events[i - 1], {index: texts[i - 1] + text[pos:end]})
            return [*events[: i - 1], fused]
        middle = [with_texts(ctx, events[i], {index: text[pos:end]})]
        middle += [with_texts(ctx, event, {index: ""}) for event in events[i + 1 : j]]
        return [*events[:i], *middle, *events[j:]]

    def _spread(
        self, ctx: RequestContext, index: int, events: list[SSEEvent], texts: list[str], text: str
    ) -> list[SSEEvent]:
        """`events`, now, carrying `text`: each as it came while its own text is next in
        `text`, then one with the rest, then empty ones."""
        out: list[SSEEvent] = []
        pos, last = 0, len(events) - 1
        for i, event in enumerate(events):
            own = texts[i]
            if text.startswith(own, pos) and (i < last or pos + len(own) == len(text)):
                out.append(event)
                pos += len(own)
                continue
            out.append(with_texts(ctx, event, {index: text[pos:]}))
            out += [with_texts(ctx, rest, {index: ""}) for rest in events[i + 1 :]]
            break
        return out

    def _send_waiting(self, ctx: RequestContext, st: _Stream) -> list[SSEEvent]:
        """The waiting events, now, with the released text (the held text stays held)."""
        events, texts, settled = st.waiting, st.waiting_texts, st.settled
        st.clear_waiting()
        return self._spread(ctx, st.whole, events, texts, settled)

    def _decide_waiting(
        self, ctx: RequestContext, st: _Stream, template: SSEEvent, edit: _Edit | None = None
    ) -> list[SSEEvent]:
        """The waiting events' choice ends: decide all of its text, then send them (or stop)."""
        index = st.whole
        out, rule, _ = self._feed(st, st.choice(index), "", True)
        text = st.settled + out
        events, texts = st.waiting, st.waiting_texts
        st.clear_waiting()
        if rule >= 0:
            return [
                *_without_choice(ctx, events, index),
                *self._stopped(ctx, st, index, text, rule, template, edit),
            ]
        return self._spread_both(ctx, index, events, texts, text)

    def _stop_run(
        self,
        ctx: RequestContext,
        st: _Stream,
        index: int,
        events: list[SSEEvent],
        released: str,
        rule: int,
    ) -> list[SSEEvent]:
        """A match stops the choice: the waiting events and `events` give way to the text
        before the match and the filter's finish; the stream ends once every choice did."""
        safe = st.settled + released if st.waiting else released
        dropped = [*st.waiting, *events]
        st.clear_waiting()
        out = [
            *_without_choice(ctx, dropped, index),
            *self._stopped(ctx, st, index, safe, rule, events[-1]),
        ]
        if st.all_done():
            raise EndStream(out)
        return out

    def _on_chunk(
        self,
        ctx: RequestContext,
        st: _Stream,
        event: SSEEvent,
        texts: dict[int, str],
        finishes: dict[int, str],
    ) -> list[SSEEvent] | None:
        """Any other event: finishes, several choices, stopped choices."""
        if st.template is None:
            st.template = event
        edit = _Edit(set(st.stopped))
        if st.waiting:
            if st.whole in finishes and st.whole not in texts:
                st.choice(st.whole).done = True
                edit.before += self._decide_waiting(ctx, st, event, edit)
            else:
                edit.before += self._send_waiting(ctx, st)
        for index, text in texts.items():
            self._on_text(ctx, st, event, index, text, index in finishes, edit)
        for index in finishes:
            if index not in texts:
                self._on_finish(ctx, st, event, index, edit)
        return self._apply(ctx, st, event, edit)

    def _on_text(
        self,
        ctx: RequestContext,
        st: _Stream,
        event: SSEEvent,
        index: int,
        text: str,
        final: bool,
        edit: _Edit,
    ) -> None:
        ch = st.choice(index)
        if ch.done:
            return  # a stopped choice's text goes with its entry (in edit.drop)
        out, rule, _ = self._feed(st, ch, text, final)
        if rule >= 0:
            edit.after += self._stopped(ctx, st, index, out, rule, event, edit)
            return
        if out != text:
            edit.texts[index] = out
        if final:
            ch.done = True

    def _on_finish(
        self, ctx: RequestContext, st: _Stream, event: SSEEvent, index: int, edit: _Edit
    ) -> None:
        """A finish chunk without text: release the choice's held text before it."""
        ch = st.choice(index)
        if ch.done:
            return
        ch.done = True
        if len(ch.buf) <= ch.start:
            return
        out, rule, _ = self._feed(st, ch, "", True)
        if rule >= 0:
            # its own finish chunk goes: the filter's finish replaces it
            edit.before += self._stopped(ctx, st, index, out, rule, event, edit)
        elif out:
            edit.before.append(text_event(ctx, event, index, out))

    def _apply(
        self, ctx: RequestContext, st: _Stream, event: SSEEvent, edit: _Edit
    ) -> list[SSEEvent] | None:
        """The events that replace `event`; raises EndStream once every choice has ended."""
        if not (edit.texts or edit.drop or edit.before or edit.after):
            return None
        main: SSEEvent | None = with_texts(ctx, event, edit.texts) if edit.texts else event
        if edit.drop and main is not None:
            main = without_choices(ctx, main, edit.drop)
        result = [*edit.before, *([main] if main is not None else []), *edit.after]
        if edit.stopped and st.all_done():
            raise EndStream(result)
        return result

    def on_flush(self, ctx: RequestContext) -> list[SSEEvent] | None:
        st = ctx.get(_STREAM)
        if st is None or st.template is None:
            return None
        out = self._decide_waiting(ctx, st, st.template) if st.waiting else []
        for index, ch in sorted(st.choices.items()):
            if ch.done or len(ch.buf) <= ch.start:
                continue
            text, rule, _ = self._feed(st, ch, "", True)
            if rule >= 0:
                out += self._stopped(ctx, st, index, text, rule, st.template)
            elif text:
                out.append(text_event(ctx, st.template, index, text))
        return out or None
