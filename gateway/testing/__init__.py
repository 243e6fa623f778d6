"""Helpers for testing Sluice and its plugins, without mocks.

- `PluginRunner`: one plugin through the chain's real semantics, no server; context
  builders `request_context`, `chat_context`, `completion_context`.
- `FakeUpstream`: a loopback upstream replaying byte-exact streams (`Script`, `openai_stream`,
  `openai_chunk`, `openai_completion`, `sse`, `rechunk`, `json_script`).
- `run_gateway(config, registry=...)`: a real gateway on a free loopback port;
  `openai_route_config(base_url)` is the smallest config routing model `m` to an upstream.
"""

from gateway.testing.fake_upstream import (
    Exchange,
    FakeUpstream,
    Script,
    json_script,
    openai_chunk,
    openai_completion,
    openai_stream,
    rechunk,
    sse,
)
from gateway.testing.harness import RunningGateway, openai_route_config, run_gateway
from gateway.testing.plugin_runner import (
    PluginRunner,
    chat_context,
    completion_context,
    request_context,
)

__all__ = [
    "Exchange",
    "FakeUpstream",
    "PluginRunner",
    "RunningGateway",
    "Script",
    "chat_context",
    "completion_context",
    "json_script",
    "openai_chunk",
    "openai_completion",
    "openai_route_config",
    "openai_stream",
    "rechunk",
    "request_context",
    "run_gateway",
    "sse",
]
