"""The built-in detectors (email, phone, credit_card, api_key) and literal-word rules, as
`_Spec`s: a pattern, the prefixes a match can start with, the longest match, a validator."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from plugins.content_filter.prefixes import alt, char, full, opt, prefix, rep, seq

DetectorName = Literal["email", "phone", "credit_card", "api_key"]


# ----- detectors ----------------------------------------------------------------------------------


def luhn_valid(candidate: str) -> bool:
    """True if the ASCII digits of `candidate` (13 to 19 of them) pass the Luhn checksum."""
    digits = [ord(c) - 48 for c in candidate if "0" <= c <= "9"]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def _prefixes(literal: str, rest: str = "") -> str:
    """A regex for every non-empty prefix of `literal` followed by an optional `rest`."""
    out = f"(?:{rest})?" if rest else ""
    for c in reversed(literal):
        out = re.escape(c) + (f"(?:{out})?" if out else "")
    return out


@dataclass(frozen=True, slots=True)
class _Spec:
    """One compiled-to-be rule: its match, its match prefixes and its longest match."""

    name: str
    pattern: str  # looks at most one character before and one after the match
    prefix: str | None  # every prefix of a match (over-approximated); None: unknown
    max_chars: int
    lookbehind: int = 1
    validate: Callable[[str], bool] | None = None
    needs: Callable[[str], bool] | None = None  # False: no match in this text; None: unknown


_LOCAL = r"[\w.%+-]"
_KEY_START = r"(?<![A-Za-z0-9])"
_DIGIT, _SEP = char("[0-9]"), char("[ .-]")
_PHONE_BEFORE = r"(?<![\w+.-])"
_PHONE = alt(
    seq(
        char(r"\+"),
        char("[1-9]"),
        rep(_DIGIT, 0, 2),
        opt(seq(opt(_SEP), char(r"\("), rep(_DIGIT, 1, 4), char(r"\)"))),
        rep(seq(opt(_SEP), _DIGIT), 6, 12),
    ),
    seq(
        opt(seq(opt(char(r"\+")), char("1"), opt(_SEP))),
        alt(
            seq(char(r"\("), rep(_DIGIT, 3, 3), char(r"\)"), opt(_SEP)),
            seq(rep(_DIGIT, 3, 3), _SEP),
        ),
        rep(_DIGIT, 3, 3),
        _SEP,
        rep(_DIGIT, 4, 4),
    ),
)
_CARD_SEP = opt(char("[ -]"))
_CARD = alt(
    seq(*[rep(_DIGIT, 4, 4), _CARD_SEP] * 3, rep(_DIGIT, 4, 4)),
    seq(rep(_DIGIT, 4, 4), _CARD_SEP, rep(_DIGIT, 6, 6), _CARD_SEP, rep(_DIGIT, 5, 5)),
    rep(_DIGIT, 13, 19),
)

_DETECTORS: Final[dict[str, tuple[str, str, int, Callable[[str], bool] | None]]] = {
    # local part (RFC 5321: at most 64) @ domain with a letter-only top-level label
    "email": (
        rf"(?<!{_LOCAL}){_LOCAL}{{1,64}}@[^\W_][\w.-]{{0,62}}\.[^\W\d_]{{2,24}}(?![\w-])",
        rf"(?<!{_LOCAL}){_LOCAL}{{1,64}}(?:@[\w.-]{{0,88}})?",
        64 + 1 + 1 + 62 + 1 + 24,
        None,
    ),
    # +CC [(area)] 6-12 more digits, or North American (555) 555-5555 / 555-555-5555 forms,
    # not inside longer runs of digits, dots and dashes (versions, IP addresses)
    "phone": (
        rf"{_PHONE_BEFORE}{full(_PHONE)}(?!\w|[.-][0-9])",  # looks two characters ahead
        # exactly the prefixes of a match, and a match with a still undecided [.-] after it
        # (the lookahead (?=...) only makes other text fail fast)
        rf"{_PHONE_BEFORE}(?=[+(0-9])(?:{prefix(_PHONE)}|{full(_PHONE)}[.-])",
        1 + 3 + 7 + 24 + 1,
        None,
    ),
    # 4-4-4-4 or 4-6-5 groups (space or dash) or 13-19 digits in a row; then Luhn
    "credit_card": (
        rf"(?<!\w){full(_CARD)}(?!\w)",
        rf"(?<!\w)(?=[0-9]){prefix(_CARD)}",  # exactly the prefixes of a match
        19,
        luhn_valid,
    ),
    # OpenAI/Anthropic sk-..., AWS key ids, GitHub, Slack, Google keys, PEM private keys
    "api_key": (
        rf"{_KEY_START}(?:sk-[A-Za-z0-9_-]{{20,200}}"
        r"|(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])"
        r"|gh[pousr]_[A-Za-z0-9]{36,80}|github_pat_[A-Za-z0-9_]{22,100}"
        r"|xox[abposr]-[A-Za-z0-9-]{10,120}|AIza[0-9A-Za-z_-]{35})"
        r"|-----BEGIN (?:[A-Z0-9]{1,12} ){0,2}PRIVATE KEY(?: BLOCK)?-----",
        rf"{_KEY_START}(?:"
        + "|".join(
            [
                _prefixes("sk-", "[A-Za-z0-9_-]{0,200}"),
                _prefixes("AKIA", "[0-9A-Z]{0,16}"),
                _prefixes("ASIA", "[0-9A-Z]{0,16}"),
                _prefixes("gh", "[pousr](?:_[A-Za-z0-9]{0,80})?"),
                _prefixes("github_pat_", "[A-Za-z0-9_]{0,100}"),
                _prefixes("xox", "[abposr](?:-[A-Za-z0-9-]{0,120})?"),
                _prefixes("AIza", "[0-9A-Za-z_-]{0,35}"),
            ]
        )
        + ")|"
        + _prefixes("-----BEGIN ", "[A-Z0-9 ]{0,44}-{0,5}"),
        3 + 200,
        None,
    ),
}

DETECTOR_MAX_CHARS: Final = {name: spec[2] for name, spec in _DETECTORS.items()}

_FOUR_DIGITS: Final = re.compile("[0-9][0-9][0-9][0-9]")  # ("{4}" would search slower)
_KEY_PREFIX: Final = re.compile(
    r"sk-|AKIA|ASIA|gh[pousr]_|github_pat_|xox[abposr]-|AIza|-----BEGIN "
)

_NEEDS: Final[dict[str, Callable[[str], bool]]] = {
    # Cheap checks of something every match of the detector contains: where it is absent,
    # the detector is left out of the search (most text has no "@", few runs of digits).
    "email": lambda text: "@" in text,
    # North American numbers end in 4 digits; international ones start with "+"
    "phone": lambda text: "+" in text or _FOUR_DIGITS.search(text) is not None,
    "credit_card": lambda text: _FOUR_DIGITS.search(text) is not None,  # groups of 4, or 13+
    "api_key": lambda text: _KEY_PREFIX.search(text) is not None,
}


def _words_spec(name: str, words: Sequence[str]) -> _Spec:
    """Whole-word, case-insensitive literals as a trie-shaped regex (longest word first)."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for c in word:
            low = c.lower()
            node = node.setdefault(low if len(low) == 1 else c, {})
        node[""] = {}  # end of a word

    def full(node: dict[str, Any]) -> str:
        alts = [re.escape(c) + full(child) for c, child in sorted(node.items()) if c]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else f"(?:{'|'.join(alts)})"
        return f"(?:{body})?" if "" in node else body

    def prefix(node: dict[str, Any]) -> str:
        alts = []
        for c, child in sorted(node.items()):
            if c:
                tail = prefix(child)
                alts.append(re.escape(c) + (f"(?:{tail})?" if tail else ""))
        return "|".join(alts)

    return _Spec(
        name,
        rf"(?<!\w)(?i:{full(trie)})(?!\w)",
        rf"(?<!\w)(?i:{prefix(trie)})",
        max(len(w) for w in words),
    )
