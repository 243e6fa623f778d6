"""The content filter: detectors, rules, options, prompts, hold-back streaming, responses."""

from __future__ import annotations

import itertools
import re
import sys
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.chain import build_plugin, discover_plugins
from gateway.config import ConfigError, PluginConfig
from gateway.context import Endpoint, RequestContext
from gateway.deltas import event_texts, finish_reasons
from gateway.plugin import EndStream, Reject
from gateway.sse import SSEEvent
from gateway.testing import PluginRunner, openai_chunk, openai_completion, request_context
from plugins.content_filter import (
    DETECTOR_MAX_CHARS,
    FILTER,
    ContentFilter,
    ContentFilterOptions,
    FilterStats,
    detectors,
    luhn_valid,
    prefixes,
)
from plugins.content_filter import scanner as scanner_module

CARD = "4111 1111 1111 1111"
EMAIL = "jane.doe+x@mail.example.co.uk"
KEY = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"
PHONE = "(555) 123-4567"
WORD_RULES = [{"name": "banned", "words": ["foo", "bar baz"]}]


def make(**options: Any) -> ContentFilter:
    return ContentFilter(ContentFilterOptions.model_validate(options))


def redact(text: str, **options: Any) -> str:
    return make(**options).scanner.redact(text)[0]


async def start(
    plugin: ContentFilter,
    *,
    endpoint: Endpoint = Endpoint.CHAT,
    body: dict[str, Any] | None = None,
    stream: bool = True,
) -> PluginRunner[ContentFilter]:
    """`plugin` in a runner of its own, its request started (a runner per request; fail
    closed, so an exception in a hook fails the test instead of passing the event)."""
    runner = PluginRunner(plugin, fail_closed=True)
    body = body or {"stream": stream}
    await runner.request(ctx=request_context(body, endpoint=endpoint, stream=stream))
    return runner


def chunk(
    text: str | None,
    index: int = 0,
    finish: str | None = None,
    *,
    role: bool = False,
) -> SSEEvent:
    obj = openai_chunk(text, index=index, finish_reason=finish, role=role, cid="chatcmpl-xyz")
    return SSEEvent(orjson.dumps(obj))


def text_chunk(text: str, index: int = 0, finish: str | None = None) -> SSEEvent:
    obj = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "gpt-test",
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    return SSEEvent(orjson.dumps(obj))


@dataclass
class Run:
    """What a stream looked like after the filter."""

    events: list[SSEEvent]
    ended: bool  # EndStream was raised
    ctx: RequestContext
    held: list[int]  # the filter's peak of held characters after each event

    def text(self, index: int = 0) -> str:
        return "".join(event_texts(self.ctx, e).get(index, "") for e in self.events)

    def finishes(self, index: int = 0) -> list[str]:
        return [
            r for e in self.events for i, r in finish_reasons(self.ctx, e).items() if i == index
        ]

    @property
    def stats(self) -> FilterStats:
        return self.ctx.require(FILTER)


def feed(
    runner: PluginRunner[ContentFilter], events: Sequence[SSEEvent], *, flush: bool = True
) -> Run:
    """Each event as a read of its own through the runner, then (with `flush`) its flush."""
    return feed_batches(runner, events, [1], flush=flush)


async def stream(
    plugin: ContentFilter, tokens: Sequence[str], *, finish: bool = True, role: bool = True
) -> Run:
    events = [chunk("", role=True)] if role else []
    events += [chunk(t) for t in tokens]
    if finish:
        events.append(chunk(None, finish="stop"))
    return feed(await start(plugin), events)


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def split_in(text: str, count: int) -> list[str]:
    step = -(-len(text) // count)
    return pieces(text, step)


# ----- detectors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "number",
    [
        "4111111111111111",
        "4111 1111 1111 1111",
        "5500-0000-0000-0004",
        "378282246310005",
        "6011111111111117",
        "4222222222222",
    ],
)
def test_luhn_accepts_valid_card_numbers(number: str) -> None:
    assert luhn_valid(number)


@pytest.mark.parametrize(
    "number", ["4111111111111112", "1234567812345678", "378282246310006", "411111111111", "4" * 20]
)
def test_luhn_rejects_invalid_or_wrong_length_numbers(number: str) -> None:
    assert not luhn_valid(number)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pay with 4111 1111 1111 1111 now", "pay with [REDACTED:credit_card] now"),
        ("4111-1111-1111-1111", "[REDACTED:credit_card]"),
        ("amex 378282246310005.", "amex [REDACTED:credit_card]."),
        ("amex 3782 822463 10005", "amex [REDACTED:credit_card]"),
        ("card 4111 1111 1111 1111 12/26 cvv 123", "card [REDACTED:credit_card] 12/26 cvv 123"),
        ("bad 4111 1111 1111 1112", "bad 4111 1111 1111 1112"),  # Luhn fails
        ("id 41111111111111111111111", "id 41111111111111111111111"),  # too long
        ("order 123456", "order 123456"),
    ],
)
def test_credit_card_detector_is_luhn_checked(text: str, expected: str) -> None:
    assert redact(text, rules=[{"detector": "credit_card"}]) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail jane@example.com.", "mail [REDACTED:email]."),
        (f"<{EMAIL}>", "<[REDACTED:email]>"),
        ("Jos\u00e9.M@correo.es y", "[REDACTED:email] y"),
        ("a@b.c is no address", "a@b.c is no address"),
        ("user@localhost", "user@localhost"),
        ("at @ sign, x@ y.com", "at @ sign, x@ y.com"),
    ],
)
def test_email_detector(text: str, expected: str) -> None:
    assert redact(text, rules=[{"detector": "email"}]) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("call +1 555 123 4567 now", "call [REDACTED:phone] now"),
        ("call (555) 123-4567.", "call [REDACTED:phone]."),
        ("call 555-123-4567", "call [REDACTED:phone]"),
        ("call 1-800-555-0199", "call [REDACTED:phone]"),
        ("tel +44 20 7946 0958", "tel [REDACTED:phone]"),
        ("tel +4915123456789", "tel [REDACTED:phone]"),
        ("on 2024-10-05", "on 2024-10-05"),
        ("version 1.2.3 of 12345", "version 1.2.3 of 12345"),
        ("ip 192.168.100.1000", "ip 192.168.100.1000"),
        ("v 555-123-4567.8", "v 555-123-4567.8"),
        ("end: 555-123-4567.", "end: [REDACTED:phone]."),
    ],
)
def test_phone_detector(text: str, expected: str) -> None:
    assert redact(text, rules=[{"detector": "phone"}]) == expected


@pytest.mark.parametrize(
    "key",
    [
        KEY,
        "sk-ant-api03-" + "A1b2_C3d4-" * 9,
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_" + "a1B2" * 9,
        "github_pat_" + "x" * 82,
        "xoxb-1234567890-abcdefghij",
        "xoxp-1234567890-abcdefghij",
        "AIza" + "S" * 35,
        "-----BEGIN RSA PRIVATE KEY-----",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----",
    ],
)
def test_api_key_detector_finds_common_formats(key: str) -> None:
    assert redact(f"key={key}\n", rules=[{"detector": "api_key"}]) == "key=[REDACTED:api_key]\n"


@pytest.mark.parametrize(
    "text",
    [
        "use sk-learn for this",
        "a risk-free-investment-strategy-for-everyone",
        "AKIA is short",
        "ghp_tooshort",
        "-----BEGIN PUBLIC KEY-----",
        "the skeleton key",
    ],
)
def test_api_key_detector_leaves_ordinary_text(text: str) -> None:
    assert redact(text, rules=[{"detector": "api_key"}]) == text


def test_default_rules_are_the_four_detectors_and_their_windows() -> None:
    plugin = make()
    assert plugin.scanner.names == ["email", "phone", "api_key", "credit_card"]
    assert DETECTOR_MAX_CHARS == {"email": 153, "phone": 36, "credit_card": 19, "api_key": 203}
    assert plugin.window == 203
    assert make(rules=[{"detector": "phone"}]).window == 36


# ----- words and regexes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Foo and FOO.", "[REDACTED:banned] and [REDACTED:banned]."),
        ("food, foobar, afoo", "food, foobar, afoo"),
        ("BAR Baz!", "[REDACTED:banned]!"),
        ("bar bazooka", "bar bazooka"),
        ("bar  baz", "bar  baz"),  # literal: one space
    ],
)
def test_words_are_literal_case_insensitive_and_whole_word(text: str, expected: str) -> None:
    assert redact(text, rules=WORD_RULES) == expected


def test_words_prefer_the_longest_and_allow_symbols() -> None:
    rules = [{"name": "w", "words": ["bar", "bar baz", "C++", "a.b"]}]
    assert (
        redact("bar baz, c++ and axb a.b", rules=rules)
        == "[REDACTED:w], [REDACTED:w] and axb [REDACTED:w]"
    )
    assert make(rules=rules).window == len("bar baz")


def test_regex_rule_with_derived_and_declared_window() -> None:
    ssn = {"name": "ssn", "regex": r"\b\d{3}-\d{2}-\d{4}\b"}
    assert (
        redact("ssn 123-45-6789, not 1234-56-7890", rules=[ssn])
        == "ssn [REDACTED:ssn], not 1234-56-7890"
    )
    assert make(rules=[ssn]).window == 11
    loose = {"name": "ticket", "regex": r"TCK-\d+", "max_match_chars": 12}
    assert make(rules=[loose]).window == 12
    assert redact("see TCK-12345", rules=[loose]) == "see [REDACTED:ticket]"


def test_regex_flags() -> None:
    rules = [
        {"name": "ci", "regex": r"secret\d", "ignore_case": True},
        {"name": "inline", "regex": r"(?i)token\d"},
        {"name": "verbose", "regex": "(?x) pin [0-9]{4}  # four digits"},
    ]
    assert (
        redact("SECRET1 Token2 pin1234", rules=rules)
        == "[REDACTED:ci] [REDACTED:inline] [REDACTED:verbose]"
    )
    assert redact("SECRET1", rules=[{"name": "cs", "regex": r"secret\d"}]) == "SECRET1"


def test_redaction_template_and_stats() -> None:
    plugin = make(rules=WORD_RULES, redaction="***")
    assert plugin.scanner.redact("foo bar baz")[0] == "*** ***"


@pytest.mark.parametrize(
    ("options", "where", "message"),
    [
        (
            {"rules": [{"name": "x", "regex": "a+"}]},
            "options.rules[0]",
            "max_match_chars is required",
        ),
        ({"rules": [{"name": "x", "regex": "^a"}]}, "options.rules[0]", "anchors"),
        ({"rules": [{"name": "x", "regex": r"(a)\1"}]}, "options.rules[0]", "backreferences"),
        ({"rules": [{"name": "x", "regex": "a?"}]}, "options.rules[0]", "empty text"),
        ({"rules": [{"name": "x", "regex": "("}]}, "options.rules[0].regex", "invalid regex"),
        ({"rules": [{"name": "x", "regex": "a{300}"}]}, "options.max_hold_chars", "rule 'x' needs"),
        (
            {"rules": [{"detector": "email"}], "max_hold_chars": 64},
            "options.max_hold_chars",
            "'email'",
        ),
        ({"rules": [{"detector": "dna"}]}, "options.rules[0].detector", ""),
        ({"rules": [{"words": ["a"]}]}, "options.rules[0]", "needs a name"),
        ({"rules": [{"name": "x", "words": [" "]}]}, "options.rules[0].words", "blank"),
        ({"rules": [{"detector": "email", "regex": "a"}]}, "options.rules[0]", "exactly one"),
        (
            {"rules": [{"detector": "email", "max_match_chars": 3}]},
            "options.rules[0]",
            "regex rules only",
        ),
        ({"rules": [{"detector": "email"}, {"detector": "email"}]}, "options.rules", "unique"),
        (
            {"rules": [{"name": "a", "regex": "(?P<g>a)"}, {"name": "b", "regex": "(?P<g>b)"}]},
            "options.rules",
            "combined",
        ),
        ({"rules": []}, "options.rules", ""),
        ({"redaction": "{secret}"}, "options.redaction", "{rule}"),
        ({"prompt_action": "stop"}, "options.prompt_action", ""),
        ({"completion_action": "reject"}, "options.completion_action", ""),
        ({"surprise": 1}, "options.surprise", "unknown key"),
    ],
)
def test_bad_options_are_config_errors_naming_the_key(
    options: dict[str, Any], where: str, message: str
) -> None:
    spec = PluginConfig(name="content_filter", options=options)
    with pytest.raises(ConfigError) as info:
        build_plugin(spec, discover_plugins(), "plugins[0]")
    assert str(info.value).startswith(f"plugins[0].{where}:"), str(info.value)
    assert message in str(info.value)


class _ChangedParser:
    """A regex parser module as a future Python might ship it: `parse` exists, the names
    the analysis relies on do not."""

    @staticmethod
    def parse(source: str) -> Any:
        return object()


@pytest.mark.parametrize("parser", [None, _ChangedParser()], ids=["missing", "changed"])
def test_a_regex_rule_is_refused_when_its_analysis_cannot_run(
    parser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a usable regex parser the anchor/backreference checks cannot run: the rule
    is a config error naming it (fail closed), never accepted unchecked. Other rules load."""
    monkeypatch.setitem(sys.modules, "re._parser", parser)  # None: importing it fails
    spec = PluginConfig(
        name="content_filter",
        options={"rules": [{"name": "x", "regex": "^a", "max_match_chars": 1}]},
    )
    with pytest.raises(ConfigError) as info:
        build_plugin(spec, discover_plugins(), "plugins[0]")
    assert str(info.value).startswith("plugins[0].options.rules[0]:"), str(info.value)
    assert "regex rules cannot be checked" in str(info.value)
    assert redact(f"mail {EMAIL}", rules=[{"detector": "email"}]) == "mail [REDACTED:email]"


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("+49 30 1234567", True),
        ("+33 6 12 34 56 78", True),
        ("(555) 123-4567", True),
        ("555-123-4567", True),
        ("030 1234567", False),  # national formats: the documented limit
        ("06 12 34 56 78", False),
    ],
)
def test_the_phone_detector_knows_international_and_north_american_forms(
    text: str, found: bool
) -> None:
    redacted = redact(f"call {text} now", rules=[{"detector": "phone"}])
    assert (redacted == "call [REDACTED:phone] now") is found, redacted
    assert (redacted == f"call {text} now") is not found, redacted


def test_prefix_regexes_match_exactly_the_prefixes_of_matches() -> None:
    """`prefixes.prefix` against brute force on a small finite pattern: every string over the
    alphabet up to 6 characters is a prefix of a match iff the prefix regex matches it."""
    d = prefixes.char("[ab]")
    pattern = prefixes.alt(
        prefixes.seq(prefixes.rep(d, 1, 2), prefixes.opt(prefixes.char("-")), d),
        prefixes.seq(prefixes.char("c"), prefixes.rep(prefixes.seq(prefixes.opt(d), d), 1, 2)),
    )
    alphabet = "abc-"
    strings = [""]
    for _ in range(6):
        strings += ["".join(p) for p in itertools.product(alphabet, repeat=len(strings[-1]) + 1)]
    full_re = re.compile(prefixes.full(pattern))
    language = {t for t in strings if full_re.fullmatch(t)}
    expected = {t[:i] for t in language for i in range(1, len(t) + 1)}
    prefix_re = re.compile(prefixes.prefix(pattern))
    assert {t for t in strings if t and prefix_re.fullmatch(t)} == expected


@pytest.mark.parametrize(
    ("detector", "text", "held"),
    [
        ("phone", "The answer is 42 ", ""),  # was held: any digits could start a number
        ("phone", "In 2026 ", ""),
        ("phone", "v1.2.3 ", ""),
        ("phone", "call 555-123", "555-123"),
        ("phone", "call 555-123-4567", "555-123-4567"),  # complete: the next char decides
        ("phone", "ring +49 30", "+49 30"),
        ("credit_card", "The answer is 42 ", ""),
        ("credit_card", "In 2026 ", "2026 "),
        ("credit_card", "pay 4111 1111 ", "4111 1111 "),
        ("credit_card", "room 12-", ""),
        ("email", "Hello", "Hello"),
        ("email", "Hello ", ""),
        ("api_key", "Hello", ""),
        ("api_key", "key sk-ab", "sk-ab"),
    ],
)
def test_only_what_can_still_become_a_match_is_held(detector: str, text: str, held: str) -> None:
    scanner = make(rules=[{"detector": detector}]).scanner
    out, frontier, _, _ = scanner.scan(text, 0, False, False)
    assert (out, text[frontier:]) == (text[: len(text) - len(held)], held)


def test_the_entry_point_builds_the_plugin() -> None:
    spec = PluginConfig(name="content_filter", options={"rules": WORD_RULES})
    plugin = build_plugin(spec, discover_plugins(), "plugins[0]")
    assert isinstance(plugin, ContentFilter)
    assert plugin.name == "content_filter"


# ----- prompts ------------------------------------------------------------------------------------


async def test_prompt_reject_names_the_rule() -> None:
    plugin = make(rules=[{"name": "no-secrets", "detector": "api_key"}, *WORD_RULES])
    ctx = RequestContext(
        "r",
        Endpoint.CHAT,
        body={
            "messages": [
                {"role": "system", "content": "be nice"},
                {"role": "user", "content": [{"type": "text", "text": f"my key {KEY}"}]},
            ]
        },
    )
    with pytest.raises(Reject) as info:
        await PluginRunner(plugin, fail_closed=True).request(ctx=ctx)
    assert info.value.status == 400
    assert info.value.code == "content_filter"
    assert "'no-secrets'" in info.value.message
    assert KEY not in info.value.message
    assert ctx.require(FILTER).counts == {("no-secrets", "prompt_reject"): 1}


async def test_prompt_without_matches_passes() -> None:
    plugin = make()
    body = {"messages": [{"role": "user", "content": "hello there"}]}
    ctx = RequestContext("r", Endpoint.CHAT, body=body)
    await PluginRunner(plugin, fail_closed=True).request(ctx=ctx)
    assert ctx.body is body
    assert ctx.require(FILTER).count() == 0


async def test_prompt_redact_rewrites_chat_contents_and_text_parts() -> None:
    plugin = make(prompt_action="redact")
    image = {"type": "image_url", "image_url": {"url": "http://x/a.png"}}
    body: dict[str, Any] = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "plain"},
            {"role": "user", "content": f"mail {EMAIL} please"},
            {"role": "user", "content": [{"type": "text", "text": f"card {CARD}"}, image]},
            {"role": "assistant", "content": None, "tool_calls": []},
        ],
    }
    original = orjson.loads(orjson.dumps(body))
    ctx = RequestContext("r", Endpoint.CHAT, body=body)
    await PluginRunner(plugin, fail_closed=True).request(ctx=ctx)
    messages = ctx.body["messages"]
    assert messages[0] is body["messages"][0]
    assert messages[1]["content"] == "mail [REDACTED:email] please"
    assert messages[2]["content"] == [
        {"type": "text", "text": "card [REDACTED:credit_card]"},
        image,
    ]
    assert messages[3] == {"role": "assistant", "content": None, "tool_calls": []}
    assert body == original, "the client's body object is not mutated"
    assert ctx.require(FILTER).counts == {
        ("email", "prompt_redact"): 1,
        ("credit_card", "prompt_redact"): 1,
    }


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (f"key {KEY}", "key [REDACTED:api_key]"),
        ([f"a {PHONE}", "b", [1, 2]], ["a [REDACTED:phone]", "b", [1, 2]]),
    ],
)
async def test_prompt_redact_rewrites_completions_prompts(prompt: Any, expected: Any) -> None:
    plugin = make(prompt_action="redact")
    ctx = RequestContext("r", Endpoint.COMPLETIONS, body={"model": "m", "prompt": prompt})
    await PluginRunner(plugin, fail_closed=True).request(ctx=ctx)
    assert ctx.body["prompt"] == expected


async def test_prompt_action_off_and_embeddings_are_left_alone() -> None:
    body = {"messages": [{"role": "user", "content": KEY}]}
    ctx = RequestContext("r", Endpoint.CHAT, body=body)
    await PluginRunner(make(prompt_action="off"), fail_closed=True).request(ctx=ctx)
    assert ctx.body is body
    emb = RequestContext("r", Endpoint.EMBEDDINGS, body={"input": KEY, "prompt": KEY})
    await PluginRunner(make(), fail_closed=True).request(ctx=emb)
    assert emb.require(FILTER).count() == 0


# ----- streams: hold-back -------------------------------------------------------------------------

SPLITTERS: dict[str, Callable[[str], list[str]]] = {
    "whole": lambda s: [s],
    "two": lambda s: split_in(s, 2),
    "three": lambda s: split_in(s, 3),
    "one-char": lambda s: pieces(s, 1),
}


@pytest.mark.parametrize("secret", [KEY, EMAIL, CARD, PHONE, "Bar Baz"])
@pytest.mark.parametrize("split", list(SPLITTERS))
async def test_a_secret_split_across_deltas_is_redacted(secret: str, split: str) -> None:
    plugin = make(rules=[*make().opts.rules, *WORD_RULES])
    tokens = ["Here: ", *SPLITTERS[split](secret), " and more."]
    run = await stream(plugin, tokens)
    name = {KEY: "api_key", EMAIL: "email", CARD: "credit_card", PHONE: "phone"}.get(
        secret, "banned"
    )
    assert run.text() == f"Here: [REDACTED:{name}] and more."
    assert run.finishes() == ["stop"]
    assert not run.ended
    assert run.stats.counts == {(name, "completion_redact"): 1}


@pytest.mark.parametrize("split", list(SPLITTERS))
async def test_a_secret_split_across_deltas_stops_the_stream(split: str) -> None:
    plugin = make(completion_action="stop")
    run = await stream(plugin, ["Your key is ", *SPLITTERS[split](KEY), " keep it safe"])
    assert run.ended
    assert run.text() == "Your key is "
    assert run.finishes() == ["content_filter"]
    last = run.events[-1].json()
    assert last["choices"][0]["finish_reason"] == "content_filter"
    assert (last["id"], last["model"]) == ("chatcmpl-xyz", "gpt-test")
    assert run.stats.counts == {("api_key", "completion_stop"): 1}


async def test_stop_releases_the_safe_text_held_in_the_same_event() -> None:
    plugin = make(completion_action="stop", rules=WORD_RULES)
    run = await stream(plugin, ["It is ba", "d foo time"])
    assert run.ended
    assert run.text() == "It is bad "
    assert [e.json()["choices"][0]["delta"] for e in run.events[-3:]] == [
        {"content": "It is "},
        {"content": "bad "},
        {},
    ]


async def test_text_not_in_a_match_is_released_at_once() -> None:
    plugin = make(rules=[{"detector": "api_key"}])
    runner = await start(plugin)
    ctx = runner.ctx
    event = chunk("Hello, world. ")
    assert runner.events([event]) == [event], "passes unchanged with its original bytes"
    out = runner.events([chunk(" a sk")])
    assert out is not None
    assert event_texts(ctx, out[0]) == {0: " a "}
    assert ctx.require(FILTER).held_max == 2


async def test_no_text_is_held_without_a_possible_match_even_for_regex_rules() -> None:
    plugin = make(rules=WORD_RULES)
    run = await stream(plugin, ["The", " quick", " brown"], finish=False)
    assert [event_texts(run.ctx, e) for e in run.events[1:]] == [
        {0: "The"},
        {0: " quick"},
        {0: " brown"},
    ]
    regex = make(rules=[{"name": "ssn", "regex": r"\b\d{3}-\d{2}-\d{4}\b"}])
    held = await stream(regex, ["The quick brown fox"], finish=False)
    assert held.held == [0, 11]  # a regex rule always holds its window


async def test_events_without_text_keep_their_place() -> None:
    plugin = make(rules=WORD_RULES)
    runner = await start(plugin)
    ctx = runner.ctx
    role = chunk("", role=True)
    usage = SSEEvent(
        orjson.dumps(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2},
            }
        )
    )
    run = feed(runner, [role, chunk("say fo"), chunk(None, finish="stop"), usage])
    assert run.events[0] is role
    assert event_texts(ctx, run.events[1]) == {0: "say "}
    assert event_texts(ctx, run.events[2]) == {0: "fo"}, "held text goes out before the finish"
    assert finish_reasons(ctx, run.events[3]) == {0: "stop"}
    assert run.events[4] is usage
    assert len(run.events) == 5


async def test_text_and_finish_in_one_event_release_everything_into_it() -> None:
    plugin = make(rules=WORD_RULES)
    runner = await start(plugin)
    ctx = runner.ctx
    run = feed(runner, [chunk("say fo"), chunk("o", finish="length")])
    assert [event_texts(ctx, e) for e in run.events] == [{0: "say "}, {0: "[REDACTED:banned]"}]
    assert run.finishes() == ["length"]


async def test_held_text_is_flushed_at_the_end_with_redaction() -> None:
    plugin = make(rules=WORD_RULES)
    run = await stream(plugin, ["no finish chunk: bar", " baz"], finish=False)
    assert run.text() == "no finish chunk: [REDACTED:banned]"
    flushed = run.events[-1].json()
    assert flushed["id"] == "chatcmpl-xyz"
    assert flushed["model"] == "gpt-test"


async def test_a_match_found_only_at_flush_stops_there() -> None:
    plugin = make(rules=WORD_RULES, completion_action="stop")
    run = await stream(plugin, ["well foo"], finish=False)
    assert not run.ended
    assert run.text() == "well "
    assert run.finishes() == ["content_filter"]


async def test_the_final_finish_chunk_can_carry_the_stop() -> None:
    plugin = make(rules=WORD_RULES, completion_action="stop")
    runner = await start(plugin)
    run = feed(runner, [chunk("ok foo"), chunk(None, finish="stop")])
    assert run.ended
    assert run.text() == "ok "
    assert run.finishes() == ["content_filter"], "the upstream's own finish is replaced"


async def test_held_text_is_bounded_by_the_window() -> None:
    plugin = make()
    run = await stream(plugin, ["x sk-", *["a1b2c3d4"] * 80, " end 4111", " 1111" * 40])
    assert max(run.held) <= plugin.window
    assert max(run.held) == plugin.window
    assert (
        run.text()
        == plugin.scanner.redact("".join(["x sk-", *["a1b2c3d4"] * 80, " end 4111", " 1111" * 40]))[
            0
        ]
    )


async def test_completions_streams_are_filtered_too() -> None:
    plugin = make(rules=WORD_RULES)
    runner = await start(plugin, endpoint=Endpoint.COMPLETIONS)
    run = feed(runner, [text_chunk("a fo"), text_chunk("o b"), text_chunk("", finish="stop")])
    assert run.text() == "a [REDACTED:banned] b"
    assert run.events[-1].json()["object"] == "text_completion"


async def test_state_is_per_request() -> None:
    plugin = make(rules=WORD_RULES)
    one, two = await start(plugin), await start(plugin)
    a = feed(one, [chunk("fo")], flush=False)
    b = feed(two, [chunk("bar"), chunk(" ba")], flush=False)
    a2 = feed(one, [chunk("o!")])
    b2 = feed(two, [chunk("z.")])
    assert a.text() + a2.text() == "[REDACTED:banned]!"
    assert b.text() + b2.text() == "[REDACTED:banned]."
    assert one.ctx.require(FILTER).count() == two.ctx.require(FILTER).count() == 1


async def test_no_stream_state_when_completions_are_off() -> None:
    plugin = make(completion_action="off")
    runner = await start(plugin)
    event = chunk(KEY)
    assert runner.events([event]) == [event]
    assert runner.flush() == []


# ----- streams: several choices -------------------------------------------------------------------


def interleave(texts: dict[int, list[str]]) -> list[SSEEvent]:
    events: list[SSEEvent] = []
    longest = max(len(tokens) for tokens in texts.values())
    for i in range(longest):
        for index, tokens in texts.items():
            if i < len(tokens):
                events.append(chunk(tokens[i], index=index))
    events += [chunk(None, index=index, finish="stop") for index in texts]
    return events


async def test_two_choices_interleaved_are_redacted_independently() -> None:
    plugin = make(rules=[*make().opts.rules, *WORD_RULES])
    texts = {
        0: ["mail ", "jane@exa", "mple.com", " fo"],
        1: ["fo", "o and ", "4111 1111", " 1111 1111", "!"],
    }
    runner = await start(plugin, body={"stream": True, "n": 2})
    run = feed(runner, interleave(texts))
    assert run.text(0) == "mail [REDACTED:email] fo"
    assert run.text(1) == "[REDACTED:banned] and [REDACTED:credit_card]!"
    assert run.finishes(0) == run.finishes(1) == ["stop"]


async def test_two_choices_stop_independently_and_the_stream_ends_when_both_did() -> None:
    plugin = make(rules=WORD_RULES, completion_action="stop")
    runner = await start(plugin, body={"stream": True, "n": 2})
    ctx = runner.ctx
    first = feed(runner, interleave({0: ["a fo", "o b", "c"], 1: ["fine", " text"]}))
    assert not first.ended
    assert first.text(0) == "a "
    assert first.finishes(0) == ["content_filter"]
    assert first.text(1) == "fine text"
    assert first.finishes(1) == ["stop"]

    runner = await start(plugin, body={"stream": True, "n": 2})

    ctx = runner.ctx
    both = feed(runner, interleave({0: ["x foo", " y"], 1: ["bar baz", " z"]}))
    assert both.ended
    assert (both.text(0), both.text(1)) == ("x ", "")
    assert both.finishes(0) == both.finishes(1) == ["content_filter"]
    assert ctx.require(FILTER).count(action="completion_stop") == 2


# ----- streams: property tests --------------------------------------------------------------------

FRAGMENTS = [
    "Hello",
    " ",
    "world",
    ", ",
    ".\n",
    "foo",
    "bar baz",
    "bar",
    KEY,
    EMAIL,
    CARD,
    PHONE,
    "4111 1111 1111 1112",
    "@",
    "sk-",
    "-",
    "12",
    "AKIAIOSFODNN7EXAMPLE",
    "é",
    "\U0001f980",
    "(",
]
ALPHABET = "abfoz sk-@._+ 0123456789()AKIAxBEGIN\n"


@st.composite
def split_texts(draw: st.DrawFn) -> tuple[str, list[str]]:
    fragment = st.one_of(st.sampled_from(FRAGMENTS), st.text(ALPHABET, min_size=1, max_size=6))
    text = "".join(draw(st.lists(fragment, min_size=1, max_size=25)))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=40)))
    bounds = [0, *[c for c in cuts if 0 < c < len(text)], len(text)]
    return text, [text[a:b] for a, b in pairwise(bounds)]


FUZZ_RULES = [
    {"detector": "email"},
    {"detector": "phone"},
    {"detector": "credit_card"},
    {"detector": "api_key"},
    *WORD_RULES,
    {"name": "digits", "regex": r"\b1\d{1,3}\b"},
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split_texts())
async def test_streamed_output_equals_the_redacted_whole(case: tuple[str, list[str]]) -> None:
    text, tokens = case
    plugin = make(rules=FUZZ_RULES, max_hold_chars=256)
    run = await stream(plugin, tokens)
    assert run.text() == plugin.scanner.redact(text)[0]
    assert max(run.held, default=0) <= plugin.window
    assert run.finishes() == ["stop"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split_texts())
async def test_stopped_output_is_the_text_before_the_first_match(
    case: tuple[str, list[str]],
) -> None:
    text, tokens = case
    plugin = make(rules=FUZZ_RULES, completion_action="stop")
    run = await stream(plugin, tokens)
    safe, rule = plugin.scanner.first(text)
    assert run.text() == safe
    assert run.finishes() == (["content_filter"] if rule >= 0 else ["stop"])
    assert run.ended == (rule >= 0)


@settings(max_examples=100, deadline=None)
@given(split_texts(), split_texts())
async def test_two_choices_match_their_own_whole_text(
    a: tuple[str, list[str]], b: tuple[str, list[str]]
) -> None:
    plugin = make(rules=FUZZ_RULES)
    runner = await start(plugin, body={"stream": True, "n": 2})
    run = feed(runner, interleave({0: a[1], 1: b[1]}))
    assert run.text(0) == plugin.scanner.redact(a[0])[0]
    assert run.text(1) == plugin.scanner.redact(b[0])[0]


# ----- streams: events held whole, and batches --------------------------------------------------


def feed_batches(
    runner: PluginRunner[ContentFilter],
    events: Sequence[SSEEvent],
    sizes: Sequence[int],
    *,
    flush: bool = True,
) -> Run:
    """The events as reads of `sizes` events (cycled) through the runner (the chain calls
    `on_events`, whose one-event batches are `on_event`), then (with `flush`) its flush."""
    ctx = runner.ctx
    out: list[SSEEvent] = []
    held: list[int] = []
    pos = i = 0
    try:
        while pos < len(events):
            batch = list(events[pos : pos + sizes[i % len(sizes)]])
            pos, i = pos + len(batch), i + 1
            out.extend(runner.events(batch))
            held.append(ctx.require(FILTER).held_max)
    except EndStream as end:
        return Run([*out, *end.events], True, ctx, held)
    if flush:
        out.extend(runner.flush())
    return Run(out, False, ctx, held)


async def test_one_word_events_pass_as_they_came() -> None:
    plugin = make()  # the default detectors: any word may start an e-mail address
    runner = await start(plugin)
    ctx = runner.ctx
    events = [chunk("", role=True), *(chunk(w) for w in [" Hello", ",", " world", "."])]
    events.append(chunk(None, finish="stop"))
    run = feed(runner, events)
    assert len(run.events) == len(events)
    assert all(a is b for a, b in zip(run.events, events, strict=True)), "no event rewritten"
    assert ctx.require(FILTER).held_max == len(" world.")


async def test_an_event_waits_whole_until_its_word_is_decided() -> None:
    plugin = make()
    runner = await start(plugin)
    first, second = chunk(" Hello"), chunk(" world")
    assert runner.events([first]) == [], "' Hello' may be the start of an address"
    assert runner.events([second]) == [first], "decided by the next word: sent as it came"
    finish = chunk(None, finish="stop")
    assert runner.events([finish]) == [second, finish]


async def test_a_match_split_across_waiting_events_is_still_redacted() -> None:
    plugin = make()
    runner = await start(plugin)
    tokens = [" mail", " jane", ".doe", "@", "example", ".com", " now", " and", " then", "."]
    events = [chunk(t) for t in tokens]
    run = feed(runner, [*events, chunk(None, finish="stop")])
    assert run.text() == " mail [REDACTED:email] now and then."
    assert run.events[0] is events[0], "the word before the address went out as it came"
    assert run.events[-4:-1] == events[-3:], "so did the text after it, after one word"
    assert run.stats.counts == {("email", "completion_redact"): 1}


async def test_without_whole_events_released_text_goes_out_at_once() -> None:
    plugin = make(hold_whole_events=False)
    runner = await start(plugin)
    ctx = runner.ctx
    out = [runner.events([chunk(w)]) for w in [" Hello", " world", "."]]
    assert [[event_texts(ctx, e) for e in events or []] for events in out] == [
        [{0: " "}],
        [{0: "Hello "}],
        [{}],  # "world." may still be an address: nothing released, the event is empty
    ]
    assert [event_texts(ctx, e) for e in runner.flush()] == [{0: "world."}]


@pytest.mark.parametrize("sizes", [[1], [3], [100]], ids=["per-event", "by-3", "one-batch"])
async def test_only_the_events_carrying_a_match_are_rewritten(sizes: list[int]) -> None:
    plugin = make()
    runner = await start(plugin)
    tokens = [" Write", " to", " jane", ".doe", "@", "example", ".com", " or", " not", "."]
    events = [chunk(t) for t in tokens]
    run = feed_batches(runner, [*events, chunk(None, finish="stop")], sizes)
    assert run.text() == " Write to [REDACTED:email] or not."
    same = [e for e in run.events if any(e is original for original in events)]
    assert same == [events[i] for i in (0, 1, 7, 8, 9)]


async def test_released_text_with_words_goes_out_at_once() -> None:
    plugin = make()
    runner = await start(plugin)
    ctx = runner.ctx
    out = runner.events([chunk("Hello, wor")])
    assert out is not None
    assert [event_texts(ctx, e) for e in out] == [{0: "Hello, "}], "not held for 'wor'"
    # the held word, released with the next one, goes out in an event of its own while the
    # next one waits whole
    last = chunk("ld again")
    out = runner.events([last])
    assert out is not None
    assert [event_texts(ctx, e) for e in out] == [{0: "world "}]


async def test_waiting_is_bounded_by_the_window() -> None:
    plugin = make()
    runner = await start(plugin)
    digits = [chunk(" 1")] * 30  # a phone number may still follow: held
    run = feed(runner, [*digits, chunk(None, finish="stop")])
    assert run.text() == " 1" * 30
    assert max(run.held) <= plugin.window


async def test_a_stop_drops_the_waiting_events_and_keeps_the_text_before_the_match() -> None:
    plugin = make(completion_action="stop")
    runner = await start(plugin)
    tokens = [" my", " key", " sk-", "proj", "-" + "a" * 30, " ok"]
    run = feed(runner, [chunk(t) for t in tokens])
    assert run.ended
    assert run.text() == " my key "
    assert run.finishes() == ["content_filter"]


async def test_comments_in_a_batch_keep_their_place_and_skip_the_filter() -> None:
    plugin = make(rules=WORD_RULES)
    runner = await start(plugin)
    ctx = runner.ctx
    comment = SSEEvent(comments=("keep-alive",))
    events = [chunk("The"), comment, chunk(" fo"), chunk("o.")]
    out = runner.events(events)
    assert out is not None
    assert out[:2] == [events[0], comment]
    run = Run([*out, *runner.flush()], False, ctx, [])
    assert run.text() == "The [REDACTED:banned]."
    assert runner.events([comment]) == [comment]


async def test_usage_on_a_stopped_event_is_kept() -> None:
    plugin = make(rules=WORD_RULES, completion_action="stop")
    runner = await start(plugin)
    obj = openai_chunk("a foo!", cid="chatcmpl-xyz")
    obj["usage"] = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    with pytest.raises(EndStream) as ended:
        runner.events([SSEEvent(orjson.dumps(obj))])
    kept = [e.json() for e in ended.value.events if "usage" in e.json()]
    assert [k["usage"]["total_tokens"] for k in kept] == [3]
    assert kept[0]["choices"] == []


WORD = st.one_of(
    st.from_regex(r"\A ?[A-Za-z]{1,8}\Z"),
    st.from_regex(r"\A ?[0-9]{1,4}\Z"),
    st.sampled_from([*".,;:!?()'\"-\n", " ", ".\n\n"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(WORD, min_size=1, max_size=40), st.lists(st.integers(1, 6), min_size=1))
async def test_without_a_match_one_word_events_all_pass_unchanged(
    words: list[str], sizes: list[int]
) -> None:
    plugin = make()
    text = "".join(words)
    assume(plugin.scanner.redact(text)[0] == text)
    events = [chunk("", role=True), *(chunk(w) for w in words), chunk(None, finish="stop")]
    for run in (
        feed(await start(plugin), events),
        feed_batches(await start(plugin), events, sizes),
    ):
        assert len(run.events) == len(events)
        assert all(a is b for a, b in zip(run.events, events, strict=True))
        assert max(run.held) <= plugin.window


STREAM_RULES = [*ContentFilterOptions().model_dump()["rules"], *WORD_RULES]  # no regex rule


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split_texts(), st.lists(st.integers(1, 8), min_size=1, max_size=5), st.booleans())
async def test_held_events_and_batches_give_the_redacted_whole(
    case: tuple[str, list[str]], sizes: list[int], whole: bool
) -> None:
    """Without a regex rule any word may be held: events wait whole, and batches are scanned
    in one go; the text that comes out is still exactly the redaction of the whole."""
    text, tokens = case
    plugin = make(rules=STREAM_RULES, hold_whole_events=whole)
    expected = plugin.scanner.redact(text)[0]
    events = [chunk("", role=True), *(chunk(t) for t in tokens), chunk(None, finish="stop")]
    one = feed(await start(plugin), events)
    batched = feed_batches(await start(plugin), events, sizes)
    unfinished = feed_batches(await start(plugin), events[:-1], sizes)
    for run in (one, batched, unfinished):
        assert run.text() == expected
        assert max(run.held, default=0) <= plugin.window
    assert one.finishes() == batched.finishes() == ["stop"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split_texts(), st.lists(st.integers(1, 8), min_size=1, max_size=5), st.booleans())
async def test_held_events_and_batches_stop_before_the_first_match(
    case: tuple[str, list[str]], sizes: list[int], whole: bool
) -> None:
    text, tokens = case
    plugin = make(rules=STREAM_RULES, completion_action="stop", hold_whole_events=whole)
    safe, rule = plugin.scanner.first(text)
    events = [chunk("", role=True), *(chunk(t) for t in tokens), chunk(None, finish="stop")]
    for run in (
        feed(await start(plugin), events),
        feed_batches(await start(plugin), events, sizes),
    ):
        assert run.text() == safe
        assert run.finishes() == (["content_filter"] if rule >= 0 else ["stop"])
        assert run.ended == (rule >= 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split_texts(), st.sampled_from(["+44 20 79 46 09 58", "4111-1111-1111-1111", "x@y.io"]))
def test_leaving_out_rules_whose_needs_are_absent_changes_nothing(
    case: tuple[str, list[str]], extra: str
) -> None:
    """Long scans first drop the detectors that cannot match (no "@", no 4 digits...)."""
    text = case[0] + " " + extra
    plugin = make(rules=FUZZ_RULES)
    scanner = plugin.scanner
    for start in (0, len(text) // 2):
        for final, stop in ((True, False), (False, False), (True, True)):
            gated = scanner.scan(text, start, final, stop)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(scanner_module, "GATE_CHARS", 1 << 30)
                assert scanner.scan(text, start, final, stop) == gated


def test_needs_are_met_by_every_detectors_examples() -> None:
    for name, needs in detectors._NEEDS.items():
        examples = {"email": EMAIL, "phone": PHONE, "credit_card": CARD, "api_key": KEY}
        assert needs(examples[name])
    assert detectors._NEEDS["phone"]("+44 20 7946 0958")
    assert detectors._NEEDS["api_key"]("-----BEGIN RSA PRIVATE KEY-----")


# ----- non-streaming responses --------------------------------------------------------------------


async def test_response_is_redacted() -> None:
    plugin = make()
    runner = await start(plugin, stream=False)
    ctx = runner.ctx
    body = openai_completion(f"write to {EMAIL} or call {PHONE}")
    out = await runner.response(body)
    assert out is not None
    assert (
        out["choices"][0]["message"]["content"]
        == "write to [REDACTED:email] or call [REDACTED:phone]"
    )
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"] == body["usage"]
    assert body["choices"][0]["message"]["content"].startswith("write to jane")
    assert ctx.require(FILTER).count(action="completion_redact") == 2


async def test_response_is_cut_with_a_content_filter_finish() -> None:
    plugin = make(completion_action="stop")
    runner = await start(plugin, stream=False)
    out = await runner.response(openai_completion(f"the key: {KEY}. done"))
    assert out is not None
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "the key: "}
    assert choice["finish_reason"] == "content_filter"


async def test_response_without_matches_is_left_alone() -> None:
    plugin = make()
    runner = await start(plugin, stream=False)
    answer = openai_completion("nothing to see")
    assert await runner.response(answer) is answer
    listing = {"object": "list", "data": []}
    assert await runner.response(listing) is listing
    off = await start(make(completion_action="off"), stream=False)
    keyed = openai_completion(KEY)
    assert await off.response(keyed) is keyed


async def test_completions_response_text_is_redacted() -> None:
    plugin = make(rules=WORD_RULES)
    runner = await start(plugin, endpoint=Endpoint.COMPLETIONS, stream=False)
    body = {
        "object": "text_completion",
        "choices": [{"index": 0, "text": "foo!", "finish_reason": "stop"}],
    }
    out = await runner.response(body)
    assert out is not None
    assert out["choices"][0]["text"] == "[REDACTED:banned]!"


# ----- cost ---------------------------------------------------------------------------------------


async def test_per_event_cost_stays_small() -> None:
    """A loose bound only (the measured figures are in the module docstring)."""
    plugin = make()
    ctx = (await start(plugin)).ctx
    raws = [orjson.dumps(openai_chunk(w)) for w in (" world", " and", " the", " quick")] * 500
    events = iter([SSEEvent(raw) for raw in raws])
    seconds = timeit.timeit(lambda: plugin.on_event(ctx, next(events)), number=len(raws))
    assert seconds / len(raws) < 1e-3
    # each one-word event waits whole (its space with it) until the next word came
    assert ctx.require(FILTER).held_max <= len(" quick")
