"""Config reload in place: SIGHUP, or (opt-in) a change of the config file's content.

A reload reads the file, validates it completely (as `sluice check-config` does: the schema,
then every plugin's options), builds a new `Runtime` and swaps it in; requests already
running finish on the old one (see `gateway.runtime`). Unchanged upstreams keep their
connection pools and breakers, unchanged plugins their instances. An invalid file is
refused with check-config's errors, logged at ERROR, and the running config stays.

Settings in `RESTART_ONLY` are fixed when the listeners start: a change to one is named in
a warning and keeps its running value; everything else in the file is applied.
Every reload is counted in `sluice_config_reloads_total{result}`; GET /admin/config shows
the running file's sha256.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from gateway.chain import discover_plugins
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.pricing import starter_notice
from gateway.runtime import (
    ConfigSource,
    ReloadOutcome,
    Runtime,
    build_runtime,
    chain_plugins,
    start_plugins,
)

if TYPE_CHECKING:
    from gateway.app import GatewayState

log = logging.getLogger("sluice.reload")

RESTART_ONLY: Final = (
    "server.host",
    "server.port",
    "server.max_body_bytes",
    "server.metrics",
    "server.cors",
    "server.playground",
    "server.reload.watch",
    "server.log_format",
    "resumable",
    "tracing",
    "responses",
    "replay",
)
"""Keys a reload cannot apply (listeners, app middleware, the resumable-stream, Responses
and replay stores, the log handlers and the tracer provider set up at start)."""

_READ_ATTEMPTS: Final = 3


def _file_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None


def read_config(path: Path | None) -> tuple[GatewayConfig, ConfigSource]:
    """Load `path` (None: the embedded default) with the sha256 of the bytes that were loaded.

    The file is read again after loading; if it changed in between (a writer not using an
    atomic rename), it is loaded again. Raises ConfigError.
    """
    if path is None:
        data = resources.files("gateway").joinpath("default_config.yaml").read_bytes()
        return load_config(None), ConfigSource.of(None, data)
    for _ in range(_READ_ATTEMPTS):
        before = _file_bytes(path)
        config = load_config(path)
        after = _file_bytes(path)
        if before == after:
            return config, ConfigSource.of(path, after)
    raise ConfigError(f"{path}: it kept changing while being read; reload again once written")


def _value(config: GatewayConfig, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def restart_only_changes(running: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The `RESTART_ONLY` keys whose value differs between the two configs."""
    return [key for key in RESTART_ONLY if _value(running, key) != _value(new, key)]


def keep_running(running: GatewayConfig, new: GatewayConfig) -> GatewayConfig:
    """`new` with every `RESTART_ONLY` value taken from `running` (what is really in force)."""
    old = running.server
    reload = new.server.reload.model_copy(update={"watch": old.reload.watch})
    server = new.server.model_copy(
        update={
            "host": old.host,
            "port": old.port,
            "max_body_bytes": old.max_body_bytes,
            "metrics": old.metrics,
            "cors": old.cors,
            "playground": old.playground,
            "reload": reload,
            "log_format": old.log_format,
        }
    )
    return new.model_copy(
        update={
            "server": server,
            "resumable": running.resumable,
            "tracing": running.tracing,
            "responses": running.responses,
            "replay": running.replay,
        }
    )


def _full_report(path: Path | None, registry: Mapping[str, type[Any]], first: Exception) -> str:
    """Every problem of a refused file, as `check-config` prints them (the first error found
    may be one of several)."""
    from gateway.configcheck import check_config  # imports gateway.app, which imports us

    try:
        check_config(path, registry=registry)
    except ConfigError as full:
        return str(full)
    except Exception:
        return str(first)
    return str(first)  # the file changed again, or the problem is not a config error


def _changes(old: Runtime, new: Runtime) -> str:
    before, after = old.config.upstreams, new.config.upstreams
    kept = [n for n in after if n in before and new.upstreams[n] is old.upstreams[n]]
    added = [n for n in after if n not in before]
    changed = [n for n in after if n in before and n not in kept]
    removed = [n for n in before if n not in after]
    parts = [f"{len(new.config.routes)} routes", f"upstreams kept: {', '.join(kept) or '-'}"]
    for label, names in (("new", added), ("changed", changed), ("removed", removed)):
        if names:
            parts.append(f"{label}: {', '.join(names)}")
    return "; ".join(parts)


class Reloader:
    """Reloads the config of one running gateway; `request()` is the SIGHUP handler."""

    def __init__(
        self,
        state: GatewayState,
        path: Path | None,
        registry: Mapping[str, type[Any]] | None = None,
    ) -> None:
        self.state = state
        self.path = path
        self.registry = discover_plugins() if registry is None else registry
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[ReloadOutcome | None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._seen = state.runtime.source.sha256  # the file content the watcher last acted on
        self._closed = False

    def request(self, reason: str = "SIGHUP") -> None:
        """Reload soon, in a task of its own (safe to call from a signal handler)."""
        if self._closed:
            log.info("%s ignored: the gateway is shutting down", reason)
            return
        task = asyncio.get_running_loop().create_task(self.reload(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, reason: str = "SIGHUP") -> ReloadOutcome | None:
        """Read, validate and apply the config file; None if there is no file to read."""
        if self.path is None:
            log.info("%s: running the embedded default config, nothing to reload", reason)
            return None
        async with self._lock:  # one reload at a time, in the order asked
            return self._finish(await self._reload(reason))

    async def _reload(self, reason: str) -> ReloadOutcome:
        state = self.state
        old = state.runtime
        try:
            loaded, source = read_config(self.path)
            self._seen = source.sha256
            runtime = build_runtime(
                keep_running(old.config, loaded), self.registry, source, previous=old
            )
        except (ConfigError, ValueError) as err:
            report = _full_report(self.path, self.registry, err)
            log.error(
                "%s: config reload refused, still running sha256 %s:\nsluice: %s",
                reason,
                old.source.sha256[:12],
                report,
            )
            return ReloadOutcome("invalid", f"sluice: {report}")
        except Exception as err:
            log.exception("%s: config reload failed, the running config stays", reason)
            return ReloadOutcome("error", f"{type(err).__name__}: {err}")
        try:
            await self._start(old, runtime)
        except Exception as err:
            log.exception("%s: config reload failed starting upstreams; nothing changed", reason)
            return ReloadOutcome("error", f"{type(err).__name__}: {err}")
        needs_restart = tuple(restart_only_changes(old.config, loaded))
        try:
            state.metrics.attach(runtime.config, runtime.all_chains, runtime.health)
        except ConfigError as err:  # a new plugin instance's metrics are declared wrong
            log.error("%s: config reload refused: %s", reason, err)
            return ReloadOutcome("invalid", f"sluice: {err}")
        state.generations.swap(runtime)
        state.metrics.config_loaded(source.sha256)
        state.resumer.keys = runtime.keys
        state.resumer.routes_opt_in = runtime.resumable_routes
        if (notice := starter_notice(runtime.pricing)) is not None:
            log.warning("%s", notice)
        log.info(
            "%s: config reloaded from %s (sha256 %s): %s",
            reason,
            source.name,
            source.sha256[:12],
            _changes(old, runtime),
        )
        message = ""
        if needs_restart:
            message = f"{', '.join(needs_restart)} changed: restart to apply; other changes applied"
            log.warning("%s: %s", reason, message)
        return ReloadOutcome("ok", message, needs_restart)

    @staticmethod
    async def _start(old: Runtime, new: Runtime) -> None:
        """Start the new runtime's own upstreams and plugins (reused ones are running)."""
        running = {id(upstream) for upstream in old.upstreams.values()}
        fresh = [u for u in new.upstreams.values() if id(u) not in running]
        try:
            for upstream in fresh:
                await upstream.start()
        except BaseException:
            for upstream in fresh:
                with contextlib.suppress(Exception):
                    await upstream.close()
            raise
        started = {id(plugin) for _, plugin in chain_plugins(old.all_chains)}
        await start_plugins(
            (name, plugin)
            for name, plugin in chain_plugins(new.all_chains)
            if id(plugin) not in started
        )

    def _finish(self, outcome: ReloadOutcome) -> ReloadOutcome:
        self.state.metrics.reloads.labels(outcome.result).inc()
        self.state.last_reload = outcome
        return outcome

    # ----- watching the file -----------------------------------------------------------

    def watch(self) -> None:
        """Poll the file's content every `server.reload.interval_seconds`; reload on change.

        The content is hashed rather than trusting inotify or mtimes: a ConfigMap update
        swaps a symlink to a new directory.
        """
        if self.path is None:
            log.info("server.reload.watch: no config file to watch (embedded default)")
            return
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self.path))

    async def _watch(self, path: Path) -> None:
        unreadable = False
        while True:
            await asyncio.sleep(self.state.config.server.reload.interval_seconds)
            try:
                data = await asyncio.to_thread(path.read_bytes)
            except OSError as err:
                if not unreadable:  # once per outage, not every poll
                    log.warning("watched config %s cannot be read: %s", path, err.strerror)
                unreadable = True
                continue
            unreadable = False
            digest = ConfigSource.of(path, data).sha256
            if digest != self._seen:
                self._seen = digest  # an invalid file is refused once, not every poll
                await self.reload("config file changed")

    async def close(self) -> None:
        """Stop watching and wait out a reload under way (at shutdown)."""
        self._closed = True
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
