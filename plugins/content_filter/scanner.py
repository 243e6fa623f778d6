"""The scanner: every rule in one combined regex, deciding a text buffer left to right."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from plugins.content_filter.detectors import _Spec

# ----- the scanner --------------------------------------------------------------------------------


GATE_CHARS: Final = 32
"""Scans of at least this much new text first check which rules can match at all."""


class Scanner:
    """All rules compiled into one regex, plus one for "a match may start here" at the end.

    ``scan`` decides a text buffer left to right: positions with ``window`` characters after
    them, or where no match can start (a position whose rest of the buffer is no prefix of
    any rule's match), are settled; the first unsettled position is the *frontier*, and
    everything from it on is held until more text (or the end) arrives.
    """

    def __init__(self, specs: Sequence[_Spec], redaction: str) -> None:
        # Rules with a validator go last: when their check fails, no other rule matched there.
        ordered = [s for s in specs if s.validate is None] + [s for s in specs if s.validate]
        self.names = [s.name for s in ordered]
        self._parts = [f"(?P<_cf{i}>{s.pattern})" for i, s in enumerate(ordered)]
        self.pattern = re.compile("|".join(self._parts))
        self._index = {f"_cf{i}": i for i in range(len(ordered))}
        self._needs = [(i, s.needs) for i, s in enumerate(ordered) if s.needs is not None]
        self._always = sum(1 << i for i, s in enumerate(ordered) if not s.needs)
        self._subsets: dict[int, re.Pattern[str] | None] = {(1 << len(ordered)) - 1: self.pattern}
        self._validate = [s.validate for s in ordered]
        prefixes = [s.prefix for s in ordered if s.prefix is not None]
        self.viable = re.compile(f"(?:{'|'.join(prefixes)})\\Z") if prefixes else None
        self.generic = max((s.max_chars for s in ordered if s.prefix is None), default=0)
        self.window = max(s.max_chars for s in ordered)
        self.context = max(s.lookbehind for s in ordered)
        self.replacements = [redaction.format(rule=s.name) for s in ordered]

    def _pattern_for(self, buf: str, start: int) -> re.Pattern[str] | None:
        """The combined pattern of the rules that can match in `buf[start - context:]`: a
        rule whose `needs` is absent there is left out (None: no rule can match)."""
        if not self._needs or len(buf) - start < GATE_CHARS:
            return self.pattern  # too little text for the checks to pay off
        text = buf[start - self.context :] if start > self.context else buf
        mask = self._always
        for i, needs in self._needs:
            if needs(text):
                mask |= 1 << i
        try:
            return self._subsets[mask]
        except KeyError:
            parts = [p for i, p in enumerate(self._parts) if mask >> i & 1]
            pattern = self._subsets[mask] = re.compile("|".join(parts)) if parts else None
            return pattern

    def _frontier(self, buf: str, lo: int) -> int:
        """The first position from `lo` on where a match may still start (len(buf): none)."""
        n = len(buf)
        frontier = n
        if self.viable is not None and (m := self.viable.search(buf, lo)) is not None:
            frontier = m.start()
        if self.generic and n - self.generic < frontier:
            frontier = max(lo, n - self.generic)
        return frontier

    def scan(
        self, buf: str, start: int, final: bool, stop: bool
    ) -> tuple[str, int, int, list[int] | None]:
        """Decide `buf[start:]` (`buf[:start]` is context already released).

        Returns the text to release (redacted, or in `stop` mode the text before the first
        match), the frontier (where held text begins), the rule index that stopped (-1 if
        none) and the indexes of the rules redacted (None if none). `final`: no more text
        follows, decide everything.
        """
        n = len(buf)
        limit = n if final else n - self.window  # positions before it are settled
        pattern = self._pattern_for(buf, start)
        if pattern is None:
            frontier = n if final else self._frontier(buf, max(start, limit))
            return buf[start:frontier], frontier, -1, None
        search = pattern.search
        parts: list[str] = []
        hits: list[int] | None = None
        emitted = cursor = start
        frontier = -1
        while (m := search(buf, cursor)) is not None:
            s, e = m.span()
            if s >= limit:
                f = self._frontier(buf, cursor if cursor > limit else limit)
                if f <= s:  # a match may yet start at or before s: hold from there
                    frontier = f
                    break
            rule = self._index[m.lastgroup or ""]
            check = self._validate[rule]
            if e == s or (check is not None and not check(m.group())):
                cursor = s + 1
                continue
            if stop:
                return buf[emitted:s], s, rule, hits
            if emitted < s:
                parts.append(buf[emitted:s])
            parts.append(self.replacements[rule])
            if hits is None:
                hits = []
            hits.append(rule)
            emitted = cursor = e
        if frontier < 0:
            frontier = n if final else self._frontier(buf, cursor if cursor > limit else limit)
        if not parts:
            return buf[emitted:frontier], frontier, -1, hits
        parts.append(buf[emitted:frontier])
        return "".join(parts), frontier, -1, hits

    def redact(self, text: str) -> tuple[str, list[int] | None]:
        """`text` with every match replaced; the rule indexes replaced."""
        out, _, _, hits = self.scan(text, 0, True, False)
        return out, hits

    def first(self, text: str) -> tuple[str, int]:
        """The text before the first match and that match's rule index (-1: no match)."""
        out, _, rule, _ = self.scan(text, 0, True, True)
        return out, rule
