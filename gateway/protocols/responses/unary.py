"""A non-streaming ``chat.completion`` as a Response object (pure)."""

from __future__ import annotations

from typing import Any

from gateway.errors import upstream_error
from gateway.protocols.responses.objects import (
    Turn,
    incomplete_details,
    new_id,
    response_usage,
)
from gateway.protocols.responses.types import Item, Response
from gateway.upstreams.errors import error_from_event

__all__ = ["chat_response_to_response"]


def chat_response_to_response(body: dict[str, Any], turn: Turn) -> Response:
    """Choice 0 of ``body`` as ``turn``'s Response: reasoning (``reasoning_content`` or
    ``reasoning``) as a reasoning item with its summary, text (and refusal text) as a
    message, tool calls as function_call items; ``length`` / ``content_filter`` finishes
    make it ``incomplete``. An error body raises its GatewayError."""
    if "error" in body or body.get("object") == "error":
        raise error_from_event(body) or upstream_error("The upstream reported an error.")
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    choice = choice if isinstance(choice, dict) else {}
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    output: list[Item] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        output.append(
            {
                "type": "reasoning",
                "id": new_id("rs"),
                "summary": [{"type": "summary_text", "text": reasoning}],
            }
        )
    text = "".join(
        piece
        for piece in (message.get("content"), message.get("refusal"))
        if isinstance(piece, str)
    )
    if text:
        output.append(
            {
                "type": "message",
                "id": new_id("msg"),
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        )
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        call_id = call.get("id")
        arguments = fn.get("arguments")
        output.append(
            {
                "type": "function_call",
                "id": new_id("fc"),
                "call_id": call_id if isinstance(call_id, str) and call_id else new_id("call"),
                "name": str(fn.get("name") or ""),
                "arguments": arguments if isinstance(arguments, str) else "",
                "status": "completed",
            }
        )
    usage = body.get("usage")
    finish = choice.get("finish_reason")
    incomplete = incomplete_details(finish if isinstance(finish, str) else None)
    return turn.response(
        "incomplete" if incomplete is not None else "completed",
        output,
        usage=response_usage(usage if isinstance(usage, dict) else {}),
        incomplete=incomplete,
    )
