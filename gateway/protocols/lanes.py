"""Lanes: which way a request crosses the gateway, from the client's protocol and the
protocol its route's upstreams speak.

A lane is a pair (client wire, upstream wire) plus the `Dialect` for its edges:

====================  =================  ==========================================
client (endpoint)     upstream speaks    lane
====================  =================  ==========================================
openai (chat, ...)    anything           the core: the body as sent; adapters that
                                         speak something else translate themselves
anthropic (messages)  anthropic          native: body and events pass through
anthropic (messages)  anything else      translated: Messages -> chat at admission,
                                         chat chunks -> Messages events after the chain
responses             responses          native: body and events pass through (openai
                                         and azure upstreams with `responses_api:
                                         native`); the upstream keeps the state
responses             anything else      translated: Responses -> chat (the dialect's
                                         `admit`, with the stored conversation),
                                         chat chunks -> Responses events
====================  =================  ==========================================

The lane is chosen once per request, after routing: native when every deployment of the
route speaks the client's protocol (`Upstream.native`), so every attempt (retries, other
deployments) runs on the same lane and the chain sees one format throughout
(`RequestContext.wire`). A route mixing kinds runs translated.

Adding a protocol: a wire name in `gateway.protocols`, a
package beside `gateway.protocols.anthropic` (request checks, observer, errors, views), a
native `Dialect`, `native()` on the adapters that speak it, and one row per pair here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config import RouteConfig
from gateway.context import RequestContext
from gateway.dialects import DIALECTS, Dialect
from gateway.protocols import ANTHROPIC, OPENAI, RESPONSES
from gateway.protocols.anthropic.dialect import NativeAnthropic
from gateway.protocols.anthropic.request import check_request
from gateway.protocols.responses.native import NativeResponsesDialect
from gateway.upstreams.base import Upstream
from gateway.validation import validate_body

__all__ = ["Lane", "Lanes", "dialect_of"]


@dataclass(frozen=True, slots=True)
class Lane:
    """One (client protocol, upstream protocol) pair and the dialect for its edges."""

    client: str
    upstream: str
    dialect: Dialect

    @property
    def native(self) -> bool:
        """Same protocol on both sides: no translation anywhere."""
        return self.client == self.upstream

    @property
    def wire(self) -> str:
        """The format the chain sees: the client's on a native lane, else the core's."""
        return self.client if self.native else OPENAI


_LANES: dict[tuple[str, str], Lane] = {
    (OPENAI, OPENAI): Lane(OPENAI, OPENAI, DIALECTS["openai"]),
    (ANTHROPIC, ANTHROPIC): Lane(ANTHROPIC, ANTHROPIC, NativeAnthropic()),
    (ANTHROPIC, OPENAI): Lane(ANTHROPIC, OPENAI, DIALECTS["anthropic"]),
    (RESPONSES, RESPONSES): Lane(RESPONSES, RESPONSES, NativeResponsesDialect()),
    (RESPONSES, OPENAI): Lane(RESPONSES, OPENAI, DIALECTS["responses"]),
}


def dialect_of(ctx: RequestContext) -> Dialect:
    """The edges of `ctx`'s lane (before a lane was chosen: the client's translated one)."""
    return _LANES[(ctx.client_format, ctx.wire)].dialect


def check_client_body(ctx: RequestContext, body: dict[str, Any]) -> None:
    """What every lane of the client's protocol needs before routing (model, types)."""
    if ctx.client_format == ANTHROPIC:
        check_request(body)
    elif ctx.client_format == RESPONSES:
        return  # `validate_request` ran in the dialect's `prepare`
    else:
        validate_body(ctx.endpoint, body)


class Lanes:
    """Chooses a request's lane and the adapter view each attempt uses."""

    def __init__(self, upstreams: Mapping[str, Upstream]) -> None:
        self._upstreams = upstreams
        self._chosen: dict[tuple[str, str], Lane] = {}  # (client, route name) -> lane

    def choose(self, ctx: RequestContext, route: RouteConfig) -> Lane:
        """The lane for `ctx` on `route`; sets `ctx.wire`."""
        key = (ctx.client_format, route.name)
        lane = self._chosen.get(key)
        if lane is None:
            lane = self._chosen[key] = self._choose(ctx.client_format, route)
        ctx.wire = lane.wire
        return lane

    def _choose(self, client: str, route: RouteConfig) -> Lane:
        if client != OPENAI and all(
            self._upstreams[d.upstream].native(client) is not None for d in route.all_deployments
        ):
            return _LANES[(client, client)]
        return _LANES[(client, OPENAI)]

    def upstream(self, ctx: RequestContext, name: str) -> Upstream:
        """The adapter `name` as this request's lane speaks to it."""
        adapter = self._upstreams[name]
        if ctx.wire == OPENAI:
            return adapter
        native = adapter.native(ctx.wire)
        if native is None:  # the lane was chosen because every deployment speaks it
            raise RuntimeError(f"upstream {name!r} does not speak {ctx.wire!r}")
        return native
