"""Access log: one structured line per request, written when the request ends.

Each line is rendered by a structlog processor chain that this plugin instance owns (no
``structlog.configure`` anywhere, so the application's own structlog set-up is untouched).
Fields of the ``request`` line (``null`` when unknown, so every line has the same keys):

``ts`` (ISO-8601, UTC), ``level``, ``event``, ``request_id``, ``upstream_request_id`` (the
UUID sent upstream in its request id header), ``team``, ``key_id`` (an id, never the key),
``model`` (as the client sent it), ``route``, ``upstream``, ``upstream_model``,
``endpoint`` (``chat.completions``, ``completions``, ``embeddings``, or ``messages`` for
``/v1/messages``), ``stream``, ``status``, ``outcome``, ``error_code``, ``error_message``
(sanitised), ``prompt_tokens``, ``completion_tokens``, ``usage_source``, ``ttft_ms``
(request received to first event written), ``duration_ms``, ``events``, ``bytes``,
``retries``, ``healed`` (continuations of a stream broken mid-answer, see `gateway.heal`),
``heal_gap_ms``, ``overhead_ms`` (gateway time per stream; null when not measured), ``cost``
(what the request cost in ``currency``, from its final usage and the price table; 0 for an
unknown model; both null when no ``pricing:`` is configured; see docs/costs.md), ``cache``
(the replay cache's ``hit``, ``miss`` or ``bypass``; null when the request was not cacheable;
a hit has ``usage_source`` ``cache``, 0 tokens and cost 0; see docs/replay.md).

With ``log_prompts`` / ``log_completions`` the line also carries ``prompt`` (the prompt's
text pieces) / ``completion`` (the generated text per choice index), each capped at
``max_text_chars`` characters per request, plus ``prompt_truncated`` /
``completion_truncated``. Neither is ever logged unless enabled.

At ``level: debug`` two more lines appear: ``request.start`` when the request was routed,
and ``request.error`` with the error's details when a request failed.

Chain order matters: the prompt is read in ``on_request`` and the completion in
``on_event``, both as left by the plugins *before* this one. Put ``access_log`` after
``content_filter`` so that what is logged is what the filter redacted.

No request headers are read, so credentials (``Authorization``, API keys, the upstream's
``api_key``) cannot reach a line; error messages are sanitised once more before writing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, cast

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator
from structlog.typing import FilteringBoundLogger, Processor

from gateway.config import ConfigError
from gateway.context import Endpoint, RequestContext, StateKey
from gateway.deltas import event_texts, prompt_texts
from gateway.errors import sanitise_message
from gateway.heal import HEALED
from gateway.plugin import OnEvent, OnResponse, Plugin
from gateway.pricing import cost_of
from gateway.protocols import ANTHROPIC, RESPONSES
from gateway.protocols.responses import views as responses_views
from gateway.replay.state import REPLAY
from gateway.sse import SSEEvent

_MAX_MODEL_CHARS = 200  # the client's model string is logged even when it matched no route


class AccessLogOptions(BaseModel):
    """Options of the `access_log` plugin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    level: Literal["debug", "info", "warning"] = "info"
    format: Literal["json", "console"] = "json"
    log_prompts: bool = False
    log_completions: bool = False
    max_text_chars: int = Field(2000, ge=1, le=1_000_000)
    stream: Literal["stdout", "stderr"] | Path = "stdout"

    @field_validator("stream")
    @classmethod
    def _parent_exists(cls, value: str | Path) -> str | Path:
        if isinstance(value, Path) and not value.parent.is_dir():
            raise ValueError(f"directory {str(value.parent)!r} does not exist")
        return value


@dataclass(slots=True)
class _Text:
    """Text pieces by index under one character budget; never holds more than `limit`."""

    limit: int
    used: int = 0
    truncated: bool = False
    pieces: dict[int, list[str]] = field(default_factory=dict)

    def add(self, index: int, text: str) -> None:
        room = self.limit - self.used
        if len(text) > room:
            self.truncated = True
            text = text[:room]
        if text:
            self.pieces.setdefault(index, []).append(text)
            self.used += len(text)

    def joined(self) -> list[str]:
        """One string per index, in index order."""
        return ["".join(self.pieces[i]) for i in sorted(self.pieces)]


_PROMPT: StateKey[_Text] = StateKey("access_log.prompt")
_COMPLETION: StateKey[_Text] = StateKey("access_log.completion")


class _LineSink:
    """The wrapped logger: writes each rendered line in one call, then flushes.

    stdout/stderr are looked up at write time, so a replaced `sys.stdout` (pytest's capture,
    a supervisor's redirect) is honoured.
    """

    def __init__(self, target: Literal["stdout", "stderr"] | IO[str]) -> None:
        self._target = target

    def msg(self, message: str) -> None:
        out = getattr(sys, self._target) if isinstance(self._target, str) else self._target
        out.write(message + "\n")
        out.flush()

    debug = info = warning = msg


def _ordered(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """ts, level and event first; the rest in the order they were given."""
    head = {key: event_dict.pop(key, None) for key in ("ts", "level", "event")}
    return {**head, **event_dict}


def _processors(fmt: Literal["json", "console"]) -> list[Processor]:
    chain: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        _ordered,
    ]
    if fmt == "json":
        # json.dumps escapes every non-ASCII character: a line is ASCII and splits only on LF.
        chain.append(structlog.processors.JSONRenderer())
    else:
        # repr_native_str quotes strings, so user text with newlines stays on one line.
        chain.append(
            structlog.dev.ConsoleRenderer(
                colors=False, sort_keys=False, timestamp_key="ts", repr_native_str=True
            )
        )
    return chain


def _ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000.0, 3)


class AccessLog(Plugin[AccessLogOptions]):
    """Writes one access-log line per request in `on_end` (see the module docstring)."""

    name = "access_log"

    # Bound per instance, only with `log_completions`: without them the chain never calls
    # this plugin per event (and skips the event loop entirely if no other plugin needs it).
    on_event: OnEvent
    on_response: OnResponse

    def __init__(self, options: AccessLogOptions, *, file: IO[str] | None = None) -> None:
        """`file` overrides `options.stream` (for tests and embedding)."""
        super().__init__(options)
        opts = options
        self._file: IO[str] | None = None
        target: Literal["stdout", "stderr"] | IO[str]
        if file is not None:
            target = file
        elif isinstance(opts.stream, Path):
            try:
                self._file = opts.stream.open("a", encoding="utf-8", buffering=1)
            except OSError as err:
                raise ConfigError(
                    f"access_log.options.stream: cannot open {str(opts.stream)!r}: {err.strerror}"
                ) from None
            target = self._file
        else:
            target = opts.stream
        logger = structlog.wrap_logger(
            _LineSink(target),
            processors=_processors(opts.format),
            wrapper_class=structlog.make_filtering_bound_logger(opts.level),
            context_class=dict,
            cache_logger_on_first_use=True,
        )
        self._log = cast(FilteringBoundLogger, logger.bind())
        self._debug = opts.level == "debug"
        if opts.log_completions:
            self.on_event = self._collect_event
            self.on_response = self._collect_response

    def close(self) -> None:
        """Close the log file, if this instance opened one."""
        if self._file is not None:
            self._file.close()
            self._file = None

    # ----- hooks ---------------------------------------------------------------------------

    async def on_request(self, ctx: RequestContext) -> None:
        opts = self.options
        if opts.log_prompts:
            # Taken now, after earlier plugins (a content filter) rewrote the body.
            prompt = _Text(opts.max_text_chars)
            for i, piece in enumerate(prompt_texts(ctx.endpoint, ctx.body, ctx.wire)):
                prompt.add(i, piece)
                if prompt.truncated:
                    break
            ctx.set(_PROMPT, prompt)
        if opts.log_completions:
            ctx.set(_COMPLETION, _Text(opts.max_text_chars))
        if self._debug:
            self._log.debug("request.start", **self._who(ctx))

    def _collect_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        text = ctx.get(_COMPLETION)
        if text is None or text.truncated:
            return None
        for index, piece in event_texts(ctx, event).items():
            text.add(index, piece)
        return None

    async def _collect_response(
        self, ctx: RequestContext, body: dict[str, Any]
    ) -> dict[str, Any] | None:
        text = ctx.get(_COMPLETION)
        if text is None:
            return None
        if ctx.wire == RESPONSES:  # a Response: its output items' text
            for index, piece in responses_views.response_texts(body).items():
                text.add(index, piece)
            return None
        if ctx.wire == ANTHROPIC:  # a Message: its text blocks
            for block in body.get("content") or ():
                if isinstance(block, dict) and isinstance(block.get("text"), str):
                    text.add(0, block["text"])
            return None
        for choice in body.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if ctx.endpoint is Endpoint.CHAT:
                message = choice.get("message")
                content = message.get("content") if isinstance(message, dict) else None
            else:
                content = choice.get("text")
            if isinstance(content, str):
                text.add(int(choice.get("index", 0)), content)
        return None

    async def on_end(self, ctx: RequestContext) -> None:
        fields = self._fields(ctx)
        level = self.options.level
        if level == "info":
            self._log.info("request", **fields)
        elif level == "warning":
            self._log.warning("request", **fields)
        else:
            self._log.debug("request", **fields)
            if ctx.error is not None:
                self._log.debug("request.error", **self._error_details(ctx))

    # ----- line contents -------------------------------------------------------------------

    @staticmethod
    def _who(ctx: RequestContext) -> dict[str, Any]:
        route = ctx.route
        return {
            "request_id": ctx.request_id,
            "upstream_request_id": ctx.upstream_request_id,
            "team": ctx.identity.team,
            "key_id": ctx.identity.key_id,
            "model": ctx.model[:_MAX_MODEL_CHARS] or None,
            "route": route.name if route is not None else None,
            "upstream": ctx.upstream_name,
            "upstream_model": ctx.upstream_model,
            "endpoint": ctx.api,
            "stream": ctx.stream,
        }

    def _fields(self, ctx: RequestContext) -> dict[str, Any]:
        timing, usage, error = ctx.timing, ctx.usage, ctx.error
        healed = ctx.get(HEALED)
        ended = timing.ended if timing.ended is not None else time.perf_counter()
        fields = self._who(ctx)
        fields.update(
            status=ctx.status,
            outcome=str(ctx.outcome) if ctx.outcome is not None else None,
            error_code=error.code if error is not None else None,
            error_message=sanitise_message(error.message) if error is not None else None,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            usage_source=usage.source,
            ttft_ms=_ms(timing.received, timing.first_event_written),
            duration_ms=_ms(timing.received, ended),
            events=ctx.events_out,
            bytes=ctx.bytes_out,
            retries=ctx.retries,
            healed=healed.heals if healed is not None else 0,
            heal_gap_ms=round(healed.gap_seconds * 1000.0, 3) if healed is not None else None,
            overhead_ms=round(ctx.overhead_seconds * 1000.0, 3) if ctx.events_in else None,
        )
        cost = cost_of(ctx)
        fields["cost"] = float(cost.amount) if cost is not None else None
        fields["currency"] = cost.currency if cost is not None else None
        fields["cache"] = ctx.get(REPLAY)
        prompt, completion = ctx.get(_PROMPT), ctx.get(_COMPLETION)
        if self.options.log_prompts:
            fields["prompt"] = prompt.joined() if prompt is not None else None
            fields["prompt_truncated"] = prompt.truncated if prompt is not None else False
        if self.options.log_completions:
            fields["completion"] = completion.joined() if completion is not None else None
            fields["completion_truncated"] = (
                completion.truncated if completion is not None else False
            )
        return fields

    @staticmethod
    def _error_details(ctx: RequestContext) -> dict[str, Any]:
        error = ctx.error
        assert error is not None
        timing = ctx.timing
        return {
            "request_id": ctx.request_id,
            "outcome": str(ctx.outcome) if ctx.outcome is not None else None,
            "error_status": error.status,
            "error_type": error.type,
            "error_code": error.code,
            "error_param": error.param,
            "error_message": sanitise_message(error.message),
            # How far the request got, in ms since it was received (null: not reached).
            "upstream_headers_ms": _ms(timing.received, timing.upstream_headers),
            "first_upstream_event_ms": _ms(timing.received, timing.first_upstream_event),
            "response_started_ms": _ms(timing.received, timing.response_started),
            "last_event_written_ms": _ms(timing.received, timing.last_event_written),
        }
