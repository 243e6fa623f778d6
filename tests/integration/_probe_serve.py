"""`sluice serve` with a test-only side channel into the process (for leak tests).

    python -m tests.integration._probe_serve PORT_FILE [sluice arguments...]

runs `gateway.cli.main(sluice arguments)` unchanged, except that while `serve` runs it also
listens on a free loopback port (written to PORT_FILE) for one-line commands:

- `stats`: after a full garbage collection, one JSON line: the number of asyncio tasks
  and what they run, the live objects the collector tracks, by type, and the state of
  every in-memory rate limiter (concurrency slots held, leases not finished).
- `referrers TYPE`: for a few live objects of TYPE (`module.QualName`), a chain of what
  keeps each alive, to find the holder of something `stats` saw leak.

File descriptors and RSS need no side channel: the tests read them from /proc. The
gateway itself has no debug endpoint; this wrapper is how a test looks inside it.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

import orjson

from gateway import cli
from gateway.config import GatewayConfig
from plugins.rate_limit import MemoryRateLimiter


def _task_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", type(coro).__name__)


def _limiter_state(limiter: MemoryRateLimiter) -> dict[str, int]:
    # Private state, read on purpose: this is the leak check for the memory backend.
    slots = limiter._slots
    return {
        "slots_held": sum(len(held) for held in slots.values()),
        "leases_open": len(limiter._leases),
    }


def stats() -> dict[str, Any]:
    """What the `stats` command answers (see the module docstring)."""
    # `sluice serve` freezes its start-up objects (gc.freeze), which hides them from
    # gc.get_objects(): thaw everything to count it, then freeze it again.
    gc.unfreeze()
    gc.collect()
    objects = gc.get_objects()
    by_type: Counter[str] = Counter()
    limiters: list[dict[str, int]] = []
    for obj in objects:
        by_type[_type_name(obj)] += 1
        if isinstance(obj, MemoryRateLimiter):
            limiters.append(_limiter_state(obj))
    count = len(objects)
    del objects
    gc.freeze()
    tasks = asyncio.all_tasks()
    return {
        "tasks": len(tasks),
        "task_names": dict(Counter(_task_name(task) for task in tasks)),
        "objects": dict(by_type),
        "gc_objects": count,
        "rate_limiters": limiters,
    }


def _type_name(obj: object) -> str:
    cls = type(obj)
    module = getattr(cls, "__module__", None)  # a descriptor on a few C types
    return f"{module}.{cls.__qualname__}" if isinstance(module, str) else cls.__qualname__


def _describe(obj: object) -> str:
    name = _type_name(obj)
    if isinstance(obj, dict):
        return f"{name} keys={','.join(map(str, list(obj)[:6]))}"
    if isinstance(obj, types.FrameType):
        return f"{name} {obj.f_code.co_qualname}"
    if isinstance(obj, types.CellType | types.MethodType | types.FunctionType):
        return f"{name} {getattr(obj, '__qualname__', '')}"
    return name


def referrers(type_name: str, samples: int = 3, depth: int = 10) -> list[list[str]]:
    """For up to `samples` live objects of `type_name`, one chain of what keeps each alive
    (each step a referrer of the one before), to find who holds what `stats` saw leak."""
    gc.collect()
    here = sys._getframe()
    mine: set[int] = {id(here)}
    found = [obj for obj in gc.get_objects() if _type_name(obj) == type_name][:samples]
    mine.add(id(found))
    chains: list[list[str]] = []
    for obj in found:
        chain = [_describe(obj)]
        current: object = obj
        visited = {id(obj)}
        for _ in range(depth):
            holders = [
                ref
                for ref in gc.get_referrers(current)
                if id(ref) not in mine and id(ref) not in visited
            ]
            if not holders:
                chain.append("(nothing gc-tracked: a C-level or root reference)")
                break
            current = holders[0]
            visited.add(id(current))
            chain.append(f"{_describe(current)} (+{len(holders) - 1} more)")
            del holders
        chains.append(chain)
    return chains


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            command = line.strip().decode()
            if command == "stats":
                reply: Any = stats()
            elif command.startswith("referrers "):
                reply = referrers(command.split(" ", 1)[1])
            else:
                reply = {"error": f"unknown {command!r}"}
            writer.write(orjson.dumps(reply) + b"\n")
            await writer.drain()
    finally:
        writer.close()


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def main(argv: list[str]) -> int:
    """Run `sluice` with `argv[1:]`, the side channel's port going to the file `argv[0]`."""
    port_file = Path(argv[0])
    original = cli.serve

    async def serve(config: GatewayConfig, host: str, port: int, **options: Any) -> None:
        server = await asyncio.start_server(_answer, "127.0.0.1", 0)
        _write(port_file, str(server.sockets[0].getsockname()[1]))
        try:
            await original(config, host, port, **options)
        finally:
            server.close()
            await server.wait_closed()

    with mock.patch.object(cli, "serve", serve):
        return cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
