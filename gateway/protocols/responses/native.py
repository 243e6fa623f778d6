"""The native Responses lane: the client's body and the upstream's events pass through.

The upstream keeps the conversation state; the gateway only remembers which upstream
answered each Response (a pointer record in the Response store, with the store's
retention and team scope), so that:

- a request whose ``previous_response_id`` a native upstream holds is pinned to that
  upstream (`pinned`: the route's other deployments are not tried, they do not have it);
- ``GET`` / ``DELETE /v1/responses/{id}`` of such an id go to that upstream
  (`gateway.protocols.responses.http`).

A request with ``store: false`` leaves nothing to remember.
"""

from __future__ import annotations

from typing import Any, cast

from gateway.context import RequestContext
from gateway.dialects import Dialect, StreamEgress
from gateway.errors import GatewayError
from gateway.protocols.responses.lane import PREVIOUS, STORE, scope_of
from gateway.protocols.responses.store import StoredResponse
from gateway.protocols.responses.types import Response
from gateway.routing import Target
from gateway.sse import SSEEvent

__all__ = ["NativeResponsesDialect", "pinned", "remember"]


def remember(ctx: RequestContext, response_id: str, upstream: str) -> None:
    """Record that `upstream` holds `response_id` (unless the request said `store: false`)."""
    store = ctx.get(STORE)
    if store is None or ctx.body.get("store") is False:
        return
    pointer = cast(Response, {"id": response_id, "object": "response"})
    store.put(StoredResponse(scope_of(ctx), pointer, [], upstream=upstream))


def pinned(ctx: RequestContext, targets: list[Target]) -> list[Target]:
    """`targets`, only those of the upstream holding the request's previous response when
    a native one does (the lane checked that the route has it)."""
    previous = ctx.get(PREVIOUS)
    held = previous.upstream if previous is not None else None
    if held is None:
        return targets
    return [target for target in targets if target.upstream == held] or targets


class NativeResponsesDialect(Dialect):
    """A Responses client on a Responses upstream: nothing translated, nothing stored but
    the pointer; errors before headers are OpenAI's JSON (the Responses API's own)."""

    name = "responses"

    def admit(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        previous, route = ctx.get(PREVIOUS), ctx.route
        held = previous.upstream if previous is not None else None
        if (
            previous is not None
            and held is not None
            and route is not None
            and all(d.upstream != held for d in route.all_deployments)
        ):
            raise GatewayError(
                400,
                f"Previous response '{previous.id[:100]}' is held by upstream '{held}', "
                f"which the route of model '{ctx.model[:100]}' does not use.",
                param="previous_response_id",
                code="previous_response_elsewhere",
            )
        return body  # the upstream judges everything the gateway does not read

    def egress(self, ctx: RequestContext) -> StreamEgress | None:
        return None

    def final_error_event(self, ctx: RequestContext, err: GatewayError) -> SSEEvent | None:
        return None  # the observer's: the upstream's own event, or one shaped like it

    def unary(self, ctx: RequestContext, payload: dict[str, Any]) -> dict[str, Any]:
        return payload
