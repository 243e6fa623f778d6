"""Assemble the aiohttp application from a validated config."""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from gateway.auth import KeyStore, key_from_headers
from gateway.chain import Chain, discover_plugins
from gateway.config import ConfigError, GatewayConfig
from gateway.cors import Cors
from gateway.count_tokens import CountTokens
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.playground import add_routes as add_playground_routes
from gateway.protocols.responses.http import add_routes as add_responses_routes
from gateway.proxy import Proxy
from gateway.replay.cache import ReplayCache
from gateway.resume import Resumer
from gateway.routing import Router, UpstreamHealth
from gateway.runtime import (
    ConfigSource,
    Generations,
    ReloadOutcome,
    Runtime,
    build_runtime,
    chain_plugins,
    start_plugins,
)
from gateway.serverlog import http_server_logger
from gateway.tracing_config import ConfigProblem, TracingSettings, resolve_tracing
from gateway.upstreams.base import Upstream
from gateway.websocket import websocket_handler


@dataclass
class GatewayState:
    """Everything the gateway holds for its lifetime; stored on the app under `STATE`.

    What was built from the config lives in the current `Runtime` (`generations.current`),
    replaced as a whole by a reload; `config`, `router`, `keys`... read the current one.
    """

    generations: Generations
    metrics: GatewayMetrics
    proxy: Proxy
    resumer: Resumer
    ready: bool = False
    metrics_port: int | None = None  # the separate metrics listener's bound port, once started
    tracing: TracingSettings | None = None  # None: tracing off (OpenTelemetry never imported)
    last_reload: ReloadOutcome | None = None  # set by gateway.reload

    @property
    def runtime(self) -> Runtime:
        """The runtime new requests use."""
        return self.generations.current

    @property
    def config(self) -> GatewayConfig:
        """The running config."""
        return self.runtime.config

    @property
    def router(self) -> Router:
        """The current runtime's router."""
        return self.runtime.router

    @property
    def upstreams(self) -> dict[str, Upstream]:
        """The current runtime's upstream adapters."""
        return self.runtime.upstreams

    @property
    def health(self) -> dict[str, UpstreamHealth]:
        """The current runtime's upstream health."""
        return self.runtime.health

    @property
    def keys(self) -> KeyStore | None:
        """The current runtime's keys (None with `auth: none`)."""
        return self.runtime.keys

    @property
    def chains(self) -> dict[str, Chain]:
        """The current runtime's chain per route."""
        return self.runtime.chains

    @property
    def default_chain(self) -> Chain:
        """The current runtime's global chain."""
        return self.runtime.default_chain


STATE = web.AppKey("sluice_state", GatewayState)


def build_state(
    config: GatewayConfig,
    registry: Mapping[str, type[Any]] | None = None,
    *,
    source: ConfigSource | None = None,
) -> GatewayState:
    """Validate plugin options and build every long-lived object; raises ConfigError.

    `source` is where `config` came from (its file and sha256, shown on /admin/config);
    by default the config's own JSON stands in for the file's bytes.
    """
    registry = discover_plugins() if registry is None else registry
    if source is None:
        source = ConfigSource.of(None, config.model_dump_json().encode())
    try:
        tracing = resolve_tracing(config.tracing, os.environ)
    except ConfigProblem as err:
        raise ConfigError(f"tracing: {err}") from None
    runtime = build_runtime(config, registry, source)
    metrics = GatewayMetrics(config, runtime.all_chains, runtime.health)
    metrics.config_loaded(source.sha256)
    generations = Generations(runtime, metrics.detach)
    resumer = Resumer(config.resumable, runtime.keys, routes_opt_in=runtime.resumable_routes)
    proxy = Proxy(generations, metrics=metrics, resumer=resumer)
    proxy.replay = ReplayCache(config.replay, metrics)
    return GatewayState(generations, metrics, proxy, resumer, tracing=tracing)


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
    """GET /v1/models: the routed names; with keys, only for a key, and only what it may use
    (unless `server.public_models`)."""
    state = request.app[STATE]
    models = state.router.models
    if state.keys is not None and not state.config.server.public_models:
        try:
            principal = state.keys.authenticate(key_from_headers(request.headers))
        except GatewayError as err:
            return err.to_response()
        keys, router = state.keys, state.router
        models = [name for name in models if keys.allows(principal, name, router.resolve(name))]
    data = [
        {"id": model, "object": "model", "created": 0, "owned_by": "sluice"} for model in models
    ]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )


async def _model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: one model (any name a route resolves, prefix routes too); with
    keys, like the list: a key is needed and a model it may not use is not found."""
    model = request.match_info["model_id"]
    state = request.app[STATE]
    keys, router = state.keys, state.router
    try:
        route = router.resolve(model)
        if keys is not None and not state.config.server.public_models:
            principal = keys.authenticate(key_from_headers(request.headers))
            if not keys.allows(principal, model, route):
                raise GatewayError(
                    404,
                    f"The model `{model}` does not exist or you do not have access to it.",
                    type="invalid_request_error",
                    param="model",
                    code="model_not_found",
                )
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
    runtime = state.runtime
    body = {
        name: {"kind": runtime.config.upstreams[name].kind, **health.snapshot()}
        for name, health in runtime.health.items()
    }
    return web.Response(body=orjson.dumps({"upstreams": body}), content_type="application/json")


async def _admin_config(request: web.Request) -> web.Response:
    """The running config's file, sha256 and load time, and the last reload (admin key)."""
    state = request.app[STATE]
    if (refusal := _admin_refusal(request)) is not None:
        return refusal
    source = state.runtime.source
    last = state.last_reload
    body = {
        "source": source.name,
        "sha256": source.sha256,
        "loaded_at": source.loaded_at,
        "last_reload": None
        if last is None
        else {
            "result": last.result,
            "at": last.at,
            "message": last.message,
            "needs_restart": list(last.needs_restart),
        },
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


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
    if state.tracing is None:
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
    await start_plugins(chain_plugins(state.runtime.all_chains))  # e.g. connect to Redis
    state.ready = True
    yield
    state.ready = False
    await state.generations.close()
    await state.resumer.close()
    if state.proxy.replay is not None:
        await state.proxy.replay.close()


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
    proxy, resumer = state.proxy, state.resumer
    app.router.add_post("/v1/chat/completions", proxy.chat)
    app.router.add_post("/v1/completions", proxy.completions)
    app.router.add_post("/v1/embeddings", proxy.embeddings)
    app.router.add_post("/v1/messages", proxy.messages)
    app.router.add_post("/v1/messages/count_tokens", CountTokens(proxy).handle)
    add_responses_routes(app, proxy, state.config.responses, lambda: state.keys)
    server = state.config.server
    ws = websocket_handler(proxy, server.max_body_bytes, server.cors.allow_origins)
    app.router.add_get("/v1/ws", ws)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model_id:.+}", _model)
    app.router.add_get("/v1/streams/{stream_id}", resumer.handle)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/admin/upstreams", _admin_upstreams)
    app.router.add_get("/admin/config", _admin_config)
    metrics = state.config.server.metrics
    if metrics.enabled and metrics.port is None:
        app.router.add_get("/metrics", _metrics)
    if state.config.server.playground:  # null (auto) is resolved by load_config
        add_playground_routes(app, key_required=state.keys is not None)
    app.cleanup_ctx.append(_tracing)  # first in, last out: spans of the last requests
    app.cleanup_ctx.append(_lifecycle)
    app.cleanup_ctx.append(_metrics_listener)
    app.on_shutdown.append(_not_ready_on_shutdown)
    return app
