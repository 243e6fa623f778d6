"""``POST /v1/messages/count_tokens``: Anthropic's token counting, on every kind of upstream.

On a route whose deployments all speak Anthropic Messages the request goes to the upstream
(its own ``/v1/messages/count_tokens``, the model replaced) and its answer comes back as
is. Other upstreams cannot count a Messages request, so the gateway answers from a local
counter: a plugin of the route that offers the `PromptCounter` service (``token_count``
does), with ``"x_sluice": {"estimate": true, ...}`` saying how it was counted. Without one
the answer is a 501. Errors are in Anthropic's shape.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import aiohttp
import orjson
from aiohttp import web

from gateway.auth import key_from_headers
from gateway.context import (
    Endpoint,
    LocalCount,
    RequestContext,
    request_id_from,
    upstream_request_id,
)
from gateway.errors import GatewayError, timeout_error, upstream_error
from gateway.headers import upstream_headers
from gateway.protocols import ANTHROPIC
from gateway.protocols.anthropic.errors import error_body
from gateway.protocols.anthropic.request import check_request
from gateway.protocols.anthropic.upstream import NativeMessages
from gateway.upstreams.base import UpstreamBroken
from gateway.validation import read_json_body

if TYPE_CHECKING:
    from gateway.proxy import Proxy
    from gateway.runtime import Runtime

__all__ = ["CountTokens", "PromptCounter"]

log = logging.getLogger("sluice.count_tokens")

_MAX_ANSWER = 1 << 20


@runtime_checkable
class PromptCounter(Protocol):
    """A plugin that can count a request's prompt without running it (a service the core
    finds on a route's chain, so it never imports a plugin)."""

    async def count_prompt(self, ctx: RequestContext) -> LocalCount:
        """The prompt tokens of `ctx.body`, a body in `ctx.wire`'s format."""
        ...


class CountTokens:
    """The handler; shares the proxy's keys, router, lanes and chains."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def handle(self, request: web.Request) -> web.Response:
        ctx = RequestContext(request_id_from(request.headers.get("X-Request-Id")), Endpoint.CHAT)
        ctx.client_format = ANTHROPIC
        try:
            return await self._count(request, ctx)
        except GatewayError as err:
            return web.Response(
                status=err.status,
                body=orjson.dumps(error_body(err, request_id=ctx.request_id)),
                content_type="application/json",
                headers={**err.headers, "X-Request-Id": ctx.request_id},
            )

    async def _count(self, request: web.Request, ctx: RequestContext) -> web.Response:
        generations = self.proxy.generations
        rt = generations.enter()  # one runtime for the whole request, whatever reloads
        try:
            return await self._count_on(rt, request, ctx)
        finally:
            generations.leave(rt)

    async def _count_on(
        self, rt: Runtime, request: web.Request, ctx: RequestContext
    ) -> web.Response:
        principal = None
        if rt.keys is not None:
            principal = rt.keys.authenticate(key_from_headers(request.headers))
            ctx.identity = principal.identity()
        body = await read_json_body(request, rt.config.server.max_body_bytes)
        check_request(body)
        ctx.model = body["model"]
        ctx.route = rt.router.resolve(ctx.model)
        if principal is not None and rt.keys is not None:
            rt.keys.authorize(principal, ctx.model, ctx.route)
        ctx.body = body
        lane = rt.lanes.choose(ctx, ctx.route)
        if lane.native:
            return await self._upstream(rt, request, ctx)
        return await self._local(rt, ctx)

    async def _upstream(
        self, rt: Runtime, request: web.Request, ctx: RequestContext
    ) -> web.Response:
        target = rt.router.targets(ctx.model)[0]
        upstream = rt.lanes.upstream(ctx, target.upstream)
        if not isinstance(upstream, NativeMessages):
            raise upstream_error("The upstream cannot count tokens.")
        body = {**ctx.body, "model": target.model}
        id_header = upstream.request_id_header
        upstream_id = upstream_request_id(ctx.request_id) if id_header else ""
        headers = upstream_headers(request.headers, upstream_id, id_header)
        limit = min(upstream.timeouts.first_byte, upstream.timeouts.total)
        try:
            async with asyncio.timeout(limit):
                call = await upstream.count_tokens(body, headers)
                try:
                    raw = await call.read_body(_MAX_ANSWER)
                finally:
                    call.abort()
        except TimeoutError:
            raise timeout_error("first_byte") from None
        except (aiohttp.ClientError, UpstreamBroken) as err:
            log.warning(
                "count_tokens on upstream %s failed (request %s): %s",
                upstream.name,
                ctx.request_id,
                type(err).__name__,
            )
            raise upstream_error(
                f"Upstream {upstream.name!r} failed while counting tokens: the connection broke."
            ) from None
        if call.status >= 400:
            raise upstream.map_status_error(call.status, raw)
        return web.Response(
            body=raw, content_type="application/json", headers={"X-Request-Id": ctx.request_id}
        )

    async def _local(self, rt: Runtime, ctx: RequestContext) -> web.Response:
        assert ctx.route is not None
        ctx.wire = ANTHROPIC  # the body to count is the client's Messages body
        chain = rt.chains[ctx.route.name]
        counter = next(
            (e.plugin for e in chain.entries if isinstance(e.plugin, PromptCounter)), None
        )
        if counter is None:
            raise GatewayError(
                501,
                "This route's upstream cannot count tokens and no local counter is enabled "
                "(enable the token_count plugin).",
                type="api_error",
                code="count_tokens_unavailable",
            )
        count = await counter.count_prompt(ctx)
        answer: dict[str, Any] = {
            "input_tokens": count.prompt_tokens,
            "x_sluice": {"estimate": not count.exact, "source": "local"},
        }
        encoding = getattr(count, "encoding", None)
        if isinstance(encoding, str):
            answer["x_sluice"]["encoding"] = encoding
        return web.Response(
            body=orjson.dumps(answer),
            content_type="application/json",
            headers={"X-Request-Id": ctx.request_id},
        )
