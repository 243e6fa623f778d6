"""The usage chunk a client asked for when its upstream sent none: made from the local count.

A client that sets ``stream_options.include_usage`` expects a last chunk with
``"choices": []`` and ``usage`` before ``[DONE]``. Some servers ignore the option
(llama-cpp-python); then, if a plugin published a local count under ``LOCAL_COUNT`` (the
``token_count`` plugin does), the gateway sends that chunk itself, shaped exactly like
OpenAI's, plus an ``x_sluice`` field saying where the numbers come from::

    {"id": ..., "object": "chat.completion.chunk", "created": ..., "model": ...,
     "choices": [], "usage": {"prompt_tokens": N, "completion_tokens": M, "total_tokens": N+M},
     "x_sluice": {"usage_source": "local", "usage_exact": false}}

``usage_source`` is ``local`` (``local_partial`` when a plugin ended the stream early with a
non-completed outcome) as in the access log; ``usage_exact`` is the count's ``exact``. Without
a local count nothing is sent: the gateway does not make numbers up.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from gateway.context import LOCAL_COUNT, Endpoint, Outcome, RequestContext
from gateway.sse import SSEEvent


def local_usage_event(ctx: RequestContext, last_chunk: Any) -> SSEEvent | None:
    """The usage-only chunk from `ctx`'s local count, enveloped like `last_chunk`; None if
    nothing was counted."""
    count = ctx.get(LOCAL_COUNT)
    if count is None:
        return None
    prompt, completion = count.prompt_tokens, count.completion_tokens
    last = last_chunk if isinstance(last_chunk, dict) else {}
    chat = ctx.endpoint is Endpoint.CHAT
    kind = "chat.completion.chunk" if chat else "text_completion"
    chunk: dict[str, Any] = {
        "id": _str(last.get("id")) or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": _str(last.get("object")) or kind,
        "created": _int(last.get("created")) or int(time.time()),
        "model": _str(last.get("model")) or ctx.model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "x_sluice": {
            "usage_source": "local"
            if ctx.outcome in (None, Outcome.COMPLETED)
            else "local_partial",
            "usage_exact": count.exact,
        },
    }
    return SSEEvent.from_json(chunk)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
