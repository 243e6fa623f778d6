"""Per-event CPU of each lane's relay path, in process: `python -m benchmarks.lane_cost`.

What the pull loop does per upstream event, without sockets: decode the bytes, classify
them (the lane's observer), run the chain, translate for the client (translated lanes),
encode for the write. Lanes: OpenAI chat passthrough (an OpenAI upstream, OpenAI chunks),
native Anthropic (Anthropic events as Anthropic writes them), and Anthropic translated both
ways (an Anthropic client behind the chat core on an Anthropic upstream, the path native
replaced). Each with no plugins and with token_count + content_filter. One event per read
(a paced stream) and 16 per read. CPU µs per event (`time.process_time`), minimum of rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway.chain import Chain, build_chain, discover_plugins
from gateway.config import PluginConfig, RouteConfig, ServerConfig
from gateway.context import Endpoint, RequestContext
from gateway.dialects import DIALECTS
from gateway.protocols import ANTHROPIC
from gateway.protocols.anthropic.events import NativeObserver
from gateway.sse import SSEDecoder, SSEEvent
from gateway.testing.fake_upstream import openai_chunk, sse
from gateway.translate.anthropic_openai import MessagesStreamToChat
from gateway.upstreams.anthropic import AnthropicDecoder
from gateway.upstreams.base import StreamDecoder, StreamObserver
from gateway.upstreams.openai import OpenAIObserver
from gateway.upstreams.translated import TranslatedObserver

_WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]
ROUNDS = 7
PLUGINS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "no plugins": [],
    "token_count + content_filter": [("token_count", {}), ("content_filter", {})],
}


def _anthropic(word: str) -> bytes:
    payload = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": word},
    }
    return b"event: content_block_delta\ndata: " + orjson.dumps(payload) + b"\n\n"


def _openai_bytes(n: int) -> list[bytes]:
    return [sse(openai_chunk(_WORDS[i % len(_WORDS)], model="gpt-4o")) for i in range(n)]


def _anthropic_bytes(n: int) -> list[bytes]:
    return [_anthropic(_WORDS[i % len(_WORDS)]) for i in range(n)]


Parts = Callable[[RequestContext], tuple[StreamDecoder, StreamObserver, Any]]


def _openai_parts(ctx: RequestContext) -> tuple[StreamDecoder, StreamObserver, Any]:
    return SSEDecoder(), OpenAIObserver(), None


def _native_parts(ctx: RequestContext) -> tuple[StreamDecoder, StreamObserver, Any]:
    ctx.client_format = ctx.wire = ANTHROPIC
    return SSEDecoder(), NativeObserver(), None


def _translated_parts(ctx: RequestContext) -> tuple[StreamDecoder, StreamObserver, Any]:
    ctx.client_format = ANTHROPIC
    translator = MessagesStreamToChat(ctx.model, usage_at_start=True)
    decoder = AnthropicDecoder(translator, ServerConfig())
    # message_start first, so the translator and the egress are past their opening events
    decoder.feed(
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
        b'"usage":{"input_tokens":3,"output_tokens":1}}}\n\n'
    )
    return decoder, TranslatedObserver(translator), DIALECTS["anthropic"].egress(ctx)


LANES: dict[str, tuple[Parts, Callable[[int], list[bytes]]]] = {
    "openai chat passthrough": (_openai_parts, _openai_bytes),
    "anthropic native": (_native_parts, _anthropic_bytes),
    "anthropic translated (messages->chat->messages)": (_translated_parts, _anthropic_bytes),
}


def _context() -> RequestContext:
    ctx = RequestContext("bench", Endpoint.CHAT)
    ctx.body = {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]}
    ctx.model = "m"
    ctx.stream = True
    ctx.route = RouteConfig(model="m", upstream="u")
    return ctx


def _chain(plugins: list[tuple[str, dict[str, Any]]]) -> Chain:
    specs = [(f"plugins[{i}]", PluginConfig(name=n, options=o)) for i, (n, o) in enumerate(plugins)]
    return build_chain(specs, discover_plugins())


async def _measure(lane: str, plugins: str, events: int, batch: int) -> float:
    parts, make = LANES[lane]
    chain = _chain(PLUGINS[plugins])
    chunks = make(events)
    reads = [b"".join(chunks[i : i + batch]) for i in range(0, len(chunks), batch)]
    samples = []
    for _ in range(ROUNDS):
        ctx = _context()
        decoder, observer, egress = parts(ctx)
        await chain.run_request(ctx)
        started = time.process_time()
        for read in reads:
            batch_ = observer.classify(ctx, decoder.feed(read))
            out: list[SSEEvent] = batch_.events
            if chain.has_event_hooks:
                out = chain.run_events(ctx, out)
            if egress is not None:
                out = [e for event in out for e in egress.feed(event)]
            b"".join([event.encode() for event in out])
        samples.append((time.process_time() - started) / events)
        await chain.run_end(ctx)
    return min(samples)


async def measure_all(events: int, batch: int) -> dict[str, dict[str, dict[str, float]]]:
    """µs per event per lane and plugin set, one event per read and `batch` per read."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for lane in LANES:
        for plugins in PLUGINS:
            row = out.setdefault(lane, {}).setdefault(plugins, {})
            row["one"] = await _measure(lane, plugins, events, 1) * 1e6
            row["batch"] = await _measure(lane, plugins, events, batch) * 1e6
    return out


def main() -> None:
    """Print the table (and optionally write it as JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    costs = asyncio.run(measure_all(args.events, args.batch))
    print(f"{'CPU µs per event':50} {'plugins':30} {'1/read':>7} {args.batch:>4}/read")
    for lane, rows in costs.items():
        for plugins, cost in rows.items():
            print(f"{lane:50} {plugins:30} {cost['one']:7.2f} {cost['batch']:9.2f}")
    if args.json:
        with open(args.json, "wb") as out:
            out.write(orjson.dumps(costs, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
