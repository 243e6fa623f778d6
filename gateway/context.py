"""Per-request context shared by the proxy and every plugin."""

from __future__ import annotations

import enum
import hashlib
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast, overload

if TYPE_CHECKING:
    from gateway.config import RouteConfig
    from gateway.errors import GatewayError

T = TypeVar("T")


class Outcome(enum.StrEnum):
    """How a request ended; plugins see exactly one per request in `on_end`."""

    COMPLETED = "completed"
    CLIENT_DISCONNECTED = "client_disconnected"
    CANCELLED = "cancelled"  # the client asked to stop (a WebSocket `cancel`)
    UPSTREAM_ERROR = "upstream_error"
    TIMEOUT = "timeout"
    REJECTED = "rejected"
    ERROR = "error"


class Endpoint(enum.StrEnum):
    """The client-facing API a request came in on."""

    CHAT = "chat.completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


class StateKey(Generic[T]):
    """A typed slot for a plugin's per-request state (compare aiohttp's `AppKey`)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StateKey({self.name!r})"


@dataclass(slots=True)
class Usage:
    """Token counts; `source` says whether the upstream reported them or they were counted here."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    source: str = "none"  # "upstream", "local", "local_partial" or "none"
    # Of the prompt tokens, those read from the provider's prompt cache (OpenAI's
    # prompt_tokens_details.cached_tokens, Anthropic's cache_read_input_tokens) and those
    # written to it (Anthropic's cache_creation_input_tokens); None when not reported.
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None

    def set_from_upstream(self, data: dict[str, Any]) -> None:
        """Record an upstream usage object (the latest value wins; vLLM sends running totals)."""
        prompt, completion = data.get("prompt_tokens"), data.get("completion_tokens")
        if isinstance(prompt, int):
            self.prompt_tokens = prompt
        if isinstance(completion, int):
            self.completion_tokens = completion
        total = data.get("total_tokens")
        if isinstance(total, int):
            self.total_tokens = total
        elif self.prompt_tokens is not None and self.completion_tokens is not None:
            self.total_tokens = self.prompt_tokens + self.completion_tokens
        details = data.get("prompt_tokens_details")
        if isinstance(details, dict):
            cached, written = (
                details.get("cached_tokens"),
                details.get("cache_creation_input_tokens"),
            )
            if isinstance(cached, int) and not isinstance(cached, bool):
                self.cached_tokens = cached
            if isinstance(written, int) and not isinstance(written, bool):
                self.cache_write_tokens = written
        self.source = "upstream"


class LocalCount(Protocol):
    """Token counts made in the gateway while a request runs (the `token_count` plugin's).

    Published under `LOCAL_COUNT` so the core can report them to a client whose upstream
    sends no usage, without importing a plugin; always current when read.
    """

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the prompt (final once `on_request` ran)."""
        ...

    @property
    def completion_tokens(self) -> int:
        """Tokens streamed so far."""
        ...

    @property
    def exact(self) -> bool:
        """True if counted with the model's own tokenizer and nothing was estimated."""
        ...


LOCAL_COUNT: StateKey[LocalCount] = StateKey("local_count")


class StreamLatency(Protocol):
    """A stream's latency as measured where events leave the chain (the `latency` plugin's).

    Published under `STREAM_LATENCY`; the core's time-to-first-token and GenAI metrics use
    it when present, else the first and last events written. Final once `on_end` ran.
    """

    @property
    def ttft(self) -> float | None:
        """Request received to the first event carrying generated text (None: no text)."""
        ...

    @property
    def time_per_output_token(self) -> float | None:
        """Mean seconds per output token after the first."""
        ...


STREAM_LATENCY: StateKey[StreamLatency] = StateKey("stream_latency")


@dataclass(slots=True)
class Timing:
    """Monotonic timestamps (seconds, `time.perf_counter()`); None until reached."""

    received: float = field(default_factory=time.perf_counter)
    upstream_headers: float | None = None
    first_upstream_event: float | None = None
    response_started: float | None = None
    first_event_written: float | None = None
    last_event_written: float | None = None
    ended: float | None = None


@dataclass(slots=True)
class Identity:
    """Who sent the request. Anonymous when auth is `none`."""

    team: str = "anonymous"
    key_id: str | None = None


_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_from(header: str | None) -> str:
    """Keep a client's X-Request-Id if it is sane, else generate one."""
    if header and _SANE_REQUEST_ID.fullmatch(header):
        return header
    return f"req_{uuid.uuid4().hex}"


def upstream_request_id(request_id: str) -> str:
    """`request_id` as the UUID sent upstream (servers such as llama-cpp-python's refuse
    any other X-Request-Id).

    A generated `req_<hex>` is its UUID with dashes; a client's id that is a UUID stays that
    UUID; any other id maps to a fixed version-4-shaped UUID derived from it, so one id always
    gives the same upstream id. The access log records both.
    """
    try:
        return str(uuid.UUID(request_id.removeprefix("req_")))
    except ValueError:
        digest = hashlib.sha256(request_id.encode()).digest()[:16]
        return str(uuid.UUID(bytes=digest, version=4))


@dataclass(slots=True, eq=False)
class RequestContext:
    """Everything known about one request, from arrival to its single end."""

    request_id: str
    endpoint: Endpoint
    client_format: str = "openai"  # the client's wire format: openai, anthropic or responses
    # The format of the bodies and events the chain sees: "openai" (the core), or the
    # client's own on a native lane ("anthropic"); see gateway.protocols.lanes.
    wire: str = "openai"
    body: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    stream: bool = False
    route: RouteConfig | None = None
    upstream_name: str | None = None  # the deployment that served (or last tried) the request
    upstream_model: str | None = None  # the model name that deployment was sent
    response_model: str | None = None  # the model the upstream said answered, where it said
    upstream_request_id: str | None = None  # the id sent upstream (None: no header sent)
    retries: int = 0  # attempts after the first (only ever before a byte reached the client)
    identity: Identity = field(default_factory=Identity)
    timing: Timing = field(default_factory=Timing)
    usage: Usage = field(default_factory=Usage)
    status: int = 200
    outcome: Outcome | None = None
    error: GatewayError | None = None
    events_in: int = 0
    events_out: int = 0
    overhead_seconds: float = 0.0  # gateway time, not waiting on upstream, queue or client
    plugin_seconds: dict[str, float] = field(default_factory=dict)  # on_event time per plugin
    bytes_out: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    _state: dict[StateKey[Any], Any] = field(default_factory=dict, repr=False)

    @property
    def api(self) -> str:
        """The API the client called, for logs: `messages` for /v1/messages, `responses`
        for /v1/responses, else the endpoint."""
        if self.client_format == "anthropic":
            return "messages"
        return "responses" if self.client_format == "responses" else self.endpoint.value

    @overload
    def get(self, key: StateKey[T], default: None = None) -> T | None: ...

    @overload
    def get(self, key: StateKey[T], default: T) -> T: ...

    def get(self, key: StateKey[T], default: T | None = None) -> T | None:
        """A plugin's state for this request, or `default` (None if not given)."""
        return cast("T | None", self._state.get(key, default))

    def set(self, key: StateKey[T], value: T) -> None:
        """Store a plugin's state for this request."""
        self._state[key] = value

    def require(self, key: StateKey[T]) -> T:
        """A plugin's state that must exist (KeyError names the key otherwise)."""
        try:
            return cast(T, self._state[key])
        except KeyError:
            raise KeyError(key.name) from None
