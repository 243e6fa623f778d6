"""The public plugin interface.

A plugin is a class registered under the entry-point group ``sluice.plugins`` and
enabled by name in the config. Subclass :class:`Plugin` with its options model as the type
argument (``class Footer(Plugin[FooterOptions])``): ``self.options`` then has that type.
It is built once per config location with its validated options and implements any subset
of these hooks (the chain detects them once, when it is built):

``async on_request(ctx)``
    After the request body is parsed and routed, before anything is sent upstream.
    May change ``ctx.body`` or raise :class:`Reject` (the client gets that status).
``async on_response_start(ctx)``
    The upstream answered and its first event is in hand; response headers are not sent
    yet. May add ``ctx.response_headers`` or raise :class:`Reject`.
``on_event(ctx, event) -> list[SSEEvent] | None``
    Synchronous, once per upstream data event, in client wire format. Return None to pass
    the event on unchanged (its original bytes go out), a list to replace it: empty to
    drop, several to split, or hold events back and release them later. Raise
    :class:`EndStream` to finish the stream early with final events of your own.
    Keep-alive comments never reach it; on the OpenAI lane the usage-only chunk and
    ``data: [DONE]`` do (see docs/plugins.md).
``on_events(ctx, events) -> list[SSEEvent] | None``
    Optional, used instead of ``on_event`` when a plugin has both: the events that came in
    one upstream read, in order, keep-alive comments (events without data) included: put
    those back where they were. Return None to pass the batch on unchanged (original bytes),
    or a new list to send instead; do not change the list given. To end the stream, raise
    :class:`EndStream` with everything of the batch that goes out, then the final events.
    A plugin that raises here fails (or is skipped, fail-open) for the whole batch. For
    per-event costs that a batch can share: one scan, one timestamp, no per-event calls.
``on_flush(ctx) -> list[SSEEvent] | None``
    The upstream finished normally; release anything held back. What it returns goes out
    before the stream's terminal events (the finish chunk, ``[DONE]``) when the plugin held
    them back itself; see docs/plugins.md for adding text at the end of an answer.
``async on_response(ctx, body) -> dict | None``
    Non-streaming responses: the parsed upstream JSON; return a replacement or None.
``async on_end(ctx)``
    Exactly once per request, whatever happened; ``ctx.outcome`` says how it ended.

Lifecycle, outside requests:

``declare_metrics(metrics: PluginMetrics)``
    Once per instance, before it serves: create its Prometheus instruments
    (``gateway.plugin_metrics``); they are shown on ``/metrics``.
``async start()``
    Once, when the gateway starts (or a reload built this instance), before it serves:
    open app-lifetime resources (a Redis client, a thread pool). A failure is logged.
``close()`` (plain or async)
    Once, at shutdown, or when a reload replaced this instance and its last request ended.
``add_commands(add)`` (a classmethod)
    Adds ``sluice <command>`` subcommands: ``add(name, help)`` returns the subcommand's
    ``argparse.ArgumentParser``; ``set_defaults(func=handler)`` with ``handler(args) -> int``.

A reload keeps the instance of each plugin whose config location and spec are unchanged
(its state, connections, metrics); a changed or moved one is a new instance, built, declared
and started before the new config serves. Raise :class:`ConfigError` from ``__init__`` for
configuration a pydantic model cannot check: the message is shown with its config location.

Hooks must not block: no network I/O in ``on_event``; hand heavy work to a thread.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Generic

from pydantic import BaseModel, ConfigDict
from typing_extensions import TypeVar

from gateway.config import ConfigError
from gateway.context import Outcome, RequestContext
from gateway.errors import GatewayError
from gateway.plugin_metrics import BucketCounts, Instrument, PluginMetrics
from gateway.sse import SSEEvent

__all__ = [
    "HOOK_NAMES",
    "AddCommand",
    "BucketCounts",
    "ConfigError",
    "EndStream",
    "Instrument",
    "NoOptions",
    "Plugin",
    "PluginMetrics",
    "Reject",
]

OnRequest = Callable[[RequestContext], Awaitable[None]]
OnResponseStart = Callable[[RequestContext], Awaitable[None]]
OnEvent = Callable[[RequestContext, SSEEvent], "list[SSEEvent] | None"]
OnEvents = Callable[[RequestContext, list[SSEEvent]], "list[SSEEvent] | None"]
OnFlush = Callable[[RequestContext], "list[SSEEvent] | None"]
OnResponse = Callable[[RequestContext, dict[str, Any]], Awaitable["dict[str, Any] | None"]]
OnEnd = Callable[[RequestContext], Awaitable[None]]

HOOK_NAMES = (
    "on_request",
    "on_response_start",
    "on_event",
    "on_events",
    "on_flush",
    "on_response",
    "on_end",
)


class NoOptions(BaseModel):
    """Options model for plugins that take none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# Bare `Plugin` is `Plugin[BaseModel]`: a plugin written before options were typed keeps
# type-checking as it did.
OptionsT = TypeVar("OptionsT", bound=BaseModel, default=BaseModel)

AddCommand = Callable[[str, str], argparse.ArgumentParser]
"""What `add_commands` gets: `add(name, help)` -> the parser of `sluice <name>`."""


class Plugin(Generic[OptionsT]):
    """Convenience base: holds the name and validated options. Defines no hooks.

    Subclasses set ``name`` and give their options model (a pydantic model; reject unknown
    keys with ``extra="forbid"``) as the type argument, ``class P(Plugin[POptions])``: the
    chain validates the config's ``options`` with it (``P.Options``) and ``self.options``
    has that type. ``class P(Plugin)`` takes no options (:class:`NoOptions`) unless it sets
    ``Options`` itself (``self.options`` is then a plain ``BaseModel`` to mypy).
    """

    name: ClassVar[str] = "unnamed"
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: OptionsT) -> None:
        self.options: OptionsT = options

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Options" in cls.__dict__:
            return
        for base in getattr(cls, "__orig_bases__", ()):
            if typing.get_origin(base) is Plugin:
                (model,) = typing.get_args(base)
                if isinstance(model, type) and issubclass(model, BaseModel):
                    cls.Options = model


class Reject(GatewayError):
    """Raised by a plugin to deny a request: an HTTP status before headers, else a final event."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, type=type, code=code, headers=headers)


class EndStream(Exception):
    """Raised from ``on_event`` to finish a stream now: `events` go out, then the terminal event.

    The upstream is closed; the request ends with `outcome` (completed unless said otherwise).
    """

    def __init__(
        self, events: Sequence[SSEEvent] = (), *, outcome: Outcome = Outcome.COMPLETED
    ) -> None:
        super().__init__("stream ended by plugin")
        self.events = list(events)
        self.outcome = outcome
