"""An observer for upstreams whose stream a translator turns into OpenAI chunks."""

from __future__ import annotations

from typing import Any, Protocol

from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.sse import SSEEvent
from gateway.upstreams.base import Batch
from gateway.upstreams.openai import OpenAIObserver


class Translator(Protocol):
    """What the proxy reads from a stream translator (Anthropic, Ollama)."""

    @property
    def error(self) -> GatewayError | None:
        """The upstream's in-band error, once it sent one."""
        ...

    @property
    def usage(self) -> dict[str, Any] | None:
        """OpenAI-shaped usage, once final (None for a stream cut before its end)."""
        ...


class TranslatedObserver(OpenAIObserver):
    """OpenAI chunks made by a translator: the translator's own error and usage are the truth.

    A translator reports an in-band error with an OpenAI-shaped error event (so the batch
    stops there); this observer swaps in the translator's precise error (status, type).
    """

    def __init__(self, translator: Translator) -> None:
        super().__init__()
        self.translator = translator

    def classify(self, ctx: RequestContext, events: list[SSEEvent]) -> Batch:
        batch = super().classify(ctx, events)
        if batch.error is not None and self.translator.error is not None:
            batch.error = self.translator.error
        return batch

    def finish(self, ctx: RequestContext) -> None:
        # Only the translator's final usage; none (a cut stream) leaves ctx.usage to the
        # local count. The chunks are not read: they carry nothing the translator lacks.
        usage = self.translator.usage
        if usage is not None:
            ctx.usage.set_from_upstream(dict(usage))
