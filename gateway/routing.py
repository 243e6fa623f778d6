"""Client-facing model names to routes."""

from __future__ import annotations

from gateway.config import GatewayConfig, RouteConfig
from gateway.errors import GatewayError


class Router:
    """Resolves the `model` a client sent to its configured route."""

    def __init__(self, config: GatewayConfig) -> None:
        self._routes = {route.model: route for route in config.routes}

    @property
    def models(self) -> list[str]:
        """Routed model names, in config order."""
        return list(self._routes)

    def resolve(self, model: str) -> RouteConfig:
        """The route for `model`; a 404 `model_not_found` error if there is none."""
        route = self._routes.get(model)
        if route is None:
            raise GatewayError(
                404,
                f"The model `{model[:200]}` does not exist or you do not have access to it.",
                code="model_not_found",
                param="model",
            )
        return route
