"""The content filter's options: rules (detector, words or regex) and actions."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from plugins.content_filter.detectors import _DETECTORS, _NEEDS, DetectorName, _Spec, _words_spec
from plugins.content_filter.regex import _analyse, _scoped
from plugins.content_filter.scanner import Scanner

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
        if info.problem:
            raise ValueError(info.problem)
        if info.min_chars == 0 or re.match(source, "") is not None:
            raise ValueError("the regex can match empty text")
        longest = self.max_match_chars or info.max_chars
        if longest is None:
            raise ValueError(
                "max_match_chars is required: the longest match of this regex cannot be "
                "derived (it has an unbounded repeat such as + or *)"
            )
        wrapped = f"(?i:{source})" if self.ignore_case else f"(?:{source})"
        lookbehind = max(1, info.lookbehind)
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
