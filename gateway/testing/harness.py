"""Run a real gateway on a loopback port inside a test, from a config mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.app import GatewayState, build_app, build_state
from gateway.config import parse_config
from gateway.serverlog import http_server_logger


@dataclass
class RunningGateway:
    """A gateway listening on 127.0.0.1; `url` is its base, e.g. http://127.0.0.1:PORT."""

    url: str
    state: GatewayState
    runner: web.AppRunner

    @property
    def v1(self) -> str:
        """The OpenAI-compatible base URL (`{url}/v1`)."""
        return f"{self.url}/v1"


@asynccontextmanager
async def run_gateway(
    config: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    registry: Mapping[str, type[Any]] | None = None,
) -> AsyncIterator[RunningGateway]:
    """Start the gateway exactly as `sluice serve` does (handler cancellation on)."""
    state = build_state(parse_config(dict(config), env or {}), registry)
    runner = web.AppRunner(
        build_app(state), handler_cancellation=True, access_log=None, logger=http_server_logger()
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    try:
        yield RunningGateway(f"http://127.0.0.1:{port}", state, runner)
    finally:
        await runner.cleanup()


def openai_route_config(base_url: str, **upstream: Any) -> dict[str, Any]:
    """A minimal config: model `m` routed to an `openai` upstream `fake` at `base_url`."""
    return {
        "upstreams": {"fake": {"kind": "openai", "base_url": base_url, **upstream}},
        "routes": [{"model": "m", "upstream": "fake", "upstream_model": "gpt-test"}],
    }
