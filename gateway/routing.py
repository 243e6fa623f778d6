"""Client-facing model names to routes, and a route to the deployments to try, in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.balancer import Balancer, CircuitBreaker, ConcurrencyGate
from gateway.config import DeploymentConfig, GatewayConfig, RouteConfig, UpstreamConfig
from gateway.errors import GatewayError


@dataclass
class UpstreamHealth:
    """Per-upstream runtime state shared by all routes: passive health, queue, load."""

    breaker: CircuitBreaker
    gate: ConcurrencyGate | None
    outstanding: int = 0
    failures: int = 0
    successes: int = 0

    @classmethod
    def from_config(cls, config: UpstreamConfig) -> UpstreamHealth:
        """Breaker and (if `max_concurrent` is set) queue from the upstream's settings."""
        gate = None
        if config.max_concurrent is not None:
            gate = ConcurrencyGate(config.max_concurrent, config.max_queue, config.queue_timeout)
        return cls(CircuitBreaker(config.failure_threshold, config.cooldown_seconds), gate)

    def snapshot(self) -> dict[str, Any]:
        """For GET /admin/upstreams."""
        return {
            "breaker": self.breaker.snapshot(),
            "queue": self.gate.snapshot() if self.gate is not None else None,
            "outstanding": self.outstanding,
            "failures": self.failures,
            "successes": self.successes,
        }


@dataclass(frozen=True, slots=True)
class Target:
    """One deployment to try: an upstream and the model name it is sent."""

    upstream: str
    model: str


@dataclass
class _RouteState:
    route: RouteConfig
    balancer: Balancer
    names: list[str] = field(default_factory=list)
    # name -> deployment, built once: `RouteConfig.all_deployments` builds models per call
    deployments: dict[str, DeploymentConfig] = field(default_factory=dict)


class Router:
    """Resolves the `model` a client sent; orders a route's deployments per request."""

    def __init__(self, config: GatewayConfig, health: dict[str, UpstreamHealth]) -> None:
        self._health = health
        self._exact: dict[str, _RouteState] = {}
        self._prefixes: list[tuple[str, _RouteState]] = []
        self._listed: list[str] = []
        for route in config.routes:
            state = self._state(route)
            if route.model_prefix is not None:
                self._prefixes.append((route.model_prefix, state))
            else:
                for name in [route.name, *route.aliases]:
                    self._exact[name] = state
                    self._listed.append(name)
        self._prefixes.sort(key=lambda item: len(item[0]), reverse=True)

    def _state(self, route: RouteConfig) -> _RouteState:
        deployments = route.all_deployments
        names = [f"{i}:{d.upstream}" for i, d in enumerate(deployments)]
        by_name = {name: d.upstream for name, d in zip(names, deployments, strict=True)}
        balancer = Balancer(
            names,
            [d.weight for d in deployments],
            route.strategy,
            healthy=lambda name: self._health[by_name[name]].breaker.available,
            outstanding=lambda name: self._health[by_name[name]].outstanding,
        )
        return _RouteState(route, balancer, names, dict(zip(names, deployments, strict=True)))

    @property
    def models(self) -> list[str]:
        """Exact model names and aliases, in config order (prefix routes are not listed)."""
        return list(self._listed)

    def resolve(self, model: str) -> RouteConfig:
        """The route for `model`; a 404 `model_not_found` error if there is none."""
        return self._find(model).route

    def _find(self, model: str) -> _RouteState:
        state = self._exact.get(model)
        if state is not None:
            return state
        for prefix, candidate in self._prefixes:
            if model.startswith(prefix) and len(model) > len(prefix):
                return candidate
        raise GatewayError(
            404,
            f"The model `{model[:200]}` does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )

    def targets(self, model: str) -> list[Target]:
        """Deployments to try for `model`, in order (the balancer's pick first)."""
        state = self._find(model)
        route = state.route
        deployments = state.deployments
        fallback = model
        if route.model_prefix is not None and model.startswith(route.model_prefix):
            fallback = model[len(route.model_prefix) :]
        elif route.model is not None and model != route.model:
            fallback = route.model  # an alias: the route's own name is the default upstream model
        return [
            Target(deployments[name].upstream, deployments[name].upstream_model or fallback)
            for name in state.balancer.order()
        ]
