"""One generation of everything built from a config, and the hand-over between generations.

A `Runtime` holds the router, upstreams, health, keys and plugin chains built from one
config. `Proxy` takes the current one once per request, at admission, and uses it until the
request ends, so a reload (see `gateway.reload`) never changes a request half-way.
`Generations` counts each runtime's requests; a replaced runtime is retired once its last
request ended: its upstreams and plugins that the newer runtimes do not share are closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.auth import KeyStore
from gateway.chain import Chain, build_chain, build_plugin
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
from gateway.pricing import Pricing, build_pricing
from gateway.protocols.lanes import Lanes
from gateway.routing import Router, UpstreamHealth
from gateway.upstreams.anthropic import Anthropic
from gateway.upstreams.azure import AzureOpenAI
from gateway.upstreams.base import Upstream
from gateway.upstreams.demo import Demo
from gateway.upstreams.ollama import Ollama
from gateway.upstreams.openai import OpenAICompatible

log = logging.getLogger("sluice.runtime")

EMBEDDED: str = "<embedded default>"


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where a running config came from: the file, the sha256 of its bytes, when loaded."""

    path: Path | None
    sha256: str
    loaded_at: float = field(default_factory=time.time)

    @classmethod
    def of(cls, path: Path | None, data: bytes) -> ConfigSource:
        """The source for `data`, read from `path` (None: the embedded default)."""
        return cls(path, hashlib.sha256(data).hexdigest())

    @property
    def name(self) -> str:
        """The file's path, or `<embedded default>`."""
        return EMBEDDED if self.path is None else str(self.path)


@dataclass(eq=False, slots=True)
class Runtime:
    """Everything built from one config; read-only while requests use it."""

    config: GatewayConfig
    router: Router
    upstreams: dict[str, Upstream]
    health: dict[str, UpstreamHealth]
    keys: KeyStore | None
    chains: dict[str, Chain]
    default_chain: Chain
    plugins: dict[tuple[str, str], Any]  # (config location, spec as JSON) -> instance
    source: ConfigSource
    resumable_routes: bool = False  # some route makes every stream resumable
    pricing: Pricing | None = None  # the price table, when costs are computed
    users: int = 0  # requests running on this runtime
    lanes: Lanes = field(init=False)  # which lane a request on this runtime's routes takes

    def __post_init__(self) -> None:
        self.lanes = Lanes(self.upstreams)

    @property
    def all_chains(self) -> list[Chain]:
        """The global chain, then one per route."""
        return [self.default_chain, *self.chains.values()]


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


def _spec_key(where: str, spec: PluginConfig) -> tuple[str, str]:
    return where, spec.model_dump_json()


class _ReusingPlugins(dict[str, Any]):
    """`build_chain`'s per-location cache, seeded with the previous runtime's instances whose
    location and spec are unchanged; records every instance by (location, spec)."""

    def __init__(self, specs: Mapping[str, PluginConfig], previous: Mapping[tuple[str, str], Any]):
        super().__init__()
        self.by_key: dict[tuple[str, str], Any] = {}
        self._specs = specs
        for where, spec in specs.items():
            old = previous.get(_spec_key(where, spec))
            if old is not None:
                self[where] = old

    def __setitem__(self, where: str, plugin: Any) -> None:
        super().__setitem__(where, plugin)
        self.by_key[_spec_key(where, self._specs[where])] = plugin


def _chains(
    config: GatewayConfig,
    registry: Mapping[str, type[Any]],
    shared: dict[str, Any],
) -> tuple[dict[str, Chain], Chain]:
    problems: list[str] = []  # every plugin's, in config order, each reported once
    for where, spec in _plugin_specs(config).items():
        if where in shared:  # reused from the previous runtime
            continue
        try:
            shared[where] = build_plugin(spec, registry, where)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError("\n".join(problems), problems)
    global_specs = [(f"plugins[{i}]", spec) for i, spec in enumerate(config.plugins)]
    chains: dict[str, Chain] = {}
    for r, route in enumerate(config.routes):
        specs: list[tuple[str, PluginConfig]] = [
            (where, spec) for where, spec in global_specs if spec.name not in route.skip_plugins
        ]
        specs += [(f"routes[{r}].plugins[{i}]", spec) for i, spec in enumerate(route.plugins)]
        chains[route.name] = build_chain(specs, registry, shared)
    return chains, build_chain(global_specs, registry, shared)


def _plugin_specs(config: GatewayConfig) -> dict[str, PluginConfig]:
    specs = {f"plugins[{i}]": spec for i, spec in enumerate(config.plugins)}
    for r, route in enumerate(config.routes):
        specs.update({f"routes[{r}].plugins[{i}]": s for i, s in enumerate(route.plugins)})
    return specs


def build_runtime(
    config: GatewayConfig,
    registry: Mapping[str, type[Any]],
    source: ConfigSource,
    previous: Runtime | None = None,
) -> Runtime:
    """Build a runtime from `config`; raises ConfigError (plugin options, TLS bundles).

    With `previous`, an upstream whose config is unchanged keeps its adapter (connection
    pool) and health (breaker, queue, counters), and a plugin at the same location with the
    same spec keeps its instance (rate-limit state, backend connections, open files). What
    this build created itself is closed again if it fails half-way.
    """
    old_plugins = previous.plugins if previous is not None else {}
    shared = _ReusingPlugins(_plugin_specs(config), old_plugins)
    reused = {id(p) for p in shared.values()}
    try:
        chains, default_chain = _chains(config, registry, shared)
        upstreams: dict[str, Upstream] = {}
        health: dict[str, UpstreamHealth] = {}
        for name, up in config.upstreams.items():
            if previous is not None and previous.config.upstreams.get(name) == up:
                upstreams[name], health[name] = previous.upstreams[name], previous.health[name]
            else:
                upstreams[name] = build_upstream(name, up)
                health[name] = UpstreamHealth.from_config(up)
        keys = KeyStore(config.teams) if config.auth == "keys" else None
    except BaseException:
        fresh = [p for p in shared.by_key.values() if id(p) not in reused]
        close_now(fresh)
        raise
    return Runtime(
        config,
        Router(config, health),
        upstreams,
        health,
        keys,
        chains,
        default_chain,
        shared.by_key,
        source,
        resumable_routes=any(route.resumable for route in config.routes),
        pricing=build_pricing(config.pricing, config.routes) if config.priced else None,
    )


def close_now(plugins: Iterable[Any]) -> None:
    """Close plugins synchronously where they can be (a failed build; nothing served yet)."""
    for plugin in plugins:
        closer = getattr(plugin, "close", None)
        if closer is None or inspect.iscoroutinefunction(closer):
            continue  # async resources (clients) are only opened on first use
        try:
            closer()
        except Exception:
            log.exception("plugin %s failed to close", type(plugin).__name__)


async def start_plugins(plugins: Iterable[tuple[str, Any]]) -> None:
    """Await `start()` once on every (name, instance) that has one, before it serves (a
    backend connected, scripts loaded); a failure is logged, never fatal."""
    seen: set[int] = set()
    for name, plugin in plugins:
        starter = getattr(plugin, "start", None)
        if starter is None or id(plugin) in seen:
            continue
        seen.add(id(plugin))
        try:
            result = starter()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("plugin %s failed to start", name)


async def close_plugins(plugins: Iterable[tuple[str, Any]]) -> None:
    """Call `close()` once on every (name, instance) that has one (backends, files)."""
    seen: set[int] = set()
    for name, plugin in plugins:
        closer = getattr(plugin, "close", None)
        if closer is None or id(plugin) in seen:
            continue
        seen.add(id(plugin))
        try:
            result = closer()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("plugin %s failed to close", name)


def chain_plugins(chains: Iterable[Chain]) -> list[tuple[str, Any]]:
    """(name, instance) of every plugin entry of `chains` (instances may repeat)."""
    return [(entry.name, entry.plugin) for chain in chains for entry in chain.entries]


class Generations:
    """The current runtime, and the replaced ones until their last request ended.

    `on_retired(runtime)` runs when a replaced runtime is retired (before its resources are
    closed), e.g. to fold its counters into the metrics.
    """

    def __init__(
        self, current: Runtime, on_retired: Callable[[Runtime], None] | None = None
    ) -> None:
        self.current = current
        self.retiring: list[Runtime] = []
        self._on_retired = on_retired
        self._closing: set[asyncio.Task[None]] = set()

    def enter(self) -> Runtime:
        """The runtime a new request uses for its whole life (pair with `leave`)."""
        runtime = self.current
        runtime.users += 1
        return runtime

    def leave(self, runtime: Runtime) -> None:
        """A request that `enter`ed on `runtime` ended."""
        runtime.users -= 1
        if runtime.users == 0 and runtime in self.retiring:
            self._retire(runtime)

    def swap(self, new: Runtime) -> Runtime:
        """Make `new` current (its upstreams already started); returns the replaced one."""
        old, self.current = self.current, new
        self.retiring.append(old)
        if old.users == 0:
            self._retire(old)
        return old

    def _retire(self, runtime: Runtime) -> None:
        self.retiring.remove(runtime)
        if self._on_retired is not None:
            self._on_retired(runtime)
        upstreams, plugins = self._unshared(runtime)
        task = asyncio.get_running_loop().create_task(_close(upstreams, plugins))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _unshared(self, runtime: Runtime) -> tuple[list[Upstream], list[tuple[str, Any]]]:
        """What only `runtime` uses: not in the current runtime nor a retiring one."""
        live = [self.current, *self.retiring]
        kept_upstreams = {id(u) for rt in live for u in rt.upstreams.values()}
        kept_plugins = {id(p) for rt in live for _, p in chain_plugins(rt.all_chains)}
        upstreams = [u for u in runtime.upstreams.values() if id(u) not in kept_upstreams]
        plugins = [
            (name, p) for name, p in chain_plugins(runtime.all_chains) if id(p) not in kept_plugins
        ]
        return upstreams, plugins

    async def settled(self) -> None:
        """Wait until the closing of retired runtimes finished (for tests and shutdown)."""
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    async def close(self) -> None:
        """At shutdown: close every upstream and plugin of every runtime, once."""
        await self.settled()
        everything = [self.current, *self.retiring]
        self.retiring.clear()
        seen: set[int] = set()
        upstreams = []
        for runtime in everything:
            for upstream in runtime.upstreams.values():
                if id(upstream) not in seen:
                    seen.add(id(upstream))
                    upstreams.append(upstream)
        plugins = [pair for rt in everything for pair in chain_plugins(rt.all_chains)]
        await _close(upstreams, plugins)


async def _close(upstreams: Iterable[Upstream], plugins: Iterable[tuple[str, Any]]) -> None:
    for upstream in upstreams:
        try:
            await upstream.close()
        except Exception:
            log.exception("upstream %s failed to close", upstream.name)
    await close_plugins(plugins)


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What the last reload did: `ok`, `invalid` (refused) or `error`; shown on /admin."""

    result: str
    message: str = ""
    needs_restart: tuple[str, ...] = ()  # changed keys that only a restart applies
    at: float = field(default_factory=time.time)
