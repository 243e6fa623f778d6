"""User regexes: widths, lookbehind and unsupported constructs, derived from the parse tree.

The tree comes from CPython's own regex parser (``re._parser``, the parser ``re.compile``
uses; ``sre_parse`` is its deprecated alias). It is private, so every use is checked: if it
is missing, lacks a name the analysis relies on, or fails on a pattern ``re`` compiles, the
rule is refused (:class:`RegexAnalysisError`, a config error) instead of being accepted
without its anchor and backreference checks: a security filter's validation fails closed.
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass
from typing import Any

# ----- user regexes -------------------------------------------------------------------------------

_GLOBAL_FLAGS = re.compile(r"\A\(\?([aiLmsux]+)\)")
_ANCHORS = frozenset({"AT_BEGINNING", "AT_BEGINNING_STRING", "AT_END", "AT_END_STRING"})
_BACKREFS = ("GROUPREF",)
_PARSER_NAMES = ("parse", "SubPattern", "MAXREPEAT", "AT", "ASSERT", "ASSERT_NOT", *_ANCHORS)
_PARSER_MODULE = "re._parser"


class RegexAnalysisError(ValueError):
    """A regex rule could not be analysed: the rule is refused (fail closed)."""


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


def _parser() -> Any:
    """CPython's regex parser, checked to have what the analysis uses."""
    try:
        parser: Any = importlib.import_module(_PARSER_MODULE)
    except ImportError as err:
        raise RegexAnalysisError(_unavailable(f"{_PARSER_MODULE} cannot be imported")) from err
    missing = [name for name in _PARSER_NAMES if not hasattr(parser, name)]
    if missing:
        raise RegexAnalysisError(_unavailable(f"{_PARSER_MODULE} lacks {', '.join(missing)}"))
    return parser


def _unavailable(why: str) -> str:
    return (
        f"regex rules cannot be checked on this Python ({sys.version.split()[0]}: {why}); "
        "the rule is refused rather than accepted without its anchor and backreference "
        "checks (use words or a detector, or another Python)"
    )


def _analyse(source: str) -> _RegexInfo:
    """Widths, lookbehind and unsupported constructs of a regex that `re` compiles.

    Raises RegexAnalysisError if the analysis itself fails (see the module docstring)."""
    parser = _parser()
    try:
        tree = parser.parse(source)
        lo, hi = tree.getwidth()
        unbounded = int(hi) >= int(parser.MAXREPEAT)
        lookbehind, problem = _walk(parser, tree)
    except Exception as err:  # the private parser changed: refuse, never skip the checks
        raise RegexAnalysisError(_unavailable(f"{type(err).__name__}: {err}")) from err
    return _RegexInfo(int(lo), None if unbounded else int(hi), lookbehind, problem)


def _walk(parser: Any, tree: Any) -> tuple[int, str | None]:
    """(longest lookbehind, the first unsupported construct or None) of a parse tree."""
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
    return lookbehind, problem
