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
``regex`` its ``max_match_chars``; the default rule set's window is 203 characters. Only text
that can still become a match of an enabled rule is held (each detector's exact set of match
prefixes, built by ``prefixes``), so per detector the held tail of a choice's text is:

- ``email``: the trailing run of local-part characters (letters, digits, ``._%+-``), then the
  address so far once an ``@`` follows: in practice the last word (any word may begin an
  address, so with ``email`` on a stream's first token waits for the next one when it ends
  in a word character: one upstream inter-token gap, the price of the guarantee);
- ``phone``: a trailing ``+``, ``(`` or digit group only while it can still become one of the
  forms above (``"555-123"`` is held, ``"42 "`` and ``"2026 "`` are not);
- ``credit_card``: trailing digits (with spaces or dashes) that can still become 4-4-4-4,
  4-6-5 or 13-19 digits (``"2026 "`` is held, ``"42 "`` is not);
- ``api_key``: a trailing prefix of a key marker after a non-alphanumeric (``s``, ``sk-...``,
  ``A``, ``AKIA...``, ``gh...``, ``x``, ``xox...``, ``AIza...``, ``-----BEGIN ...``);
- ``words``: a trailing prefix of a word; ``regex``: always its last ``max_match_chars``.

The worst case is the window, while a real candidate (``sk-...``, a long number) is pending
(~50 tokens for ``api_key``). Rule sets without ``email`` hold nothing for most words and
pass events unchanged at once.

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
config errors (the filter matches inside a sliding window); they are found in the parse tree
of CPython's regex parser, and when that analysis cannot run the rule is refused, never
accepted unchecked (``regex.RegexAnalysisError``). Matches are bounded: e-mail local
parts up to 64 characters, ``sk-`` keys up to 203 characters (a longer key is redacted up to
there), and for private keys only the ``-----BEGIN ... PRIVATE KEY-----`` header is detected
(use ``stop`` to cut the key off). ``phone`` knows international numbers written with a
``+`` country code (``+49 30 1234567``, ``+33 6 12 34 56 78``) and the North-American forms
(``(555) 123-4567``, ``555-123-4567``, ``+1 555 123 4567``); national formats of other
countries (``030 1234567``, ``06 12 34 56 78``) are not detected (any digit run could be
one): add a ``regex`` rule for the national formats you need. Run the plugin with
``fail: closed``: a filter that fails open lets the event through unfiltered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_args

from prometheus_client import Counter as PromCounter

from gateway.context import Endpoint, RequestContext
from gateway.deltas import prompt_texts
from gateway.plugin import Instrument, Plugin, PluginMetrics, Reject
from gateway.protocols import ANTHROPIC, RESPONSES
from plugins.content_filter.detectors import DETECTOR_MAX_CHARS, DetectorName, luhn_valid
from plugins.content_filter.options import ContentFilterOptions, Rule
from plugins.content_filter.scanner import GATE_CHARS, Scanner
from plugins.content_filter.state import _STREAM, _Stream
from plugins.content_filter.stats import _COUNTED, CONTENT_FILTER, FILTER, FilterAction, FilterStats
from plugins.content_filter.streaming import StreamFilter

__all__ = [
    "DETECTOR_MAX_CHARS",
    "FILTER",
    "GATE_CHARS",
    "ContentFilter",
    "ContentFilterOptions",
    "DetectorName",
    "FilterAction",
    "FilterStats",
    "Rule",
    "Scanner",
    "luhn_valid",
]

# ----- the plugin ---------------------------------------------------------------------------------


class ContentFilter(StreamFilter, Plugin[ContentFilterOptions]):
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
