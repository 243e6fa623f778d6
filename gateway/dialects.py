"""The client's wire format: how requests come in and how answers and errors go out.

Inside the gateway every request runs as an OpenAI chat or completions request, so the
plugin chain always sees OpenAI chunks. A dialect translates at the edges: the request on
the way in, and on the way out the stream (after the chain), the non-streaming body, and
errors (as JSON before headers, as the final event after).
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson
from aiohttp import web

from gateway.context import LOCAL_COUNT, Endpoint, RequestContext
from gateway.errors import GatewayError, bad_request
from gateway.protocols.responses import lane as responses_lane
from gateway.protocols.responses.request import responses_request_to_chat
from gateway.protocols.responses.unary import chat_response_to_response
from gateway.sse import SSEEvent
from gateway.translate.openai_anthropic import (
    ChatStreamToMessages,
    anthropic_error_body,
    chat_response_to_messages,
    error_event,
    messages_request_to_chat,
)
from gateway.validation import validate_body


class StreamEgress(Protocol):
    """Rewrites the chain's OpenAI events into the client's format, event by event.

    `error` is set once an event could not be translated (or carried an error); the relay
    then ends the stream with the dialect's final error event.
    """

    error: GatewayError | None

    def feed(self, event: SSEEvent) -> list[SSEEvent]:
        """Zero or more client events for one OpenAI event."""
        ...


class Dialect:
    """OpenAI's format: what the chain speaks, so nothing is translated."""

    name = "openai"

    async def prepare(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        """The client's body in the endpoint's format, once checks and look-ups that need
        I/O ran (after authentication, before the gateway validates and admits it)."""
        return body

    def admit(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        """The request body as the gateway runs it (an OpenAI request)."""
        return body

    def egress(self, ctx: RequestContext) -> StreamEgress | None:
        """A translator for a streamed answer, or None to send the chain's events as they are."""
        return None

    def final_error_event(self, ctx: RequestContext, err: GatewayError) -> SSEEvent | None:
        """The error event after headers, or None to use the upstream observer's."""
        return None

    def unary(self, ctx: RequestContext, payload: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming answer in the client's format."""
        return payload

    def error_response(self, ctx: RequestContext, err: GatewayError) -> web.Response:
        """An error before headers."""
        return err.to_response({"X-Request-Id": ctx.request_id, **ctx.response_headers})


class AnthropicDialect(Dialect):
    """Anthropic's Messages API (POST /v1/messages), for the Anthropic SDKs."""

    name = "anthropic"

    def admit(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        validate_body(ctx.endpoint, body)
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise bad_request(
                "`max_tokens` is required and must be a positive integer.", param="max_tokens"
            )
        ctx.endpoint = Endpoint.CHAT
        return messages_request_to_chat(body, body["model"])

    def egress(self, ctx: RequestContext) -> StreamEgress | None:
        # message_start's input_tokens: the local prompt count unless the upstream's first
        # chunk reports usage (a usage-less upstream's final count arrives as the local
        # usage chunk, see gateway.local_usage, and fills message_delta).
        local = ctx.get(LOCAL_COUNT)
        return ChatStreamToMessages(ctx.model, input_tokens=local.prompt_tokens if local else 0)

    def final_error_event(self, ctx: RequestContext, err: GatewayError) -> SSEEvent | None:
        return error_event(err, request_id=ctx.request_id)

    def unary(self, ctx: RequestContext, payload: dict[str, Any]) -> dict[str, Any]:
        return chat_response_to_messages(payload, ctx.model)

    def error_response(self, ctx: RequestContext, err: GatewayError) -> web.Response:
        return web.Response(
            status=err.status,
            body=orjson.dumps(anthropic_error_body(err, request_id=ctx.request_id)),
            content_type="application/json",
            headers={**err.headers, "X-Request-Id": ctx.request_id, **ctx.response_headers},
        )


class ResponsesDialect(Dialect):
    """OpenAI's Responses API (POST /v1/responses) translated to chat completions; the
    conversation state lives in the gateway (see gateway.protocols.responses.lane)."""

    name = "responses"

    async def prepare(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        await responses_lane.prepare(ctx, body)
        return body  # translated at `admit`, once the lane is known

    def admit(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        turn = responses_lane.translated_turn(ctx, body)
        chat = responses_request_to_chat(body, body["model"], turn.conversation)
        validate_body(Endpoint.CHAT, chat)
        return chat

    def egress(self, ctx: RequestContext) -> StreamEgress | None:
        return responses_lane.egress(ctx)

    def final_error_event(self, ctx: RequestContext, err: GatewayError) -> SSEEvent | None:
        translator = ctx.get(responses_lane.EGRESS)
        return translator.fail(err) if translator is not None else None

    def unary(self, ctx: RequestContext, payload: dict[str, Any]) -> dict[str, Any]:
        response = chat_response_to_response(payload, ctx.require(responses_lane.TURN))
        responses_lane.keep(ctx, response)
        return dict(response)


DIALECTS: dict[str, Dialect] = {
    "openai": Dialect(),
    "anthropic": AnthropicDialect(),
    "responses": ResponsesDialect(),
}
