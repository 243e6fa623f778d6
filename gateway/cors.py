"""CORS for browser clients: off unless `server.cors.allow_origins` names origins.

Two pieces, registered by `build_app` only when CORS is on:

- a middleware that answers preflights (`OPTIONS` with `Access-Control-Request-Method`)
  from allowed origins with 204 and the allowed methods, headers and max-age; a preflight
  asking for a method or header that is not allowed gets a 403 JSON error without the
  allow-method/allow-headers grant (so the browser refuses, and devtools show why); other
  origins fall through to normal routing, which answers as it would without CORS;
- an `on_response_prepare` hook that adds `Access-Control-Allow-Origin` (and the exposed
  headers, and credentials if configured) to every response for an allowed origin. It runs
  just before headers are sent, so streamed responses and errors get it too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from gateway.config import CorsConfig
from gateway.errors import GatewayError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Cors:
    """The CORS policy of one gateway, from `server.cors`."""

    def __init__(self, config: CorsConfig) -> None:
        self.any_origin = "*" in config.allow_origins
        self.origins = frozenset(o for o in config.allow_origins if o != "*")
        self.methods = [m.upper() for m in config.allow_methods]
        self.any_header = "*" in config.allow_headers
        self.headers = [h for h in config.allow_headers if h != "*"]
        self._headers_lower = frozenset(h.lower() for h in self.headers)
        self.expose = ", ".join(config.expose_headers)
        self.credentials = config.allow_credentials
        self.max_age = str(config.max_age)

    def allowed(self, origin: str | None) -> bool:
        """Whether `origin` may read responses."""
        return origin is not None and (self.any_origin or origin in self.origins)

    def _allow_origin(self, origin: str) -> str:
        # With credentials the origin is echoed (a literal `*` would be refused by browsers);
        # the config never combines the two.
        return "*" if self.any_origin and not self.credentials else origin

    def _vary(self, response: web.StreamResponse) -> None:
        if self.any_origin and not self.credentials:
            return  # the answer does not depend on the origin
        vary = response.headers.get(hdrs.VARY, "")
        if "origin" not in vary.lower():
            response.headers[hdrs.VARY] = f"{vary}, Origin" if vary else "Origin"

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Add the CORS response headers for an allowed origin (every response, streams too)."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return
        self._vary(response)
        if not self.allowed(origin):
            return
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = self._allow_origin(origin)
        if self.credentials:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
        if self.expose and request.method != hdrs.METH_OPTIONS:
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = self.expose

    def _refusal(self, method: str, asked: list[str]) -> str | None:
        if method.upper() not in self.methods:
            return f"method {method[:32]!r} is not allowed"
        if not self.any_header:
            refused = [h for h in asked if h.lower() not in self._headers_lower]
            if refused:
                return f"header {refused[0][:64]!r} is not allowed"
        return None

    def preflight(self, request: web.Request) -> web.Response:
        """The answer to a preflight from an allowed origin."""
        method = request.headers[hdrs.ACCESS_CONTROL_REQUEST_METHOD]
        raw = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
        asked = [h.strip() for h in raw.split(",") if h.strip()]
        problem = self._refusal(method, asked)
        if problem is not None:
            return GatewayError(
                403, f"CORS preflight refused: {problem}.", code="cors_not_allowed"
            ).to_response()
        allow_headers = ", ".join(asked) if self.any_header else ", ".join(self.headers)
        return web.Response(
            status=204,
            headers={
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: ", ".join(self.methods),
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: allow_headers,
                hdrs.ACCESS_CONTROL_MAX_AGE: self.max_age,
            },
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer preflights from allowed origins; everything else goes on unchanged."""
        if (
            request.method == hdrs.METH_OPTIONS
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
            and self.allowed(request.headers.get(hdrs.ORIGIN))
        ):
            return self.preflight(request)
        return await handler(request)
