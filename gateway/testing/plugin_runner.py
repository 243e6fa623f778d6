"""Run one plugin through the chain's real semantics, without a server (compare mitmproxy's
`taddons`): context builders and `PluginRunner`.

`PluginRunner(plugin)` puts the plugin alone in a real `Chain` (so hook detection, batches,
keep-alive comments skipping `on_event`, flushed events, the fail-open/closed policy and
`on_end` exactly once are the gateway's own code), declares its metrics in a registry of
its own, and drives one request at a time::

    runner = PluginRunner(Footer(FooterOptions(text="-- sent by Sluice")))
    await runner.request({"model": "m", "messages": [...]})
    out = runner.events([chunk("Hi"), chunk(None, finish="stop")])
    out += runner.flush()
    await runner.end()
    assert runner.sample("sluice_footer_added_total", team="anonymous") == 1

`PluginRunner.configured(Footer, {"text": "..."})` builds the plugin from raw options the way
the gateway does (validated, `ConfigError` naming the key).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry

from gateway.chain import Chain, _Entry, build_plugin
from gateway.config import PluginConfig, RouteConfig
from gateway.context import Endpoint, Identity, Outcome, RequestContext
from gateway.plugin_metrics import PluginMetricsStore
from gateway.sse import SSEDecoder, SSEEvent

P = TypeVar("P")
Q = TypeVar("Q")


def request_context(
    body: dict[str, Any] | None = None,
    *,
    endpoint: Endpoint = Endpoint.CHAT,
    model: str = "m",
    stream: bool | None = None,
    team: str = "anonymous",
    key_id: str | None = None,
    request_id: str = "req_test",
    client_format: str = "openai",
) -> RequestContext:
    """A routed context as the proxy builds it before `on_request`: model `model` on a route
    of that name (upstream `fake`), `stream` from the body unless given."""
    body = (
        {"model": model, "messages": [{"role": "user", "content": "hi"}]} if body is None else body
    )
    model = str(body.get("model", model))
    ctx = RequestContext(request_id, endpoint, client_format=client_format, body=body)
    ctx.model = model
    ctx.stream = bool(body.get("stream", True)) if stream is None else stream
    ctx.route = RouteConfig(model=model, upstream="fake")
    ctx.identity = Identity(team=team, key_id=key_id)
    return ctx


def chat_context(
    text: str = "hi",
    *,
    messages: list[dict[str, Any]] | None = None,
    fields: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> RequestContext:
    """A streaming chat request with one user message `text`, or these `messages`; `fields`
    are further body fields (`tools`, `n`, `"stream": False`). See `request_context`."""
    model = kwargs.pop("model", "m")
    body = {
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": text}] if messages is None else messages,
        **(fields or {}),
    }
    return request_context(body, **kwargs)


def completion_context(prompt: str = "hi", **kwargs: Any) -> RequestContext:
    """A streaming legacy-completions request (see `request_context`)."""
    model = kwargs.pop("model", "m")
    body = {"model": model, "stream": True, "prompt": prompt}
    return request_context(body, endpoint=Endpoint.COMPLETIONS, **kwargs)


class PluginRunner(Generic[P]):
    """One plugin in a chain of its own; one request at a time (see the module docstring).

    `ctx` is the current request's context; `chain.errors` counts the plugin's failures
    (fail-open by default: logged and counted, the event passes; `fail_closed=True` raises
    `PluginFailed` like the gateway). `registry` holds the plugin's declared metrics.
    """

    def __init__(self, plugin: P, *, name: str | None = None, fail_closed: bool = False) -> None:
        self.plugin = plugin
        self.name = name or str(getattr(plugin, "name", type(plugin).__name__))
        self.chain = Chain([_Entry(self.name, plugin, fail_closed)])
        self.registry = CollectorRegistry()
        self.metrics = PluginMetricsStore(self.registry)
        self.metrics.declare(self.name, plugin)
        self.ctx = chat_context()
        self._ended = True
        self._decoder = SSEDecoder()

    @staticmethod
    def configured(
        plugin_class: type[Q],
        options: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        fail_closed: bool = False,
    ) -> PluginRunner[Q]:
        """A runner for `plugin_class` built from raw `options` as the gateway builds it (the
        options model validates them; a `ConfigError` names the offending key)."""
        name = name or str(getattr(plugin_class, "name", plugin_class.__name__))
        spec = PluginConfig(name=name, options=dict(options or {}))
        plugin: Q = build_plugin(spec, {name: plugin_class}, "plugins[0]")
        return PluginRunner(plugin, name=name, fail_closed=fail_closed)

    async def request(
        self, body: dict[str, Any] | None = None, *, ctx: RequestContext | None = None
    ) -> RequestContext:
        """Start a request (a `body` for `request_context`, or a context of yours) and run
        `on_request`; a `Reject` propagates, as the proxy would answer it."""
        self.ctx = ctx if ctx is not None else request_context(body)
        self._ended = False
        self._decoder = SSEDecoder()
        await self.chain.run_request(self.ctx)
        return self.ctx

    async def response_start(self) -> None:
        """Run `on_response_start` (the upstream answered, headers not sent yet)."""
        await self.chain.run_response_start(self.ctx)

    def events(self, events: Iterable[SSEEvent | dict[str, Any]]) -> list[SSEEvent]:
        """One upstream read: these events (dicts become JSON data events) through the event
        hooks, as one batch; what would be written. `EndStream` propagates."""
        batch = [e if isinstance(e, SSEEvent) else SSEEvent.from_json(e) for e in events]
        self.ctx.events_in += len(batch)  # as the proxy counts: comments included
        out = self.chain.run_events(self.ctx, batch)
        self.ctx.events_out += len(out)
        return out

    def feed(self, *data: bytes) -> list[SSEEvent]:
        """Raw upstream bytes (one or more pieces, split anywhere): the complete events in
        them, as one read."""
        return self.events(self._decoder.feed(b"".join(data)))

    def each(self, events: Sequence[SSEEvent | dict[str, Any]]) -> list[SSEEvent]:
        """Each event as a read of its own (a paced stream); everything written."""
        return [out for event in events for out in self.events([event])]

    def flush(self) -> list[SSEEvent]:
        """The upstream finished normally: `on_flush` (what it releases passes later hooks)."""
        return self.chain.run_flush(self.ctx)

    async def response(self, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming answer through `on_response`."""
        return await self.chain.run_response(self.ctx, body)

    async def end(
        self, outcome: Outcome = Outcome.COMPLETED, *, ctx: RequestContext | None = None
    ) -> RequestContext:
        """End the request with `outcome` (unless the context has one): `on_end`, exactly
        once (a second call raises). With `ctx`, end that context instead, one `request()`
        never saw: a request rejected before routing, where only `on_end` runs."""
        if ctx is not None:
            self.ctx = ctx
            self._decoder = SSEDecoder()
        elif self._ended:
            raise RuntimeError("the request already ended (or never started)")
        self._ended = True
        if self.ctx.outcome is None:
            self.ctx.outcome = outcome
        if self.ctx.timing.ended is None:
            self.ctx.timing.ended = time.perf_counter()
        await self.chain.run_end(self.ctx)
        return self.ctx

    def sample(self, name: str, **labels: str) -> float | None:
        """The value of one sample of the plugin's metrics (e.g. `x_total`), or None."""
        return self.registry.get_sample_value(name, labels)
