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
```

**Prompts** (``on_request``): ``reject`` answers 400 naming the first rule that matched;
``redact`` rewrites message string contents, text parts and the completions prompt in the
body that goes upstream. **Non-streaming responses**: the message content (or ``text``) is
redacted, or cut before the first match with ``finish_reason: "content_filter"``.

**Streams** (``on_event``): per choice index the filter holds back only text that may still
be the start of a match: a position is released once (a) at least ``window`` characters
follow it (every rule's longest match is at most ``window`` characters, so the outcome there
can no longer change), or (b) no rule can start a match there whatever comes next, which is
checked with a second combined expression of every rule's *match prefixes* anchored at the
end of the text. Regex rules have no derivable prefix set, so with a regex rule the last
``max_match_chars`` characters are always held. The rest is released at once: either the
event passes unchanged (its original bytes) or its text is rewritten to carry the released
text. Held text never exceeds ``window`` characters, is released before a choice's
``finish_reason`` chunk, and at the end of the stream (``on_flush``); the output is exactly
the redaction of the whole text. ``stop`` releases the text before the first match, then a
chunk with ``finish_reason: "content_filter"``; when every choice has ended the stream ends
(``EndStream``: ``[DONE]`` follows and the upstream connection is closed).

**Window and latency** (characters held per choice at most = longest possible match):
``email`` 153, ``phone`` 36, ``credit_card`` 19, ``api_key`` 203, ``words`` the longest word,
``regex`` its ``max_match_chars``; the default rule set's window is 203 characters. With the
default rules the held text is in practice the trailing run of word characters (any word may
be the local part of an e-mail address, any digits a phone or card number), so a token is
typically delayed until the next token arrives: about one token of added latency, at most
the window (~50 tokens) while a real candidate (``sk-...``) is pending. Rule sets without
``email``/``phone``/``credit_card`` hold nothing for most words and pass events unchanged.

**Cost** (CPython 3.11, ``timeit`` of ``on_event`` over fresh ``SSEEvent`` objects of
one-word chat deltas such as ``" world"``, in a steady stream): with the default rules about
16 µs per event, every event being rewritten (its text shifted by the held word): ~3 µs to
parse the event and read its texts and finish reasons, ~4 µs to scan and keep state, ~9 µs in
``gateway.deltas.with_texts``, which deep-copies the chunk (a path copy would make it ~2.5 µs,
~10 µs per event in all). With rules that hold nothing for ordinary words (e.g. ``api_key``
and ``words``) events pass unchanged at about 5 µs per event.

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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal

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
from gateway.deltas import event_texts, finish_reasons, prompt_texts, text_event, with_texts
from gateway.plugin import EndStream, Plugin, Reject
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
            spec = _Spec(self.name or self.detector, pattern, prefix, longest, 1, validate)
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
        self.pattern = re.compile(
            "|".join(f"(?P<_cf{i}>{s.pattern})" for i, s in enumerate(ordered))
        )
        self._index = {f"_cf{i}": i for i in range(len(ordered))}
        self._validate = [s.validate for s in ordered]
        prefixes = [s.prefix for s in ordered if s.prefix is not None]
        self.viable = re.compile(f"(?:{'|'.join(prefixes)})\\Z") if prefixes else None
        self.generic = max((s.max_chars for s in ordered if s.prefix is None), default=0)
        self.window = max(s.max_chars for s in ordered)
        self.context = max(s.lookbehind for s in ordered)
        self.replacements = [redaction.format(rule=s.name) for s in ordered]

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
        search = self.pattern.search
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


@dataclass(slots=True)
class _Stream:
    stats: FilterStats
    n: int
    choices: dict[int, _Choice] = field(default_factory=dict)
    stopped: set[int] = field(default_factory=set)
    template: SSEEvent | None = None  # an event of this stream, for id/model of new events

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


def _without_choices(event: SSEEvent, drop: set[int]) -> SSEEvent | None:
    """`event` without the choices in `drop` (None if nothing of it is left)."""
    obj = event.json()
    choices = obj.get("choices") or []
    kept = [c for c in choices if not (isinstance(c, dict) and int(c.get("index", 0)) in drop)]
    if len(kept) == len(choices):
        return event
    if not kept and obj.get("usage") is None:
        return None
    return SSEEvent.from_json({**obj, "choices": kept}, event=event.event, id=event.id)


# ----- the plugin ---------------------------------------------------------------------------------


class ContentFilter(Plugin):
    """Redacts, rejects or stops on rule matches in prompts and completions."""

    name = "content_filter"
    Options: ClassVar[type[BaseModel]] = ContentFilterOptions

    def __init__(self, options: BaseModel) -> None:
        super().__init__(options)
        if not isinstance(options, ContentFilterOptions):
            raise TypeError("ContentFilter needs ContentFilterOptions")
        self.opts = options
        self.scanner = options.scanner
        self._stop = options.completion_action == "stop"
        self._completions = options.completion_action != "off"

    @property
    def window(self) -> int:
        """The most characters held back per choice."""
        return self.scanner.window

    # -- prompts -----------------------------------------------------------------------------

    async def on_request(self, ctx: RequestContext) -> None:
        stats = FilterStats()
        ctx.set(FILTER, stats)
        if ctx.endpoint is Endpoint.EMBEDDINGS:
            return
        action = self.opts.prompt_action
        if action == "reject":
            for text in prompt_texts(ctx.endpoint, ctx.body):
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

    # -- streams -----------------------------------------------------------------------------

    def _feed(self, st: _Stream, ch: _Choice, text: str, final: bool) -> tuple[str, int]:
        """Add `text` to a choice; return what to release now and the rule that stopped (-1)."""
        sc = self.scanner
        buf = ch.buf + text
        out, frontier, stopped, hits = sc.scan(buf, ch.start, final, self._stop)
        if stopped >= 0:
            ch.buf, ch.start = "", 0
            return out, stopped
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
        return out, -1

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
        events.append(text_event(ctx, template, index, "", finish_reason=CONTENT_FILTER))
        return events

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        st = ctx.get(_STREAM)
        if st is None:
            return None
        texts = event_texts(ctx, event)
        finishes = finish_reasons(ctx, event)
        if not finishes and not st.stopped:
            if not texts:
                return None  # role or usage chunk: nothing of ours to release before it
            if len(texts) == 1:  # the hot path: one token of one choice
                ((index, text),) = texts.items()
                ch = st.choice(index)
                if st.template is None:
                    st.template = event
                if not ch.done:
                    out, rule = self._feed(st, ch, text, False)
                    if rule < 0:
                        return None if out == text else [with_texts(ctx, event, {index: out})]
                    edit = _Edit(set())
                    edit.after = self._stopped(ctx, st, index, out, rule, event, edit)
                    return self._apply(ctx, st, event, edit)
        if st.template is None:
            st.template = event
        edit = _Edit(set(st.stopped))
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
        out, rule = self._feed(st, ch, text, final)
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
        out, rule = self._feed(st, ch, "", True)
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
            main = _without_choices(main, edit.drop)
        result = [*edit.before, *([main] if main is not None else []), *edit.after]
        if edit.stopped and st.all_done():
            raise EndStream(result)
        return result

    def on_flush(self, ctx: RequestContext) -> list[SSEEvent] | None:
        st = ctx.get(_STREAM)
        if st is None or st.template is None:
            return None
        out: list[SSEEvent] = []
        for index, ch in sorted(st.choices.items()):
            if ch.done or len(ch.buf) <= ch.start:
                continue
            text, rule = self._feed(st, ch, "", True)
            if rule >= 0:
                out += self._stopped(ctx, st, index, text, rule, st.template)
            elif text:
                out.append(text_event(ctx, st.template, index, text))
        return out or None

    # -- non-streaming responses -------------------------------------------------------------

    async def on_response(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any] | None:
        if not self._completions:
            return None
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
