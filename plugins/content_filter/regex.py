"""User regexes: widths, lookbehind and unsupported constructs, derived from the parse tree."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

# ----- user regexes -------------------------------------------------------------------------------

_GLOBAL_FLAGS = re.compile(r"\A\(\?([aiLmsux]+)\)")
_ANCHORS = frozenset({"AT_BEGINNING", "AT_BEGINNING_STRING", "AT_END", "AT_END_STRING"})
_BACKREFS = ("GROUPREF",)


def _scoped(source: str) -> str:
    """Turn leading global flags, `(?i)...`, into a scoped group that can be combined."""
    m = _GLOBAL_FLAGS.match(source)
    if m is None:
        return source
    flags, rest = m.group(1), source[m.end() :]
    end = "\n)" if "x" in flags else ")"  # the newline ends a verbose-mode comment
    return f"(?{flags}:{rest}{end}"


@dataclass(frozen=True, slots=True)
class _RegexInfo:
    min_chars: int
    max_chars: int | None  # None: unbounded
    lookbehind: int
    problem: str | None


def _analyse(source: str) -> _RegexInfo | None:
    """Widths, lookbehind and unsupported constructs of a regex (None if it can't be parsed)."""
    try:
        parser: Any = importlib.import_module("re._parser")
        tree = parser.parse(source)
        lo, hi = tree.getwidth()
        unbounded = int(hi) >= int(parser.MAXREPEAT)
    except Exception:  # a private module: without it, nothing is derived
        return None
    lookbehind = 0
    problem: str | None = None

    def walk(node: Any) -> None:
        nonlocal lookbehind, problem
        if isinstance(node, parser.SubPattern):
            for op, av in node.data:
                name = str(op)
                if name.startswith(_BACKREFS):
                    problem = "backreferences and conditional groups are not supported"
                elif name == "AT" and str(av) in _ANCHORS:
                    problem = (
                        "anchors (^, $, \\A, \\Z) are not supported: the filter matches "
                        "inside a sliding window of streamed text"
                    )
                elif name in ("ASSERT", "ASSERT_NOT") and av[0] < 0:
                    lookbehind = max(lookbehind, int(av[1].getwidth()[1]))
                walk(av)
        elif isinstance(node, list | tuple):
            for item in node:
                walk(item)

    walk(tree)
    return _RegexInfo(int(lo), None if unbounded else int(hi), lookbehind, problem)
