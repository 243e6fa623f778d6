"""The HTTP side of the Responses API: routes, the store's lifetime, reads and deletes.

``POST /v1/responses`` is `Proxy.responses` (the request path every endpoint shares);
``GET /v1/responses/{id}`` returns a stored Response, ``GET .../input_items`` the items
the model saw for it (OpenAI's list shape, oldest first), ``DELETE`` forgets it. Each is
scoped to the caller's team: another team's id is 404, as an unknown id is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gateway.auth import KeyStore, key_from_headers
from gateway.errors import GatewayError
from gateway.protocols.responses.config import ResponsesConfig
from gateway.protocols.responses.forward import forward, gone, native_view, relayed
from gateway.protocols.responses.lane import load
from gateway.protocols.responses.store import ResponseStore, StoredResponse, build_store
from gateway.upstreams.base import Upstream

if TYPE_CHECKING:
    from gateway.proxy import Proxy

__all__ = ["add_routes"]

_MAX_ITEMS_PAGE = 100


def _not_found(response_id: str) -> GatewayError:
    return GatewayError(
        404,
        f"Response with id '{response_id[:100]}' not found.",
        param="response_id",
        code="response_not_found",
    )


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


class ResponsesEndpoints:
    """GET and DELETE on stored Responses; `keys` gives the current key store (None: no auth)."""

    def __init__(
        self,
        store: ResponseStore,
        keys: Callable[[], KeyStore | None],
        adapters: Callable[[], Mapping[str, Upstream]] = dict,
    ) -> None:
        self.store = store
        self._keys = keys
        self._adapters = adapters

    async def _held(
        self,
        request: web.Request,
        record: StoredResponse,
        method: str,
        path: str = "",
        params: Mapping[str, str] | None = None,
    ) -> web.Response:
        """`method` on the native upstream holding `record`'s Response."""
        assert record.upstream is not None
        view = native_view(self._adapters(), record.upstream)
        if view is None:
            raise gone(record.upstream)
        return relayed(*await forward(request, view, method, record.id, path, params))

    def _scope(self, request: web.Request) -> str:
        keys = self._keys()
        if keys is None:
            return "anonymous"
        return keys.authenticate(key_from_headers(request.headers)).identity().team

    async def get(self, request: web.Request) -> web.Response:
        """GET /v1/responses/{id}."""
        response_id = request.match_info["response_id"]
        try:
            record = await load(self.store, self._scope(request), response_id)
            if record is None:
                raise _not_found(response_id)
            if record.upstream is not None:
                return await self._held(request, record, "GET", params=request.query)
        except GatewayError as err:
            return err.to_response()
        return _json(record.response)

    async def input_items(self, request: web.Request) -> web.Response:
        """GET /v1/responses/{id}/input_items (`limit`, `order`, `after`, as OpenAI's)."""
        response_id = request.match_info["response_id"]
        try:
            record = await load(self.store, self._scope(request), response_id)
            if record is None:
                raise _not_found(response_id)
            if record.upstream is not None:
                return await self._held(
                    request, record, "GET", "/input_items", params=request.query
                )
        except GatewayError as err:
            return err.to_response()
        items = [
            {**item, "id": item.get("id") or f"item_{response_id}_{i}"}
            for i, item in enumerate(record.input)
        ]
        if request.query.get("order", "desc") != "asc":
            items.reverse()
        after = request.query.get("after")
        if after is not None:
            position = next((i for i, item in enumerate(items) if item["id"] == after), None)
            items = items[position + 1 :] if position is not None else []
        try:
            limit = max(1, min(_MAX_ITEMS_PAGE, int(request.query.get("limit", "20"))))
        except ValueError:
            limit = 20
        page = items[:limit]
        return _json(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > limit,
            }
        )

    async def delete(self, request: web.Request) -> web.Response:
        """DELETE /v1/responses/{id}."""
        response_id = request.match_info["response_id"]
        try:
            scope = self._scope(request)
            record = await load(self.store, scope, response_id)
            if record is not None and record.upstream is not None:
                answer = await self._held(request, record, "DELETE")
                await self.store.delete(scope, response_id)
                return answer
            if not await self.store.delete(scope, response_id):
                raise _not_found(response_id)
        except GatewayError as err:
            return err.to_response()
        return _json({"id": response_id, "object": "response.deleted", "deleted": True})


def add_routes(
    app: web.Application,
    proxy: Proxy,
    config: ResponsesConfig,
    keys: Callable[[], KeyStore | None],
) -> None:
    """Serve the Responses API on `app`, with the store `config` asks for (closed at
    shutdown)."""

    store = build_store(config)
    proxy.responses_store = store
    endpoints = ResponsesEndpoints(store, keys, lambda: proxy.runtime.upstreams)

    async def _store_lifetime(_app: web.Application) -> AsyncIterator[None]:
        yield
        await store.close()

    app.router.add_post("/v1/responses", proxy.responses)
    app.router.add_get("/v1/responses/{response_id}", endpoints.get)
    app.router.add_get("/v1/responses/{response_id}/input_items", endpoints.input_items)
    app.router.add_delete("/v1/responses/{response_id}", endpoints.delete)
    app.cleanup_ctx.append(_store_lifetime)
