"""The translated Responses lane's per-request state: the turn, its store, its egress.

`Proxy` puts the store on the context (`STORE`) for requests to /v1/responses;
`prepare` (async, after authentication) resolves `previous_response_id` for the caller's
team and records the `Turn`; the dialect (`gateway.dialects.ResponsesDialect`) reads it to
translate the request, the stream and the non-streaming answer, and stores the result.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.context import RequestContext, StateKey
from gateway.errors import GatewayError
from gateway.protocols.responses.objects import Turn
from gateway.protocols.responses.request import input_items, missing_previous, validate_request
from gateway.protocols.responses.store import ResponseStore, StoredResponse
from gateway.protocols.responses.stream import ChatStreamToResponses
from gateway.protocols.responses.types import Response

log = logging.getLogger("sluice.responses")

STORE: StateKey[ResponseStore] = StateKey("responses.store")
"""The gateway's Response store, for requests to /v1/responses."""
TURN: StateKey[Turn] = StateKey("responses.turn")
"""The request's Turn, once `prepare` ran."""
EGRESS: StateKey[ChatStreamToResponses] = StateKey("responses.egress")
"""A streamed request's translator (its final error event needs its state)."""


def store_unavailable() -> GatewayError:
    """The 503 when the store cannot be read."""
    return GatewayError(
        503,
        "Stored responses cannot be read right now; retry shortly.",
        type="server_error",
        code="response_store_unavailable",
        headers={"Retry-After": "1"},
    )


def scope_of(ctx: RequestContext) -> str:
    """Whose stored responses a request may see: its team's."""
    return ctx.identity.team


async def load(store: ResponseStore, scope: str, response_id: str) -> StoredResponse | None:
    """`store.get`, with a store failure as a 503."""
    try:
        return await store.get(scope, response_id)
    except Exception as err:  # RedisError, OSError, TimeoutError
        log.warning("reading response %s failed: %s", response_id[:100], type(err).__name__)
        raise store_unavailable() from None


async def prepare(ctx: RequestContext, body: dict[str, Any]) -> Turn:
    """Check the request, load the conversation it continues, record its Turn."""
    validate_request(body)
    conversation = []
    previous = body.get("previous_response_id")
    if isinstance(previous, str) and previous:
        store = ctx.get(STORE)
        record = await load(store, scope_of(ctx), previous) if store is not None else None
        if record is None:
            raise missing_previous(previous)
        conversation = record.conversation()
    conversation += input_items(body)
    turn = Turn(model=body["model"], request=body, conversation=conversation)
    ctx.set(TURN, turn)
    return turn


def keep(ctx: RequestContext, response: Response) -> None:
    """Store a finished Response (unless the request said `store: false`)."""
    turn = ctx.require(TURN)
    store = ctx.get(STORE)
    if store is None or not turn.store:
        return
    store.put(StoredResponse(scope_of(ctx), response, turn.conversation))


def egress(ctx: RequestContext) -> ChatStreamToResponses:
    """A fresh stream translator for the request, remembered for its final error event."""
    translator = ChatStreamToResponses(
        ctx.require(TURN), on_done=lambda response: keep(ctx, response)
    )
    ctx.set(EGRESS, translator)
    return translator
