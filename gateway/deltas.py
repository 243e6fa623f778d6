"""Format-agnostic views of streamed text, for plugins that read or rewrite it.

Plugins see events in the client's wire format. These helpers find the generated text in
an event (per choice index), rebuild an event with replaced text, and build the final
"stopped" event, so a plugin works the same on every client format Sluice speaks.
Currently: OpenAI chat completions and completions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.context import Endpoint, RequestContext
from gateway.sse import SSEEvent


def _parsed(event: SSEEvent) -> dict[str, Any] | None:
    if event.data_bytes is None or event.is_done:
        return None
    try:
        obj = event.json()
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _choice_text(endpoint: Endpoint, choice: Mapping[str, Any]) -> str | None:
    if endpoint is Endpoint.CHAT:
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
    else:
        text = choice.get("text")
    return text if isinstance(text, str) else None


def event_texts(ctx: RequestContext, event: SSEEvent) -> dict[int, str]:
    """Generated text in `event` by choice index (empty if it carries none)."""
    obj = _parsed(event)
    if obj is None:
        return {}
    out: dict[int, str] = {}
    for choice in obj.get("choices") or ():
        if isinstance(choice, dict):
            text = _choice_text(ctx.endpoint, choice)
            if text:
                out[int(choice.get("index", 0))] = text
    return out


def finish_reasons(ctx: RequestContext, event: SSEEvent) -> dict[int, str]:
    """`finish_reason` per choice index for choices that finished in `event`."""
    obj = _parsed(event)
    if obj is None:
        return {}
    return {
        int(c.get("index", 0)): c["finish_reason"]
        for c in obj.get("choices") or ()
        if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)
    }


def with_texts(ctx: RequestContext, event: SSEEvent, texts: Mapping[int, str]) -> SSEEvent:
    """A copy of `event` whose text for each choice index in `texts` is replaced."""
    obj = _parsed(event)
    if obj is None:
        return event
    # Copy only the path that changes: the event's cached JSON must stay as it was.
    choices: list[Any] = []
    for choice in obj.get("choices") or ():
        index = int(choice.get("index", 0)) if isinstance(choice, dict) else -1
        if index not in texts:
            choices.append(choice)
            continue
        choice = dict(choice)
        if ctx.endpoint is Endpoint.CHAT:
            delta = choice.get("delta")
            choice["delta"] = {
                **(delta if isinstance(delta, dict) else {}),
                "content": texts[index],
            }
        else:
            choice["text"] = texts[index]
        choices.append(choice)
    return SSEEvent.from_json({**obj, "choices": choices}, event=event.event, id=event.id)


def text_event(
    ctx: RequestContext, template: SSEEvent, index: int, text: str, finish_reason: str | None = None
) -> SSEEvent:
    """A new event carrying `text` for one choice, shaped like `template` (same id, model)."""
    obj = _parsed(template) or {}
    base = {k: v for k, v in obj.items() if k in ("id", "object", "created", "model")}
    if ctx.endpoint is Endpoint.CHAT:
        choice: dict[str, Any] = {"index": index, "delta": {"content": text} if text else {}}
    else:
        choice = {"index": index, "text": text}
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason
    return SSEEvent.from_json({**base, "choices": [choice]})


def prompt_texts(endpoint: Endpoint, body: Mapping[str, Any]) -> list[str]:
    """Every piece of prompt text in a request body (messages' text parts, or the prompt)."""
    if endpoint is Endpoint.CHAT:
        out: list[str] = []
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                out.append(content)
            elif isinstance(content, list):
                out.extend(
                    part["text"]
                    for part in content
                    if isinstance(part, dict) and isinstance(part.get("text"), str)
                )
        return out
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        return [p for p in prompt if isinstance(p, str)]
    return []
