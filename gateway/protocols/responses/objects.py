"""The Response object and its usage, built from one request's settings (pure)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gateway.protocols.responses.types import (
    IncompleteDetails,
    Item,
    Response,
    ResponseError,
    Status,
    Usage,
)

__all__ = ["Turn", "new_id", "response_usage"]


def new_id(prefix: str) -> str:
    """A fresh id as OpenAI shapes them: ``resp_``, ``msg_``, ``fc_``, ``rs_`` + 48 hex."""
    return f"{prefix}_{uuid.uuid4().hex}{uuid.uuid4().hex[:16]}"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def response_usage(chat_usage: dict[str, Any]) -> Usage:
    """OpenAI chat usage as a Response's: cached and reasoning counts in their details."""
    prompt_details = chat_usage.get("prompt_tokens_details")
    prompt_details = prompt_details if isinstance(prompt_details, dict) else {}
    completion_details = chat_usage.get("completion_tokens_details")
    completion_details = completion_details if isinstance(completion_details, dict) else {}
    input_tokens = _int(chat_usage.get("prompt_tokens"))
    output_tokens = _int(chat_usage.get("completion_tokens"))
    total = chat_usage.get("total_tokens")
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {
            "cached_tokens": _int(prompt_details.get("cached_tokens")),
            "cache_write_tokens": _int(prompt_details.get("cache_creation_input_tokens")),
        },
        "output_tokens": output_tokens,
        "output_tokens_details": {
            "reasoning_tokens": _int(completion_details.get("reasoning_tokens"))
        },
        "total_tokens": _int(total) if isinstance(total, int) else input_tokens + output_tokens,
    }


@dataclass(slots=True)
class Turn:
    """One Responses request as the gateway answers it: the new response's id, the
    request's settings echoed in the Response object, and the conversation it continued
    (stored with the output when ``store`` is on)."""

    model: str
    request: dict[str, Any]
    conversation: list[Item] = field(default_factory=list)
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def store(self) -> bool:
        """Whether the gateway keeps this response (``store`` defaults to true)."""
        return self.request.get("store") is not False

    def response(
        self,
        status: Status,
        output: list[Item],
        *,
        usage: Usage | None = None,
        error: ResponseError | None = None,
        incomplete: IncompleteDetails | None = None,
    ) -> Response:
        """The Response object in ``status`` with ``output`` so far."""
        body = self.request
        text = body.get("text")
        reasoning = body.get("reasoning")
        metadata = body.get("metadata")
        instructions = body.get("instructions")
        max_output = body.get("max_output_tokens")
        previous = body.get("previous_response_id")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": output,
            "usage": usage,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": instructions if isinstance(instructions, str) else None,
            "max_output_tokens": max_output if isinstance(max_output, int) else None,
            "metadata": metadata if isinstance(metadata, dict) else {},
            "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "previous_response_id": previous if isinstance(previous, str) else None,
            "reasoning": reasoning if isinstance(reasoning, dict) else {},
            "store": self.store,
            "temperature": _number(body.get("temperature")),
            "text": text if isinstance(text, dict) else {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": list(body.get("tools") or []),
            "top_p": _number(body.get("top_p")),
            "truncation": "disabled",
        }


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def incomplete_details(finish_reason: str | None) -> IncompleteDetails | None:
    """Why a chat finish makes the Response ``incomplete`` (None: it completed)."""
    if finish_reason == "length":
        return {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return {"reason": "content_filter"}
    return None
