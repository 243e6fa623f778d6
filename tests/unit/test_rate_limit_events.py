"""The rate_limit plugin's per-event hook: between two debits it looks at nothing else.

In particular it does not ask `token_count` for the completion so far on every event,
which would tokenize each streamed piece on its own instead of in batches.
"""

from __future__ import annotations

from types import MappingProxyType

from gateway.auth import PRINCIPAL, Principal
from gateway.chain import build_chain
from gateway.config import PluginConfig
from gateway.context import Endpoint, RequestContext
from gateway.sse import SSEDecoder
from gateway.teams import LimitsConfig
from gateway.testing.fake_upstream import openai_chunk, sse
from plugins.rate_limit import RateLimit
from plugins.token_count import TOKENS, TokenCounter


async def test_streamed_text_is_not_tokenized_per_event_between_debits() -> None:
    chain = build_chain(
        [
            ("plugins[0]", PluginConfig(name="token_count", options={"default_encoding": None})),
            ("plugins[1]", PluginConfig(name="rate_limit")),
        ],
        {"token_count": TokenCounter, "rate_limit": RateLimit},
    )
    limits = LimitsConfig(tokens_per_minute=10**6, concurrent_streams=10)
    body = {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ctx = RequestContext("req_test", Endpoint.CHAT, body=body, model="bench-model", stream=True)
    ctx.set(
        PRINCIPAL,
        Principal("ml", "ml/ci", 1.0, limits, None, MappingProxyType({}), None),
    )
    await chain.run_request(ctx)
    assert not chain.errors
    tokens = ctx.require(TOKENS)
    for word in ["Hello", " there", " and", " welcome"]:
        chain.run_events(ctx, SSEDecoder().feed(sse(openai_chunk(word))))
    assert not chain.errors
    assert tokens._pending  # still gathered: tokenized later with its neighbours
    assert tokens.completion_tokens > 0  # and counted when asked (the character heuristic)
    await chain.run_end(ctx)
