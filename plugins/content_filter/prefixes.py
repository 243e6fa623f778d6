"""Regexes for "every prefix of a match", built from a small description of the pattern.

A streamed text may be released up to the first position where a rule's match could still
start; the scanner finds that position with each rule's *prefix* regex anchored at the end
of the text. The tighter that regex, the less is held: ``prefix(pattern)`` matches exactly
the non-empty prefixes of the strings ``full(pattern)`` matches (complete matches included,
as they may still grow or be invalidated by their lookahead).

Patterns are built from single-character atoms (``char``), sequences (``seq``),
alternatives (``alt``) and bounded repeats (``rep``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Char:
    """One character of a class, e.g. ``[0-9]``."""

    regex: str


@dataclass(frozen=True, slots=True)
class Seq:
    """The parts one after another."""

    parts: tuple[Part, ...]


@dataclass(frozen=True, slots=True)
class Alt:
    """One of the choices."""

    choices: tuple[Part, ...]


@dataclass(frozen=True, slots=True)
class Rep:
    """`part` repeated `lo` to `hi` times (`hi` >= 1)."""

    part: Part
    lo: int
    hi: int


Part = Char | Seq | Alt | Rep


def char(regex: str) -> Char:
    """A single-character atom."""
    return Char(regex)


def seq(*parts: Part) -> Seq:
    """`parts` in order."""
    return Seq(parts)


def alt(*choices: Part) -> Alt:
    """Any one of `choices`."""
    return Alt(choices)


def rep(part: Part, lo: int, hi: int) -> Rep:
    """`part` `lo` to `hi` times."""
    assert 0 <= lo <= hi
    assert hi >= 1
    return Rep(part, lo, hi)


def opt(part: Part) -> Rep:
    """`part` or nothing."""
    return Rep(part, 0, 1)


def _group(regex: str) -> str:
    return f"(?:{regex})"


def full(part: Part) -> str:
    """The regex of `part` itself."""
    if isinstance(part, Char):
        return part.regex
    if isinstance(part, Seq):
        return "".join(full(p) for p in part.parts)
    if isinstance(part, Alt):
        return _group("|".join(full(c) for c in part.choices))
    count = "?" if (part.lo, part.hi) == (0, 1) else f"{{{part.lo},{part.hi}}}"
    inner = full(part.part)
    return (inner if isinstance(part.part, Char) else _group(inner)) + count


def prefix(part: Part) -> str:
    """A regex matching exactly the non-empty prefixes of what `part` matches."""
    if isinstance(part, Char):
        return part.regex
    if isinstance(part, Seq):
        choices = []
        for i, p in enumerate(part.parts):
            done = "".join(full(q) for q in part.parts[:i])
            choices.append(done + _group(prefix(p)))
        return _group("|".join(choices))
    if isinstance(part, Alt):
        return _group("|".join(prefix(c) for c in part.choices))
    # Fewer than `hi` whole repeats, then a (non-empty) prefix of one more.
    before = full(Rep(part.part, 0, part.hi - 1)) if part.hi > 1 else ""
    return before + _group(prefix(part.part))
