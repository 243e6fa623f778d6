"""What a request's prompt is made of: pieces of text to tokenize and fixed costs."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.sse import SSEEvent
from plugins.token_count.counts import Count

log = logging.getLogger("sluice.plugins.token_count")


# ----- what a request's prompt is made of -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Counter:
    encoding: str  # reported name
    exact: bool  # the model's own tokenizer
    count: Count


@dataclass(slots=True)
class _Prompt:
    """Pieces of prompt text to tokenize, plus tokens known without tokenizing."""

    texts: list[str] = field(default_factory=list)
    fixed: int = 0
    estimated: list[str] = field(default_factory=list)

    def estimate(self, part: str) -> None:
        if part not in self.estimated:
            self.estimated.append(part)

    def add_json(self, part: str, value: Any) -> None:
        self.texts.append(orjson.dumps(value).decode())
        self.estimate(part)


TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
LOW_DETAIL_IMAGE_TOKENS = 85


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)


def _add_inputs(prompt: _Prompt, value: Any) -> None:
    """A completions `prompt` / embeddings `input`: text, texts, token ids, or lists of ids."""
    if isinstance(value, str):
        prompt.texts.append(value)
    elif _token_ids(value):
        prompt.fixed += len(value)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                prompt.texts.append(item)
            elif _token_ids(item):
                prompt.fixed += len(item)


def _sum_counts(count: Count, texts: Iterable[str]) -> int:
    return sum(map(count, texts))


def _message_extras(message: Mapping[str, Any], texts: list[str]) -> bool:
    """Add a message's or delta's reasoning text and tool-call names/arguments to `texts`;
    True if it had tool calls (their framing tokens are not counted: an estimate)."""
    for key in ("reasoning_content", "reasoning"):
        if isinstance(message.get(key), str):
            texts.append(message[key])
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return False
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            texts.extend(v for k in ("name", "arguments") if isinstance(v := function.get(k), str))
    return True


def _json_of(event: SSEEvent) -> Any:
    try:
        return event.json()
    except ValueError:
        return None
