"""The translated Responses lane's per-request state: the turn, its store, its egress.

`Proxy` puts the store on the context (`STORE`) for requests to /v1/responses;
`prepare` (async, after authentication) resolves `previous_response_id` for the caller's
team and records the `Turn`; the dialect (`gateway.dialects.ResponsesDialect`) reads it to
translate the request, the stream and the non-streaming answer, and stores the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Previous:
    """The `previous_response_id` a request continues, as the store knows it: `record` is
    None for an id it does not hold (for this team)."""

    id: str
    record: StoredResponse | None

    @property
    def upstream(self) -> str | None:
        """The native upstream that holds it, if one does."""
        return self.record.upstream if self.record is not None else None


PREVIOUS: StateKey[Previous] = StateKey("responses.previous")
"""The request's `previous_response_id`, looked up by `prepare` (absent: none given)."""


async def prepare(ctx: RequestContext, body: dict[str, Any]) -> None:
    """Check what every Responses lane reads and look up `previous_response_id` for the
    caller's team (before routing: a native upstream holding it pins the request there)."""
    validate_request(body)
    previous = body.get("previous_response_id")
    if isinstance(previous, str) and previous:
        store = ctx.get(STORE)
        record = await load(store, scope_of(ctx), previous) if store is not None else None
        ctx.set(PREVIOUS, Previous(previous, record))


def translated_turn(ctx: RequestContext, body: dict[str, Any]) -> Turn:
    """The translated lane's Turn: the stored conversation it continues plus its input."""
    conversation = []
    previous = ctx.get(PREVIOUS)
    if previous is not None:
        if previous.record is None:
            raise missing_previous(previous.id)
        if previous.record.upstream is not None:
            raise GatewayError(
                400,
                f"Previous response '{previous.id[:100]}' is held by upstream "
                f"'{previous.record.upstream}', which this model's route does not reach "
                "natively; continue it with a model routed there.",
                param="previous_response_id",
                code="previous_response_elsewhere",
            )
        conversation = previous.record.conversation()
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
