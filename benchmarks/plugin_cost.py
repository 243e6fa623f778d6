"""Per-event cost of each built-in plugin, in process: `python -m benchmarks.plugin_cost`.

Each plugin is built with its default options (the content filter with its default
detectors, the access log writing to /dev/null), given one chat request, then fed freshly
decoded OpenAI chunk events (so JSON parsing, which the first plugin to look pays, is
included), the way the proxy's chain calls `on_event`. Reports µs per event, median of
several rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import orjson

from gateway.chain import build_chain, discover_plugins
from gateway.config import PluginConfig, RouteConfig
from gateway.context import Endpoint, RequestContext
from gateway.sse import SSEDecoder
from gateway.testing.fake_upstream import openai_chunk, sse

PLUGINS: dict[str, dict[str, Any]] = {
    "latency": {},
    "token_count": {},
    "content_filter": {},
    "access_log": {"stream": "/dev/null"},
    "access_log (log_completions)": {"stream": "/dev/null", "log_completions": True},
}
_WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]


def _events(count: int) -> bytes:
    return b"".join(
        sse(openai_chunk(_WORDS[i % len(_WORDS)], model="gpt-4o")) for i in range(count)
    )


async def _measure(name: str, options: dict[str, Any], events: int, rounds: int) -> float:
    plugin = name.split(" ")[0]
    chain = build_chain(
        [("plugins[0]", PluginConfig(name=plugin, options=options))], discover_plugins()
    )
    payload = _events(events)
    samples = []
    for _ in range(rounds):
        ctx = RequestContext("bench", Endpoint.CHAT)
        ctx.body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        ctx.model = "gpt-4o"
        ctx.stream = True
        ctx.route = RouteConfig(model="gpt-4o", upstream="u")
        await chain.run_request(ctx)
        batch = SSEDecoder().feed(payload)  # fresh events: no cached JSON
        started = time.perf_counter()
        for event in batch:
            chain.run_events(ctx, [event])
        samples.append((time.perf_counter() - started) / len(batch))
        await chain.run_end(ctx)
    return statistics.median(samples) * 1e6


async def _baseline(events: int, rounds: int) -> float:
    chain = build_chain([], {})
    payload = _events(events)
    samples = []
    for _ in range(rounds):
        ctx = RequestContext("bench", Endpoint.CHAT)
        batch = SSEDecoder().feed(payload)
        started = time.perf_counter()
        for event in batch:
            chain.run_events(ctx, [event])
        samples.append((time.perf_counter() - started) / len(batch))
    return statistics.median(samples) * 1e6


async def measure_all(events: int = 2000, rounds: int = 7) -> dict[str, float]:
    """µs per event for each plugin alone, minus the empty chain's cost."""
    base = await _baseline(events, rounds)
    out = {}
    for name, options in PLUGINS.items():
        out[name] = max(0.0, await _measure(name, options, events, rounds) - base)
    return out


def main() -> None:
    """Print (and optionally write as JSON) the per-event cost of each built-in plugin."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    costs = asyncio.run(measure_all(args.events))
    print(f"{'plugin':32} µs per event (on_event, one 1-token chunk)")
    for name, cost in costs.items():
        print(f"{name:32} {cost:8.2f}")
    if args.json:
        with open(args.json, "wb") as out:
            out.write(orjson.dumps(costs, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
