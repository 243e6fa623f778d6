"""Content filter: find secrets, PII and banned words in prompts and streamed completions.

Rules are built-in detectors (``email``, ``phone``, ``credit_card`` with a Luhn check,
``api_key``), literal ``words`` (case-insensitive, whole-word) or a ``regex``. All rules are
compiled into one combined regular expression; at one position the first rule in config
order wins (Luhn-checked rules are tried last, so a failed check never hides another rule).

```yaml
plugins:
  - name: content_filter
    fail: closed                   # recommended: a filter that fails open forwards text as is
    options:
      rules:                       # default: the four built-in detectors
        - name: no-secrets         # named in errors and in the per-rule counts
          detector: api_key        # email | phone | credit_card | api_key
        - name: banned-words
          words: [foo, "bar baz"]  # literal, case-insensitive, whole-word
        - name: ssn
          regex: '\\b\\d{3}-\\d{2}-\\d{4}\\b'
          max_match_chars: 11      # needed only if the longest match cannot be derived
          ignore_case: false
      prompt_action: reject        # reject (400, code content_filter) | redact | off
      completion_action: redact    # redact | stop (finish_reason "content_filter") | off
      redaction: "[REDACTED:{rule}]"
      max_hold_chars: 256          # cap on the hold-back window (config error if a rule needs more)
      hold_whole_events: true      # false: release text at once in rewritten events (see Streams)
```

**Prompts** (``on_request``): ``reject`` answers 400 naming the first rule that matched;
``redact`` rewrites message string contents, text parts and the completions prompt in the
body that goes upstream. **Non-streaming responses**: the message content (or ``text``) is
redacted, or cut before the first match with ``finish_reason: "content_filter"``.

**Streams** (``on_events``, one call per upstream read; ``on_event`` for one event): per
choice index the filter holds back only text that may still be the start of a match: a
position is released once (a) at least ``window`` characters follow it (every rule's longest
match is at most ``window`` characters, so the outcome there can no longer change), or (b) no
rule can start a match there whatever comes next, which is checked with a second combined
expression of every rule's *match prefixes* anchored at the end of the text. Regex rules have
no derivable prefix set, so with a regex rule the last ``max_match_chars`` characters are
always held. The text of the events of one read is scanned in one go. Held text never
exceeds ``window`` characters, is released before a choice's ``finish_reason`` chunk, and at
the end of the stream (``on_flush``); the output is exactly the redaction of the whole text.
``stop`` releases the text before the first match, then a chunk with ``finish_reason:
"content_filter"``; when every choice has ended the stream ends (``EndStream``: ``[DONE]``
follows and the upstream connection is closed).

What goes out, in a one-choice stream: an event whose whole text is released goes out as it
came (its original bytes). An event whose text is only partly released *waits whole* when
the released part has no letter or digit (a space, punctuation: the usual ``" word"``
token), and goes out unchanged once the rest is decided, typically when the next token
arrives; at most ``window`` characters wait. Released text with a letter or digit goes out
at once: the event is rewritten to carry it (its text replaced in its bytes, nothing else
re-encoded) and the held rest follows in later events. A redaction rewrites the events that
carried the match. With several choices (``n`` > 1) released text always goes out at once.
``hold_whole_events: false`` makes released text always go out at once (one rewritten event
per upstream event, so the events keep the upstream's timing while the held text is one
token late, as before events could wait); only events with no released text at all wait.

**Window and latency** (characters held per choice at most = longest possible match):
``email`` 153, ``phone`` 36, ``credit_card`` 19, ``api_key`` 203, ``words`` the longest word,
``regex`` its ``max_match_chars``; the default rule set's window is 203 characters. With the
default rules the held text is in practice the trailing run of word characters (any word may
be the local part of an e-mail address, any digits a phone or card number), so a token is
typically delayed until the next token arrives: about one token of added latency (one
upstream inter-token gap), at most the window (~50 tokens) while a real candidate
(``sk-...``) is pending. Rule sets without ``email``/``phone``/``credit_card`` hold nothing
for most words and pass events unchanged at once.

**Cost** (CPython 3.11, ``python -m benchmarks.plugin_cost``: CPU per event of one-word chat
deltas such as ``" world"`` through the chain, the filter alone, default rules): about 4.9 µs
per event at one event per read and 1 µs in reads of 400 events (what a loaded gateway
sees), no event rewritten: reading the delta from the event's bytes (0.3-0.7 µs, shared with
the plugins after it), the bookkeeping, and one scan per read. A scan of 32 characters or more
first leaves out the detectors whose necessary text is absent (``email`` needs an ``@``,
``phone`` a ``+`` or four digits in a row, ``credit_card`` four digits, ``api_key`` one of
its prefixes): each detector costs ~20 ns per character searched, so ordinary prose is
searched by none. Before events waited whole, every event was rewritten (JSON copy and
re-encode) at about 6 µs per event (10-16 µs on the slower machine of the first measurements).

Per-request state lives in the request context; the counts of what was done per rule and
action are public under ``FILTER`` (a :class:`FilterStats`) for metrics.

**Limits.** Only text content is filtered: tool-call arguments, logprobs and refusals are
not. A regex's ``max_match_chars`` is trusted and must include any lookahead past the first
character after the match; anchors, backreferences and rules that can match empty text are
config errors (the filter matches inside a sliding window). Matches are bounded: e-mail local
parts up to 64 characters, ``sk-`` keys up to 203 characters (a longer key is redacted up to
there), and for private keys only the ``-----BEGIN ... PRIVATE KEY-----`` header is detected
(use ``stop`` to cut the key off). Run the plugin with ``fail: closed``: a filter that fails
open lets the event through unfiltered.
"""

from __future__ import annotations

import importlib
import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Final, Literal, get_args

from prometheus_client import Counter as PromCounter
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.context import Endpoint, RequestContext, StateKey
from gateway.deltas import (
    event_texts,
    finish_reasons,
    prompt_texts,
    stop_events,
    text_delta,
    text_event,
    with_texts,
    without_choices,
)
from gateway.plugin import EndStream, Instrument, Plugin, PluginMetrics, Reject
from gateway.protocols import ANTHROPIC, RESPONSES
from gateway.sse import SSEEvent

__all__ = [
    "FILTER",
    "ContentFilter",
    "ContentFilterOptions",
    "FilterAction",
    "FilterStats",
    "Rule",
    "Scanner",
    "luhn_valid",
]

FilterAction = Literal["prompt_reject", "prompt_redact", "completion_redact", "completion_stop"]
DetectorName = Literal["email", "phone", "credit_card", "api_key"]
CONTENT_FILTER: Final = "content_filter"


# ----- per-request records ----------------------------------------------------------------------


@dataclass(slots=True)
class FilterStats:
    """What the content filter did in one request (set in `on_request`, final after the end)."""

    counts: Counter[tuple[str, FilterAction]] = field(default_factory=Counter)
    held_max: int = 0  # most characters held back for one choice at any moment

    def record(self, rule: str, action: FilterAction, count: int = 1) -> None:
        """Count `count` matches of `rule` handled with `action`."""
        self.counts[(rule, action)] += count

    def count(self, rule: str | None = None, action: FilterAction | None = None) -> int:
        """Matches acted on, optionally only for one rule and/or one action."""
        return sum(
            n
            for (r, a), n in self.counts.items()
            if (rule is None or r == rule) and (action is None or a == action)
        )


FILTER: StateKey[FilterStats] = StateKey("content_filter.stats")
_COUNTED: StateKey[FilterStats] = StateKey("content_filter.counted")  # into the metric already


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
    for char in reversed(literal):
        out = re.escape(char) + (f"(?:{out})?" if out else "")
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
        r"(?<![\w+.-])(?:\+[1-9][0-9]{0,2}(?:[ .-]?\([0-9]{1,4}\))?(?:[ .-]?[0-9]){6,12}"
        r"|(?:\+?1[ .-]?)?(?:\([0-9]{3}\)[ .-]?|[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4})"
        r"(?!\w|[.-][0-9])",  # looks two characters ahead: counted in the longest match
        r"(?<![\w+.-])[+(0-9][0-9 ().-]{0,35}",
        1 + 3 + 7 + 24 + 1,
        None,
    ),
    # 4-4-4-4 or 4-6-5 groups (space or dash) or 13-19 digits in a row; then Luhn
    "credit_card": (
        r"(?<!\w)(?:[0-9]{4}[ -]?[0-9]{4}[ -]?[0-9]{4}[ -]?[0-9]{4}"
        r"|[0-9]{4}[ -]?[0-9]{6}[ -]?[0-9]{5}|[0-9]{13,19})(?!\w)",
        r"(?<!\w)[0-9][0-9 -]{0,18}",
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
        for char in word:
            low = char.lower()
            node = node.setdefault(low if len(low) == 1 else char, {})
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


# ----- options ------------------------------------------------------------------------------------


class Rule(BaseModel):
    """One rule: exactly one of `detector`, `words` or `regex`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, min_length=1, description="defaults to the detector's name")
    detector: DetectorName | None = None
    words: list[str] | None = Field(None, min_length=1)
    regex: str | None = Field(None, min_length=1)
    max_match_chars: int | None = Field(None, ge=1, description="longest match of `regex`")
    ignore_case: bool = Field(False, description="`regex` only")
    _spec: _Spec = PrivateAttr()

    @field_validator("words")
    @classmethod
    def _words_not_blank(cls, words: list[str] | None) -> list[str] | None:
        if words is not None and any(not w.strip() for w in words):
            raise ValueError("words must not be empty or blank")
        return words

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, source: str | None) -> str | None:
        if source is not None:
            try:
                re.compile(source)
            except re.error as err:
                raise ValueError(f"invalid regex: {err}") from None
        return source

    @model_validator(mode="after")
    def _build(self) -> Rule:
        kinds = [k for k in ("detector", "words", "regex") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a rule needs exactly one of detector, words or regex")
        if self.regex is None and (self.max_match_chars is not None or self.ignore_case):
            raise ValueError("max_match_chars and ignore_case apply to regex rules only")
        if self.detector is not None:
            pattern, prefix, longest, validate = _DETECTORS[self.detector]
            name = self.name or self.detector
            spec = _Spec(name, pattern, prefix, longest, 1, validate, _NEEDS[self.detector])
        elif self.name is None:
            raise ValueError("a words or regex rule needs a name")
        elif self.words is not None:
            spec = _words_spec(self.name, self.words)
        else:
            spec = self._regex_spec(self.name)
        self._spec = spec
        return self

    def _regex_spec(self, name: str) -> _Spec:
        assert self.regex is not None
        source = _scoped(self.regex)
        info = _analyse(source)
        if info is not None and info.problem:
            raise ValueError(info.problem)
        if (info is not None and info.min_chars == 0) or re.match(source, "") is not None:
            raise ValueError("the regex can match empty text")
        derived = info.max_chars if info is not None else None
        longest = self.max_match_chars or derived
        if longest is None:
            raise ValueError(
                "max_match_chars is required: the longest match of this regex cannot be "
                "derived (it has an unbounded repeat such as + or *)"
            )
        wrapped = f"(?i:{source})" if self.ignore_case else f"(?:{source})"
        lookbehind = max(1, info.lookbehind if info is not None else longest)
        return _Spec(name, wrapped, None, longest, lookbehind)

    @property
    def spec(self) -> _Spec:
        """The rule ready to be combined."""
        return self._spec


def _default_rules() -> list[Rule]:
    return [Rule(detector=d) for d in ("email", "phone", "credit_card", "api_key")]


class ContentFilterOptions(BaseModel):
    """Options of the `content_filter` plugin (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[Rule] = Field(default_factory=_default_rules, min_length=1)
    prompt_action: Literal["reject", "redact", "off"] = "reject"
    completion_action: Literal["redact", "stop", "off"] = "redact"
    redaction: str = Field("[REDACTED:{rule}]", description="`{rule}` is the rule's name")
    max_hold_chars: int = Field(256, ge=1, le=65536, validate_default=True)
    hold_whole_events: bool = Field(
        True,
        description="an event whose released text has no letter or digit waits whole and "
        "goes out unchanged; false: released text always goes out at once, rewritten",
    )
    _scanner: Scanner = PrivateAttr()

    @field_validator("rules")
    @classmethod
    def _rules_combine(cls, rules: list[Rule]) -> list[Rule]:
        names = [r.spec.name for r in rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique (repeated: {', '.join(dupes)})")
        try:
            Scanner([r.spec for r in rules], "")
        except re.error as err:
            raise ValueError(f"the rules' regexes cannot be combined: {err}") from None
        return rules

    @field_validator("redaction")
    @classmethod
    def _redaction_formats(cls, template: str) -> str:
        try:
            template.format(rule="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"only {{rule}} may be used in the template ({err!r})") from None
        return template

    @field_validator("max_hold_chars")
    @classmethod
    def _window_fits(cls, cap: int, info: ValidationInfo) -> int:
        for rule in info.data.get("rules") or ():
            if rule.spec.max_chars > cap:
                raise ValueError(
                    f"rule {rule.spec.name!r} needs a {rule.spec.max_chars}-character window, "
                    f"over max_hold_chars={cap}; raise it or lower the rule's longest match"
                )
        return cap

    @model_validator(mode="after")
    def _build(self) -> ContentFilterOptions:
        self._scanner = Scanner([r.spec for r in self.rules], self.redaction)
        return self

    @property
    def scanner(self) -> Scanner:
        """The compiled rules."""
        return self._scanner


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


# ----- the plugin ---------------------------------------------------------------------------------


class ContentFilter(Plugin[ContentFilterOptions]):
    """Redacts, rejects or stops on rule matches in prompts and completions."""

    name = "content_filter"
    _actions: Instrument[PromCounter] | None = None  # set by declare_metrics

    def __init__(self, options: ContentFilterOptions) -> None:
        super().__init__(options)
        self.opts = options
        self.scanner = options.scanner
        self._stop = options.completion_action == "stop"
        self._whole = options.hold_whole_events
        self._completions = options.completion_action != "off"

    @property
    def window(self) -> int:
        """The most characters held back per choice."""
        return self.scanner.window

    def declare_metrics(self, metrics: PluginMetrics) -> None:
        self._actions = metrics.counter(
            "sluice_content_filter_actions",
            "Content filter matches acted on, by rule and action.",
            ["rule", "action"],
            values={"rule": self.scanner.names, "action": get_args(FilterAction)},
        )

    async def on_end(self, ctx: RequestContext) -> None:
        """Count what was done per rule and action (once, if the filter runs twice)."""
        stats = ctx.get(FILTER)
        if stats is None or self._actions is None or ctx.get(_COUNTED) is stats:
            return
        ctx.set(_COUNTED, stats)
        for (rule, action), count in stats.counts.items():
            if count:
                self._actions.labels(rule=rule, action=action).inc(count)

    # -- prompts -----------------------------------------------------------------------------

    async def on_request(self, ctx: RequestContext) -> None:
        if ctx.wire == RESPONSES:
            raise Reject(
                501,
                "The content_filter plugin does not run on the native Responses lane (its "
                "events repeat the whole text where a filter cannot follow); set "
                "`responses_api: translate` on this route's upstreams to filter /v1/responses.",
                code="plugin_unsupported_lane",
                type="server_error",
            )
        stats = FilterStats()
        ctx.set(FILTER, stats)
        if ctx.endpoint is Endpoint.EMBEDDINGS:
            return
        action = self.opts.prompt_action
        if action == "reject":
            for text in prompt_texts(ctx.endpoint, ctx.body, ctx.wire):
                _, rule = self.scanner.first(text)
                if rule >= 0:
                    name = self.scanner.names[rule]
                    stats.record(name, "prompt_reject")
                    raise Reject(
                        400,
                        f"The request was blocked by the content filter (rule {name!r}).",
                        code=CONTENT_FILTER,
                    )
        elif action == "redact":
            ctx.body = self._redact_body(ctx.endpoint, ctx.body, stats)
            if ctx.wire == ANTHROPIC:
                ctx.body = self._redact_system(ctx.body, stats)
        if ctx.stream and self._completions:
            n = ctx.body.get("n")
            ctx.set(_STREAM, _Stream(stats, n if isinstance(n, int) and n > 0 else 1))

    def _redact_text(self, text: str, stats: FilterStats, action: FilterAction) -> str:
        out, hits = self.scanner.redact(text)
        for rule in hits or ():
            stats.record(self.scanner.names[rule], action)
        return out

    def _redact_body(
        self, endpoint: Endpoint, body: dict[str, Any], stats: FilterStats
    ) -> dict[str, Any]:
        """A copy of `body` with matches in its prompt text redacted (the same object if none)."""

        def redact(text: str) -> str:
            return self._redact_text(text, stats, "prompt_redact")

        if endpoint is Endpoint.CHAT:
            messages = body.get("messages")
            if not isinstance(messages, list):
                return body
            new = [_redact_message(m, redact) for m in messages]
            if all(a is b for a, b in zip(new, messages, strict=True)):
                return body
            return {**body, "messages": new}
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            redacted: Any = redact(prompt)
        elif isinstance(prompt, list):
            redacted = [redact(p) if isinstance(p, str) else p for p in prompt]
        else:
            return body
        return body if redacted == prompt else {**body, "prompt": redacted}

    def _redact_system(self, body: dict[str, Any], stats: FilterStats) -> dict[str, Any]:
        """A Messages body with its system prompt (a string or text blocks) redacted."""

        def redact(text: str) -> str:
            return self._redact_text(text, stats, "prompt_redact")

        system = body.get("system")
        if isinstance(system, str):
            new: Any = redact(system)
        elif isinstance(system, list):
            new = [_redact_part(block, redact) for block in system]
        else:
            return body
        return body if new == system else {**body, "system": new}

    # -- streams -----------------------------------------------------------------------------

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

    # -- non-streaming responses -------------------------------------------------------------

    async def on_response(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any] | None:
        if not self._completions:
            return None
        if ctx.wire == ANTHROPIC:
            return self._filter_message(body, ctx.get(FILTER) or FilterStats())
        choices = body.get("choices")
        if not isinstance(choices, list):
            return None
        stats = ctx.get(FILTER) or FilterStats()
        changed = False
        new_choices: list[Any] = []
        for choice in choices:
            replaced = self._filter_choice(ctx.endpoint, choice, stats)
            changed = changed or replaced is not choice
            new_choices.append(replaced)
        return {**body, "choices": new_choices} if changed else None

    def _filter_message(self, body: dict[str, Any], stats: FilterStats) -> dict[str, Any] | None:
        """A non-streaming Anthropic Message: text blocks redacted, or the answer cut before
        the first match (later blocks dropped, ``stop_reason: "refusal"``)."""
        content = body.get("content")
        if not isinstance(content, list):
            return None
        blocks: list[Any] = []
        for block in content:
            text = block.get("text") if isinstance(block, dict) else None
            if not isinstance(text, str) or not text or block.get("type") != "text":
                blocks.append(block)
                continue
            if self._stop:
                new, rule = self.scanner.first(text)
                if rule >= 0:
                    stats.record(self.scanner.names[rule], "completion_stop")
                    blocks.append({**block, "text": new})
                    return {**body, "content": blocks, "stop_reason": "refusal"}
                blocks.append(block)
                continue
            new = self._redact_text(text, stats, "completion_redact")
            blocks.append(block if new == text else {**block, "text": new})
        changed = any(a is not b for a, b in zip(blocks, content, strict=True))
        return {**body, "content": blocks} if changed else None

    def _filter_choice(self, endpoint: Endpoint, choice: Any, stats: FilterStats) -> Any:
        """One choice of a non-streaming body, redacted or cut (itself if unchanged)."""
        if not isinstance(choice, dict):
            return choice
        holder: Any = choice.get("message") if endpoint is Endpoint.CHAT else choice
        key = "content" if endpoint is Endpoint.CHAT else "text"
        value = holder.get(key) if isinstance(holder, dict) else None
        if not isinstance(value, str) or not value:
            return choice
        finish: dict[str, Any] = {}
        if self._stop:
            new, rule = self.scanner.first(value)
            if rule < 0:
                return choice
            stats.record(self.scanner.names[rule], "completion_stop")
            finish["finish_reason"] = CONTENT_FILTER
        else:
            new = self._redact_text(value, stats, "completion_redact")
            if new == value:
                return choice
        if endpoint is Endpoint.CHAT:
            return {**choice, **finish, "message": {**holder, key: new}}
        return {**choice, **finish, key: new}


def _redact_message(message: Any, redact: Callable[[str], str]) -> Any:
    """A chat message with its string content and text parts redacted (itself if unchanged)."""
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if isinstance(content, str):
        new = redact(content)
        return message if new == content else {**message, "content": new}
    if isinstance(content, list):
        parts = [_redact_part(p, redact) for p in content]
        if all(a is b for a, b in zip(parts, content, strict=True)):
            return message
        return {**message, "content": parts}
    return message


def _redact_part(part: Any, redact: Callable[[str], str]) -> Any:
    if isinstance(part, dict) and isinstance(part.get("text"), str):
        new = redact(part["text"])
        return part if new == part["text"] else {**part, "text": new}
    return part
