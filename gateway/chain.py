"""The plugin chain: built once from config; runs hooks in order, each with a failure policy."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from time import perf_counter
from typing import Any, cast

from pydantic import ValidationError

from gateway.config import ConfigError, PluginConfig, located_problems
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.plugin import (
    EndStream,
    OnEnd,
    OnEvent,
    OnEvents,
    OnFlush,
    OnRequest,
    OnResponse,
    OnResponseStart,
    Reject,
)
from gateway.sse import SSEEvent

log = logging.getLogger("sluice.chain")

ENTRY_POINT_GROUP = "sluice.plugins"


class _EntryPointRegistry(Mapping[str, type[Any]]):
    """Installed plugins by name; a plugin's module is imported only when it is used."""

    def __init__(self) -> None:
        self._eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}

    def __getitem__(self, name: str) -> type[Any]:
        try:
            loaded = self._eps[name].load()
        except KeyError:
            raise
        except Exception as err:
            raise ConfigError(f"plugin {name!r} is installed but failed to load: {err}") from err
        return cast(type[Any], loaded)

    def __iter__(self) -> Iterator[str]:
        return iter(self._eps)

    def __len__(self) -> int:
        return len(self._eps)


def discover_plugins() -> Mapping[str, type[Any]]:
    """Installed plugin classes by name (built-ins register through the same group)."""
    return _EntryPointRegistry()


def plugin_class(name: str, registry: Mapping[str, type[Any]], where: str) -> type[Any]:
    """The installed class of plugin `name`; ConfigError naming `where` if there is none."""
    if name not in registry:
        known = ", ".join(sorted(registry)) or "none installed"
        raise ConfigError(f"{where}.name: unknown plugin {name!r} (installed: {known})")
    try:
        return registry[name]
    except ConfigError as err:
        raise ConfigError(f"{where}.name: {err}") from None


class _OptionsError(ConfigError):
    """Bad plugin options, with each problem's key path."""

    def __init__(self, located: list[tuple[str, str]]) -> None:
        problems = [line for _, line in located]
        super().__init__("\n".join(problems), problems)
        self.located = located


def _options(cls: type[Any], options: dict[str, Any], where: str) -> Any:
    """The plugin's validated `Options`; ConfigError listing every bad option by key path."""
    options_model = getattr(cls, "Options", None)
    if options_model is None:
        return options
    try:
        return options_model.model_validate(options)
    except ValidationError as err:
        raise _OptionsError(located_problems(err, f"{where}.options")) from None


def check_plugin_options(
    name: str, options: dict[str, Any], registry: Mapping[str, type[Any]], where: str
) -> list[tuple[str, str]]:
    """Every problem with one plugin's name and options, as (key path, line), without
    constructing the plugin."""
    try:
        _options(plugin_class(name, registry, where), options, where)
    except _OptionsError as err:
        return err.located
    except ConfigError as err:
        return [(f"{where}.name", line) for line in err.problems]
    return []


def build_plugin(spec: PluginConfig, registry: Mapping[str, type[Any]], where: str) -> Any:
    """Instantiate one plugin with validated options; ConfigError names the key on failure."""
    cls = plugin_class(spec.name, registry, where)
    options = _options(cls, spec.options, where)
    try:
        return cls(options)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


@dataclass(slots=True)
class _Entry:
    name: str
    plugin: Any
    fail_closed: bool


@dataclass(slots=True)
class _EventHook:
    """A plugin's event hook: `batch` (`on_events`) if it has one, else `one` (`on_event`)."""

    entry: _Entry
    one: OnEvent | None
    batch: OnEvents | None


class PluginFailed(GatewayError):
    """A fail-closed plugin raised; the request fails with a 500."""

    def __init__(self, name: str) -> None:
        super().__init__(500, f"Plugin {name!r} failed.", type="server_error", code="plugin_error")


@dataclass
class Chain:
    """Hook lists for one route, in config order. Shared by all requests on that route."""

    entries: list[_Entry]
    errors: Counter[str] = field(default_factory=Counter)
    _request: list[tuple[_Entry, OnRequest]] = field(init=False)
    _response_start: list[tuple[_Entry, OnResponseStart]] = field(init=False)
    _event: list[_EventHook] = field(init=False)
    _flush: list[tuple[_Entry, OnFlush]] = field(init=False)
    _response: list[tuple[_Entry, OnResponse]] = field(init=False)
    _end: list[tuple[_Entry, OnEnd]] = field(init=False)

    def __post_init__(self) -> None:
        self._request = self._hooks("on_request", want_async=True)
        self._response_start = self._hooks("on_response_start", want_async=True)
        self._event = []
        for entry in self.entries:
            batch = self._hook(entry, "on_events", want_async=False)
            one = None if batch is not None else self._hook(entry, "on_event", want_async=False)
            if batch is not None or one is not None:
                self._event.append(_EventHook(entry, one, batch))
        self._flush = self._hooks("on_flush", want_async=False)
        self._response = self._hooks("on_response", want_async=True)
        self._end = self._hooks("on_end", want_async=True)

    def _hooks(self, name: str, *, want_async: bool) -> list[tuple[_Entry, Any]]:
        found = []
        for entry in self.entries:
            hook = self._hook(entry, name, want_async=want_async)
            if hook is not None:
                found.append((entry, hook))
        return found

    @staticmethod
    def _hook(entry: _Entry, name: str, *, want_async: bool) -> Any:
        hook = getattr(entry.plugin, name, None)
        if hook is not None and inspect.iscoroutinefunction(hook) != want_async:
            kind = "async" if want_async else "a plain (synchronous) method"
            raise ConfigError(f"plugin {entry.name!r}: {name} must be {kind}")
        return hook

    @property
    def names(self) -> list[str]:
        """Plugin names in order."""
        return [e.name for e in self.entries]

    @property
    def has_event_hooks(self) -> bool:
        """True if any plugin looks at streamed events."""
        return bool(self._event)

    def _failed(self, entry: _Entry, hook: str, ctx: RequestContext) -> None:
        """Count and log a plugin exception; re-raise as PluginFailed if fail-closed."""
        self.errors[entry.name] += 1
        log.exception("plugin %s raised in %s (request %s)", entry.name, hook, ctx.request_id)
        if entry.fail_closed:
            raise PluginFailed(entry.name) from None

    async def run_request(self, ctx: RequestContext) -> None:
        """Run `on_request` hooks; Reject propagates."""
        for entry, hook in self._request:
            try:
                await hook(ctx)
            except Reject:
                raise
            except Exception:
                self._failed(entry, "on_request", ctx)

    async def run_response_start(self, ctx: RequestContext) -> None:
        """Run `on_response_start` hooks; Reject propagates."""
        for entry, hook in self._response_start:
            try:
                await hook(ctx)
            except Reject:
                raise
            except Exception:
                self._failed(entry, "on_response_start", ctx)

    def run_events(self, ctx: RequestContext, events: list[SSEEvent]) -> list[SSEEvent]:
        """Pass a batch of events through every event hook in order (the hot path)."""
        return self._apply(ctx, events, self._event)

    def _apply(
        self, ctx: RequestContext, events: list[SSEEvent], hooks: list[_EventHook]
    ) -> list[SSEEvent]:
        spent = ctx.plugin_seconds
        for position, hook in enumerate(hooks):
            if not events:  # all held or dropped: nothing for the plugins after
                break
            name = hook.entry.name
            started = perf_counter()  # per plugin and batch, not per event
            try:
                events = (
                    self._batch(ctx, events, hook) if hook.batch else self._each(ctx, events, hook)
                )
            except EndStream as end:
                # What this plugin already let through still goes out, before its final
                # events, and both pass the plugins after it.
                end.events = self._apply(ctx, end.events, hooks[position + 1 :])
                raise
            spent[name] = spent.get(name, 0.0) + (perf_counter() - started)
        return events

    def _batch(
        self, ctx: RequestContext, events: list[SSEEvent], hook: _EventHook
    ) -> list[SSEEvent]:
        assert hook.batch is not None
        try:
            result = hook.batch(ctx, events)
        except (EndStream, Reject):
            raise
        except Exception:
            self._failed(hook.entry, "on_events", ctx)
            result = None
        return events if result is None else result

    def _each(
        self, ctx: RequestContext, events: list[SSEEvent], hook: _EventHook
    ) -> list[SSEEvent]:
        call = hook.one
        assert call is not None
        out: list[SSEEvent] = []
        for event in events:
            if event.data_bytes is None:  # keep-alive comments skip plugins
                out.append(event)
                continue
            try:
                result = call(ctx, event)
            except EndStream as end:
                end.events = [*out, *end.events]
                raise
            except Reject:
                raise
            except Exception:
                self._failed(hook.entry, "on_event", ctx)
                result = None
            if result is None:
                out.append(event)
            else:
                out.extend(result)
        return out

    def run_flush(self, ctx: RequestContext) -> list[SSEEvent]:
        """Collect held-back events at the normal end, in chain order.

        Events a plugin flushes pass through the `on_event` hooks of the plugins after it,
        whose own flushes come later, so nothing skips a plugin downstream of its source.
        """
        pending: list[SSEEvent] = []
        for entry, hook in self._flush:
            try:
                flushed = hook(ctx) or []
            except Exception:
                self._failed(entry, "on_flush", ctx)
                flushed = []
            if flushed:
                position = self.entries.index(entry)
                later = [h for h in self._event if self.entries.index(h.entry) > position]
                pending.extend(self._apply(ctx, flushed, later))
        return pending

    async def run_response(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        """Run `on_response` hooks over a non-streaming body."""
        for entry, hook in self._response:
            try:
                replaced = await hook(ctx, body)
            except Reject:
                raise
            except Exception:
                self._failed(entry, "on_response", ctx)
                replaced = None
            if replaced is not None:
                body = replaced
        return body

    async def run_end(self, ctx: RequestContext) -> None:
        """Run every `on_end` hook; failures are logged and counted, never raised.

        A cancellation (a shutdown) does not skip the hooks after it (they release what
        the request holds); it is raised again once they have all run.
        """
        cancelled: asyncio.CancelledError | None = None
        for entry, hook in self._end:
            try:
                await hook(ctx)
            except asyncio.CancelledError as err:
                cancelled = err
            except Exception:
                self.errors[entry.name] += 1
                log.exception("plugin %s raised in on_end (request %s)", entry.name, ctx.request_id)
        if cancelled is not None:
            raise cancelled


def build_chain(
    specs: Iterable[tuple[str, PluginConfig]],
    registry: Mapping[str, type[Any]],
    shared: dict[str, Any] | None = None,
) -> Chain:
    """Build a chain from (config location, plugin spec) pairs, in order.

    Plugins already built at the same config location (in `shared`) are reused, so a global
    plugin is one instance across every route's chain (one rate limiter, one log file).
    """
    shared = {} if shared is None else shared
    entries = []
    problems: list[str] = []
    for where, spec in specs:
        if where not in shared:
            try:
                shared[where] = build_plugin(spec, registry, where)
            except ConfigError as err:
                problems += err.problems
                continue
        entries.append(_Entry(spec.name, shared[where], spec.fail == "closed"))
    if problems:
        raise ConfigError("\n".join(problems), problems)
    return Chain(entries)
