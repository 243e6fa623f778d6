"""Assemble the aiohttp application from a validated config."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from gateway.auth import KeyStore
from gateway.chain import Chain, build_chain, discover_plugins
from gateway.config import (
    AnthropicUpstream,
    AzureUpstream,
    ConfigError,
    GatewayConfig,
    OllamaUpstream,
    OpenAIUpstream,
    PluginConfig,
    UpstreamConfig,
)
from gateway.cors import Cors
from gateway.count_tokens import CountTokens
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.playground import add_routes as add_playground_routes
from gateway.proxy import Proxy
from gateway.resume import Resumer
from gateway.routing import Router, UpstreamHealth
from gateway.serverlog import http_server_logger
from gateway.tracing_config import ConfigProblem, TracingSettings, resolve_tracing
from gateway.upstreams.anthropic import Anthropic
from gateway.upstreams.azure import AzureOpenAI
from gateway.upstreams.base import Upstream
from gateway.upstreams.demo import Demo
from gateway.upstreams.ollama import Ollama
from gateway.upstreams.openai import OpenAICompatible
from gateway.websocket import websocket_handler

log = logging.getLogger("sluice.app")


@dataclass
class GatewayState:
    """Everything the gateway holds for its lifetime; stored on the app under `STATE`."""

    config: GatewayConfig
    router: Router
    upstreams: dict[str, Upstream]
    health: dict[str, UpstreamHealth]
    keys: KeyStore | None
    chains: dict[str, Chain]
    default_chain: Chain
    metrics: GatewayMetrics
    ready: bool = False
    proxy: Proxy | None = None  # set by build_app
    resumer: Resumer | None = None  # set by build_app
    metrics_port: int | None = None  # the separate metrics listener's bound port, once started
    tracing: TracingSettings | None = None  # None: tracing off (OpenTelemetry never imported)
    extras: dict[str, Any] = field(default_factory=dict)


STATE = web.AppKey("sluice_state", GatewayState)


def build_upstream(name: str, config: UpstreamConfig) -> Upstream:
    """The adapter for one configured upstream."""
    if isinstance(config, OpenAIUpstream):
        return OpenAICompatible(name, config)
    if isinstance(config, AzureUpstream):
        return AzureOpenAI(name, config)
    if isinstance(config, AnthropicUpstream):
        return Anthropic(name, config)
    if isinstance(config, OllamaUpstream):
        return Ollama(name, config)
    return Demo(name, config)


def build_chains(
    config: GatewayConfig, registry: Mapping[str, type[Any]]
) -> tuple[dict[str, Chain], Chain]:
    """One chain per route (global plugins minus skipped ones, then its own), plus a global one."""
    global_specs = [(f"plugins[{i}]", spec) for i, spec in enumerate(config.plugins)]
    shared: dict[str, Any] = {}  # one instance per configured plugin, whatever the route
    chains: dict[str, Chain] = {}
    for r, route in enumerate(config.routes):
        specs: list[tuple[str, PluginConfig]] = [
            (where, spec) for where, spec in global_specs if spec.name not in route.skip_plugins
        ]
        specs += [(f"routes[{r}].plugins[{i}]", spec) for i, spec in enumerate(route.plugins)]
        chains[route.name] = build_chain(specs, registry, shared)
    return chains, build_chain(global_specs, registry, shared)


def build_state(
    config: GatewayConfig, registry: Mapping[str, type[Any]] | None = None
) -> GatewayState:
    """Validate plugin options and build every long-lived object; raises ConfigError."""
    registry = discover_plugins() if registry is None else registry
    chains, default_chain = build_chains(config, registry)
    upstreams = {name: build_upstream(name, up) for name, up in config.upstreams.items()}
    health = {name: UpstreamHealth.from_config(up) for name, up in config.upstreams.items()}
    keys = KeyStore(config.teams) if config.auth == "keys" else None
    router = Router(config, health)
    metrics = GatewayMetrics(config, [default_chain, *chains.values()], health)
    try:
        tracing = resolve_tracing(config.tracing, os.environ)
    except ConfigProblem as err:
        raise ConfigError(f"tracing: {err}") from None
    return GatewayState(
        config, router, upstreams, health, keys, chains, default_chain, metrics, tracing=tracing
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own HTTP errors (404, 405, 413) as OpenAI-shaped JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status
        )
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return GatewayError(exc.status, exc.reason, code=code, headers=allow).to_response()


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    data = [
        {"id": model, "object": "model", "created": 0, "owned_by": "sluice"}
        for model in state.router.models
    ]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )


async def _model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: one model (any name a route resolves, prefix routes too)."""
    model = request.match_info["model_id"]
    try:
        request.app[STATE].router.resolve(model)
    except GatewayError as err:
        return err.to_response()
    body = {"id": model, "object": "model", "created": 0, "owned_by": "sluice"}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready = request.app[STATE].ready
    return web.json_response({"ready": ready}, status=200 if ready else 503)


def _admin_allowed(request: web.Request, key: str | None) -> bool:
    if not key:
        return False
    auth = request.headers.get("Authorization", "")
    given = auth[7:] if auth.startswith("Bearer ") else request.headers.get("X-Admin-Key", "")
    return hmac.compare_digest(given.encode(), key.encode())


def _admin_refusal(request: web.Request) -> web.Response | None:
    """A 401 unless the request carries the admin key."""
    secret = request.app[STATE].config.server.admin_key
    if _admin_allowed(request, secret.get_secret_value() if secret else None):
        return None
    message = "Admin endpoints need the admin key (server.admin_key)."
    return GatewayError(401, message, code="admin_key_required").to_response()


async def _admin_upstreams(request: web.Request) -> web.Response:
    """Health, queue and load of every upstream (admin key required)."""
    state = request.app[STATE]
    if (refusal := _admin_refusal(request)) is not None:
        return refusal
    body = {
        name: {"kind": state.config.upstreams[name].kind, **health.snapshot()}
        for name, health in state.health.items()
    }
    return web.Response(body=orjson.dumps({"upstreams": body}), content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus exposition (text, or OpenMetrics when the scraper asks for it)."""
    state = request.app[STATE]
    if (
        state.config.server.metrics.require_admin_key
        and (refusal := _admin_refusal(request)) is not None
    ):
        return refusal
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


_LISTEN_HOST = web.AppKey("sluice_listen_host", str)


async def _metrics_listener(app: web.Application) -> Any:
    """`server.metrics.port` set: serve /metrics on its own listener, same host."""
    state = app[STATE]
    settings = state.config.server.metrics
    if not settings.enabled or settings.port is None:
        yield
        return
    metrics_app = web.Application()
    metrics_app[STATE] = state
    metrics_app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(metrics_app, access_log=None, logger=http_server_logger())
    await runner.setup()
    try:
        site = web.TCPSite(runner, app[_LISTEN_HOST], settings.port, reuse_address=True)
        await site.start()
        state.metrics_port = int(runner.addresses[0][1])
        yield
    finally:
        state.metrics_port = None
        await runner.cleanup()


async def _tracing(app: web.Application) -> Any:
    """Tracing on: the tracer provider for the app's lifetime, flushed at shutdown."""
    state = app[STATE]
    if state.tracing is None or state.proxy is None:
        yield
        return
    from gateway.tracing import Tracing  # only now: tracing off never loads OpenTelemetry

    tracing = Tracing(state.tracing, state.config)
    state.proxy.tracing = tracing
    try:
        yield
    finally:
        state.proxy.tracing = None
        # The export is a blocking HTTP call: off the loop, which may serve the collector.
        await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)


async def _lifecycle(app: web.Application) -> Any:
    state = app[STATE]
    for upstream in state.upstreams.values():
        await upstream.start()
    state.ready = True
    yield
    state.ready = False
    for upstream in state.upstreams.values():
        await upstream.close()
    await close_plugins([state.default_chain, *state.chains.values()])
    if state.resumer is not None:
        await state.resumer.close()


async def close_plugins(chains: list[Chain]) -> None:
    """Call `close()` once on every plugin instance that has one (backends, files)."""
    seen: set[int] = set()
    for chain in chains:
        for entry in chain.entries:
            closer = getattr(entry.plugin, "close", None)
            if closer is None or id(entry.plugin) in seen:
                continue
            seen.add(id(entry.plugin))
            try:
                result = closer()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("plugin %s failed to close", entry.name)


async def _not_ready_on_shutdown(app: web.Application) -> None:
    app[STATE].ready = False


def build_app(state: GatewayState, *, host: str | None = None) -> web.Application:
    """The aiohttp application: routes, middleware and lifecycle for `state`.

    `host` is the address the main listener binds (default `server.host`); a separate
    metrics listener binds the same one.
    """
    cors = Cors(state.config.server.cors) if state.config.server.cors.allow_origins else None
    app = web.Application(
        middlewares=[openai_errors] if cors is None else [cors.middleware, openai_errors],
        client_max_size=state.config.server.max_body_bytes,
    )
    if cors is not None:
        app.on_response_prepare.append(cors.on_response_prepare)
    app[STATE] = state
    app[_LISTEN_HOST] = state.config.server.host if host is None else host
    opt_in = any(route.resumable for route in state.config.routes)
    resumer = Resumer(state.config.resumable, state.keys, routes_opt_in=opt_in)
    state.resumer = resumer
    proxy = Proxy(
        state.config.server,
        state.router,
        state.upstreams,
        state.chains,
        state.default_chain,
        state.health,
        state.keys,
        metrics=state.metrics,
        resumer=resumer,
    )
    state.proxy = proxy
    app.router.add_post("/v1/chat/completions", proxy.chat)
    app.router.add_post("/v1/completions", proxy.completions)
    app.router.add_post("/v1/embeddings", proxy.embeddings)
    app.router.add_post("/v1/messages", proxy.messages)
    app.router.add_post("/v1/messages/count_tokens", CountTokens(proxy).handle)
    server = state.config.server
    ws = websocket_handler(proxy, server.max_body_bytes, server.cors.allow_origins)
    app.router.add_get("/v1/ws", ws)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model_id:.+}", _model)
    app.router.add_get("/v1/streams/{stream_id}", resumer.handle)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/admin/upstreams", _admin_upstreams)
    metrics = state.config.server.metrics
    if metrics.enabled and metrics.port is None:
        app.router.add_get("/metrics", _metrics)
    if state.config.server.playground:  # null (auto) is resolved by load_config
        add_playground_routes(app)
    app.cleanup_ctx.append(_tracing)  # first in, last out: spans of the last requests
    app.cleanup_ctx.append(_lifecycle)
    app.cleanup_ctx.append(_metrics_listener)
    app.on_shutdown.append(_not_ready_on_shutdown)
    return app
