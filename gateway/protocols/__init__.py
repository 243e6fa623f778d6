"""One home per wire protocol, and the lanes that connect a client's protocol to an upstream's.

A *wire* names a protocol as it travels: the client's endpoint speaks one, each upstream
adapter speaks one or more. Same wire on both sides is a native lane (bodies and events
pass through, only what the gateway must observe is read); different wires go through a
translation (see `gateway.protocols.lanes` and docs/protocols.md).
"""

from __future__ import annotations

from typing import Final

OPENAI: Final = "openai"
"""OpenAI chat completions (and legacy completions, embeddings): the core's own format."""

ANTHROPIC: Final = "anthropic"
"""Anthropic Messages (``POST /v1/messages``)."""

RESPONSES: Final = "responses"
"""OpenAI's Responses API (``POST /v1/responses``): native to upstreams that speak it,
translated to chat completions for the rest."""

__all__ = ["ANTHROPIC", "OPENAI", "RESPONSES"]
