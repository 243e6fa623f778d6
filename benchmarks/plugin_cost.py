"""Per-event cost of each built-in plugin, in process: `python -m benchmarks.plugin_cost`.

Each plugin is built with its default options (the content filter with its default
detectors, the access log writing to /dev/null), given one chat request, then fed freshly
decoded OpenAI chunk events (so reading an event's text, which the first plugin to look
pays, is included) through the chain, the way the proxy calls it: one event per call (an
upstream read per token, as in a paced stream) and in batches of `--batch` events (several
events per read, as under load). Also the whole chain with every plugin (`all`). Reports CPU
µs per event (`time.process_time`, so other processes on the machine do not count), the
minimum over several rounds, minus the cost of an empty chain.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson

from gateway.chain import build_chain, discover_plugins
from gateway.config import PluginConfig, RouteConfig
from gateway.context import Endpoint, RequestContext
from gateway.sse import SSEDecoder
from gateway.testing.fake_upstream import openai_chunk, sse

PLUGINS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "latency": [("latency", {})],
    "token_count": [("token_count", {})],
    "content_filter": [("content_filter", {})],
    "content_filter (hold_whole_events: false)": [("content_filter", {"hold_whole_events": False})],
    "access_log": [("access_log", {"stream": "/dev/null"})],
    "access_log (log_completions)": [
        ("access_log", {"stream": "/dev/null", "log_completions": True})
    ],
    "all (the order of configs/all-plugins.yaml)": [
        ("token_count", {}),
        ("content_filter", {}),
        ("access_log", {"stream": "/dev/null"}),
        ("latency", {}),
    ],
}
_WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]


def _events(count: int) -> bytes:
    return b"".join(
        sse(openai_chunk(_WORDS[i % len(_WORDS)], model="gpt-4o")) for i in range(count)
    )


def _context() -> RequestContext:
    ctx = RequestContext("bench", Endpoint.CHAT)
    ctx.body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    ctx.model = "gpt-4o"
    ctx.stream = True
    ctx.route = RouteConfig(model="gpt-4o", upstream="u")
    return ctx


async def _measure(plugins: list[tuple[str, dict[str, Any]]], events: int, batch: int) -> float:
    """Minimum CPU seconds per event over several rounds."""
    chain = build_chain(
        [
            (f"plugins[{i}]", PluginConfig(name=name, options=options))
            for i, (name, options) in enumerate(plugins)
        ],
        discover_plugins(),
    )
    payload = _events(events)
    samples = []
    for _ in range(ROUNDS):
        ctx = _context()
        await chain.run_request(ctx)
        fresh = SSEDecoder().feed(payload)  # fresh events: nothing cached on them
        batches = [fresh[i : i + batch] for i in range(0, len(fresh), batch)]
        started = time.process_time()
        for part in batches:
            chain.run_events(ctx, part)
        chain.run_flush(ctx)
        samples.append((time.process_time() - started) / len(fresh))
        await chain.run_end(ctx)
    return min(samples)


ROUNDS = 9


async def measure_all(events: int = 4000, batch: int = 16) -> dict[str, dict[str, float]]:
    """µs per event for each plugin alone (and all together), minus the empty chain's cost,
    one event per call and in batches of `batch`."""
    out: dict[str, dict[str, float]] = {}
    for size, label in ((1, "one"), (batch, "batch")):
        base = await _measure([], events, size)
        for name, plugins in PLUGINS.items():
            cost = max(0.0, await _measure(plugins, events, size) - base) * 1e6
            out.setdefault(name, {})[label] = cost
    return out


def main() -> None:
    """Print (and optionally write as JSON) the per-event cost of each built-in plugin."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=16, help="events per call, second column")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    costs = asyncio.run(measure_all(args.events, args.batch))
    print(f"{'CPU µs per event (chain.run_events)':44} {'1 per call':>10} {args.batch:>4} per call")
    for name, cost in costs.items():
        print(f"{name:44} {cost['one']:10.2f} {cost['batch']:13.2f}")
    if args.json:
        with open(args.json, "wb") as out:
            out.write(orjson.dumps(costs, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
