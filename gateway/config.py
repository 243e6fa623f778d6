"""Typed gateway configuration: YAML in, validated models out, errors that name the key."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.config_upstreams import (
    DEFAULT_AZURE_API_VERSION,
    UPSTREAM_KINDS,
    AnthropicUpstream,
    AzureUpstream,
    DemoUpstream,
    HttpUpstreamConfig,
    OllamaUpstream,
    OpenAIUpstream,
    Timeouts,
    UpstreamConfig,
    azure_deployment_problem,
)
from gateway.config_yaml import (
    describe_yaml_error,
    expand_env,
    load_yaml,
    placeholder_consequence,
)
from gateway.pricing_config import PriceConfig, PricingConfig
from gateway.protocols.responses.config import ResponsesConfig
from gateway.replay.config import ReplayConfig, RouteReplay
from gateway.teams import AuthMode, TeamConfig, check_auth, first_cost_limits, infer_auth_mode
from gateway.tracing_config import TracingConfig

__all__ = [
    "DEFAULT_AZURE_API_VERSION",
    "UPSTREAM_KINDS",
    "AnthropicUpstream",
    "AzureUpstream",
    "ConfigError",
    "CorsConfig",
    "DemoUpstream",
    "DeploymentConfig",
    "GatewayConfig",
    "HttpUpstreamConfig",
    "MetricsConfig",
    "OllamaUpstream",
    "OpenAIUpstream",
    "PluginConfig",
    "ReloadConfig",
    "ResumableConfig",
    "RouteConfig",
    "ServerConfig",
    "Timeouts",
    "UpstreamConfig",
    "azure_deployment_problem",
    "config_from_tree",
    "config_report",
    "load_config",
    "load_config_tree",
    "located_problems",
    "parse_config",
    "read_config_text",
]


class ConfigError(Exception):
    """The configuration is invalid; the message names the offending key.

    `problems` lists every problem found, one line each (`key.path: what is wrong`); an
    error raised with a message alone has that message as its one problem.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)


def config_report(problems: Sequence[str], source: str | None = None) -> ConfigError:
    """One error listing every problem: `source: invalid configuration:` then a line each."""
    head = "invalid configuration:" if source is None else f"{source}: invalid configuration:"
    return ConfigError(head + "\n  " + "\n  ".join(problems), problems)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginConfig(_Strict):
    """One plugin in the chain: its registered name, its options, and its failure policy."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    fail: Literal["open", "closed"] = Field(
        "open",
        description="open: log and continue when the plugin raises; closed: fail the request",
    )


class DeploymentConfig(_Strict):
    """One place a route's model is served: an upstream and the model name it knows."""

    upstream: str
    upstream_model: str | None = Field(None, description="default: the name the client sent")
    weight: int = Field(1, ge=1, le=1000)


class HealConfig(_Strict):
    """Stream healing on a route: a stream broken mid-answer is continued by a deployment."""

    max_attempts: int = Field(1, ge=1, le=5, description="continuations per stream")
    max_gap_seconds: float = Field(
        10.0, gt=0, description="longest time from the break to the continuation's first event"
    )


class RouteConfig(_Strict):
    """A client-facing model name (or name prefix) served by one or more deployments.

    Short form: `upstream` (+ `upstream_model`). Several deployments: `deployments`, with
    weights and a `strategy`; on connect errors, timeouts before the first byte, 429, 5xx
    and a full upstream queue the next deployment is tried (at most `retries` more attempts,
    2 by default), never after a byte reached the client (see `gateway.attempts`).
    """

    model: str | None = Field(None, min_length=1, description="the name clients send")
    model_prefix: str | None = Field(
        None, min_length=1, description="e.g. 'openai/': the rest of the name goes upstream"
    )
    aliases: list[str] = Field(default_factory=list, description="other names for this route")
    upstream: str | None = None
    upstream_model: str | None = None
    deployments: list[DeploymentConfig] = Field(default_factory=list)
    strategy: Literal["weighted_round_robin", "least_outstanding"] = "weighted_round_robin"
    retries: int = Field(
        2,
        ge=0,
        le=10,
        description="extra attempts before the first byte, on another deployment first",
    )
    plugins: list[PluginConfig] = Field(
        default_factory=list, description="run after the global plugins"
    )
    resumable: bool = Field(
        False, description="every stream on this route can be resumed (see `resumable:`)"
    )
    skip_plugins: list[str] = Field(
        default_factory=list, description="global plugins not run on this route"
    )
    heal: HealConfig | None = Field(
        None, description="continue streams broken mid-answer (true: the defaults)"
    )
    price: PriceConfig | None = Field(
        None, description="this route's price per million tokens, over `pricing.models`"
    )
    replay: RouteReplay | None = Field(
        None, description="true: replay deterministic answers from the cache (see `replay:`)"
    )

    @field_validator("replay", mode="before")
    @classmethod
    def _replay_switch(cls, value: Any) -> Any:
        """`replay: true` is every default; `false` is off."""
        if isinstance(value, bool):
            return {} if value else None
        return value

    @field_validator("heal", mode="before")
    @classmethod
    def _heal_shorthand(cls, value: Any) -> Any:
        if value is True:
            return {}
        return None if value is False else value

    @model_validator(mode="after")
    def _one_of_each(self) -> RouteConfig:
        if (self.model is None) == (self.model_prefix is None):
            raise ValueError("give exactly one of `model` and `model_prefix`")
        if (self.upstream is None) == (not self.deployments):
            raise ValueError("give exactly one of `upstream` and `deployments`")
        if self.deployments and self.upstream_model is not None:
            raise ValueError("`upstream_model` goes on each deployment when `deployments` is used")
        return self

    @property
    def name(self) -> str:
        """How the route is known in logs and metrics: its model, or its prefix plus `*`."""
        return self.model if self.model is not None else f"{self.model_prefix}*"

    @property
    def all_deployments(self) -> list[DeploymentConfig]:
        """The short form as one deployment, or the configured list."""
        if self.upstream is not None:
            return [DeploymentConfig(upstream=self.upstream, upstream_model=self.upstream_model)]
        return self.deployments

    @property
    def target_model(self) -> str:
        """The model name sent upstream by a single-deployment exact route."""
        return self.upstream_model or self.model or ""


class MetricsConfig(_Strict):
    """Prometheus metrics at GET /metrics (see docs/metrics.md)."""

    enabled: bool = True
    port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="null: served on the main port; else a separate listener on this port "
        "(same host; 0 picks a free one)",
    )
    require_admin_key: bool = Field(
        False, description="scrapes need server.admin_key (Bearer or X-Admin-Key)"
    )
    genai_semconv: bool = Field(
        False,
        description="also export the OpenTelemetry GenAI histograms (gen_ai_client_token_usage, "
        "gen_ai_server_*) under the names Envoy AI Gateway uses",
    )


_ORIGIN_RE: Final = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


class CorsConfig(_Strict):
    """Cross-origin requests from browsers (see docs/security.md); off while allow_origins is
    empty. `*` allows any origin, but never together with credentials."""

    allow_origins: list[str] = Field(
        default_factory=list, description="exact origins, e.g. https://app.example.com, or '*'"
    )
    allow_methods: list[str] = Field(default_factory=lambda: ["GET", "POST"])
    allow_headers: list[str] = Field(
        default_factory=lambda: [
            "Authorization",
            "Content-Type",
            "X-Api-Key",
            "X-Request-Id",
            "Anthropic-Version",
            "OpenAI-Organization",
            "OpenAI-Project",
        ],
        description="request headers a browser may send ('*': any, without credentials)",
    )
    expose_headers: list[str] = Field(
        default_factory=lambda: [
            "X-Request-Id",
            "x-sluice-overhead-ms",
            "Retry-After",
            "x-should-retry",
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
        description="response headers a browser script may read",
    )
    allow_credentials: bool = Field(
        False, description="let browsers send cookies/HTTP auth (needs exact origins)"
    )
    max_age: int = Field(600, ge=0, le=86400, description="seconds a preflight may be cached")

    @model_validator(mode="after")
    def _check(self) -> CorsConfig:
        for i, origin in enumerate(self.allow_origins):
            if origin != "*" and not _ORIGIN_RE.fullmatch(origin):
                raise ValueError(
                    f"allow_origins[{i}]: {origin!r} is not an origin "
                    "(scheme://host[:port], no path or trailing slash) or '*'"
                )
        if self.allow_credentials and "*" in self.allow_origins + self.allow_headers:
            raise ValueError("allow_credentials: cannot be combined with '*'; list the origins")
        return self


class ReloadConfig(_Strict):
    """Config reload in place (see docs/reload.md); SIGHUP always reloads."""

    watch: bool = Field(
        False,
        description="also reload when the config file's content changes (a mounted ConfigMap)",
    )
    interval_seconds: float = Field(
        5.0, gt=0, le=3600, description="how often the watched file is read and hashed"
    )


class ServerConfig(_Strict):
    """Listener and request-handling limits."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 << 20, ge=1024)
    max_line_bytes: int = Field(1 << 20, ge=1024, description="longest SSE line from an upstream")
    max_event_bytes: int = Field(4 << 20, ge=1024, description="largest SSE event from an upstream")
    max_response_bytes: int = Field(
        64 << 20, ge=1024, description="largest non-streaming upstream body"
    )
    drain_seconds: float = Field(
        30.0, ge=0, description="on SIGTERM: how long in-flight streams may run before they are cut"
    )
    admin_key: SecretStr | None = Field(
        None, description="key for /admin endpoints (Bearer or X-Admin-Key); unset: disabled"
    )
    header_hold_seconds: float = Field(
        2.0,
        ge=0,
        description="how long to wait for the first upstream event before sending 200 headers",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="json: every server log line (start-up, shutdown, warnings) a JSON object "
        "on stdout, next to the access log's",
    )
    metrics: MetricsConfig = MetricsConfig()
    cors: CorsConfig = CorsConfig()
    public_models: bool = Field(
        False,
        description="GET /v1/models answers without a key (and lists every model) even when "
        "keys are configured; default: it needs a key and lists what that key may use",
    )
    playground: bool | None = Field(
        None,
        description="the browser page at GET /playground (GET / redirects to it); null: on for "
        "the embedded demo (no config file), off for a config file",
    )
    reload: ReloadConfig = ReloadConfig()

    @model_validator(mode="after")
    def _check_metrics(self) -> ServerConfig:
        if self.metrics.enabled and self.metrics.require_admin_key and self.admin_key is None:
            raise ValueError("metrics.require_admin_key: needs server.admin_key to be set")
        if self.metrics.enabled and self.metrics.port and self.metrics.port == self.port:
            raise ValueError("metrics.port: must differ from server.port (null: use the main port)")
        return self


class ResumableConfig(_Strict):
    """Resumable streams: events keep ids, a dropped client can reconnect and catch up."""

    enabled: bool = Field(
        True, description="honour the X-Sluice-Resumable request header (routes opt in anyway)"
    )
    grace_seconds: float = Field(
        30.0, gt=0, description="how long generation goes on with no client attached"
    )
    retention_seconds: float = Field(
        60.0, ge=0, description="how long a finished stream can still be replayed"
    )
    max_bytes: int = Field(
        4 << 20, ge=4096, description="per stream; older events are dropped past it"
    )
    redis_url: SecretStr | None = Field(
        None, description="redis://host:6379/0: share stream logs between replicas"
    )
    key_prefix: str = Field("sluice:stream:", min_length=1)


class GatewayConfig(_Strict):
    """The whole configuration file."""

    server: ServerConfig = ServerConfig()
    auth: AuthMode = Field(
        "none", description="none: no keys (local use); keys: every request needs one"
    )
    teams: dict[str, TeamConfig] = Field(default_factory=dict)
    upstreams: dict[str, UpstreamConfig]
    routes: list[RouteConfig] = Field(min_length=1)
    plugins: list[PluginConfig] = Field(default_factory=list)
    resumable: ResumableConfig = ResumableConfig()
    tracing: TracingConfig = TracingConfig()
    pricing: PricingConfig | None = Field(
        None, description="the price table (see docs/costs.md); unset: costs are not computed"
    )
    responses: ResponsesConfig = ResponsesConfig()
    replay: ReplayConfig = ReplayConfig()

    @model_validator(mode="before")
    @classmethod
    def _infer_auth(cls, data: Any) -> Any:
        return infer_auth_mode(data)

    @model_validator(mode="after")
    def _check_auth(self) -> GatewayConfig:
        check_auth(self.auth, self.teams)
        return self

    @model_validator(mode="after")
    def _check_limits_enforced(self) -> GatewayConfig:
        """Limits are enforced by the `rate_limit` plugin: refuse limits nothing enforces."""
        where = _first_limits(self.teams)
        enabled = any(p.name == "rate_limit" for p in self.plugins) or any(
            p.name == "rate_limit" for route in self.routes for p in route.plugins
        )
        if where is not None and not enabled:
            raise ValueError(
                f"{where}: limits are set but nothing enforces them; add the rate_limit "
                "plugin to `plugins` (`- name: rate_limit`), or remove the limits"
            )
        where = first_cost_limits(self.teams)
        if where is not None and not self.priced:
            raise ValueError(
                f"{where}: cost limits need a price table; add `pricing:` (see docs/costs.md)"
            )
        return self

    @property
    def priced(self) -> bool:
        """Whether costs are computed: a `pricing:` block, or a route with a `price:`."""
        return self.pricing is not None or any(route.price is not None for route in self.routes)

    @field_validator("routes")
    @classmethod
    def _check_references(cls, routes: list[RouteConfig], info: ValidationInfo) -> Any:
        # A field validator, so it runs even when another section (plugins, server) is
        # invalid; the upstreams are checked only when they validated themselves.
        upstreams = info.data.get("upstreams")
        seen: set[str] = set()
        known = ", ".join(sorted(upstreams or {})) or "none"
        for i, route in enumerate(routes):
            for j, deployment in enumerate(route.all_deployments):
                if upstreams is not None and deployment.upstream not in upstreams:
                    where = (
                        f"routes[{i}].upstream"
                        if route.upstream
                        else (f"routes[{i}].deployments[{j}].upstream")
                    )
                    raise ValueError(
                        f"{where}: unknown upstream {deployment.upstream!r} (known: {known})"
                    )
            for name in [route.name, *route.aliases]:
                if name in seen:
                    key = "model" if name == route.name else "aliases"
                    raise ValueError(f"routes[{i}].{key}: {name!r} is routed twice")
                seen.add(name)
        return routes


def _first_limits(teams: Mapping[str, TeamConfig]) -> str | None:
    """The config location of the first limit set in `teams`, or None if there is none."""
    for name, team in teams.items():
        if team.limits.model_dump(exclude_none=True):
            return f"teams.{name}.limits"
        for model, limits in team.model_limits.items():
            if limits.model_dump(exclude_none=True):
                return f"teams.{name}.model_limits.{model}"
        for i, key in enumerate(team.keys):
            if key.limits is not None and key.limits.model_dump(exclude_none=True):
                return f"teams.{name}.keys[{i}].limits"
    return None


def _format_loc(loc: tuple[int | str, ...], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in UPSTREAM_KINDS and out.count(".") >= 1 and out.startswith("upstreams"):
            continue  # discriminator tag that pydantic adds; not a key the user wrote
        else:
            out += f".{part}" if out else part
    return out


def located_problems(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """Pydantic's errors as (key path, `key.path: message`) in the config's own terms.

    `prefix` is where the validated object sits in the file (`plugins[2].options`).
    """
    lines = []
    for item in err.errors():
        loc = _format_loc(item["loc"], prefix)
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        elif item["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = f"{loc}.kind"
            ctx = item.get("ctx") or {}
            found = ctx.get("tag")
            known = ", ".join(UPSTREAM_KINDS)
            msg = (
                f"unknown kind {found!r} (known: {known})"
                if found
                else f"required (one of: {known})"
            )
        elif msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
            if msg.startswith((loc + ".", loc + "[")) and ": " in msg:  # it names the key
                loc, msg = msg.split(": ", 1)
        lines.append((loc, f"{loc}: {msg}" if loc else msg))
    return lines


def parse_config(data: Any, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Validate an already-loaded YAML tree; raises ConfigError naming every bad key.

    Missing environment variables are reported together with the validation errors (but
    not the errors their unexpanded placeholders cause).
    """
    if not isinstance(data, dict):
        raise config_report(["the top level must be a mapping"])
    expanded, missing = expand_env(data, env)
    try:
        config = GatewayConfig.model_validate(expanded)
    except ValidationError as err:
        problems = [
            line
            for loc, line in located_problems(err)
            if not placeholder_consequence(loc, line, missing)
        ]
        raise config_report([*missing.values(), *problems]) from None
    if missing:
        raise config_report(list(missing.values()))
    return config


def read_config_text(path: Path | None) -> tuple[str, str]:
    """The text of `path` (or of the embedded default) and how to name it in errors."""
    if path is None:
        text = resources.files("gateway").joinpath("default_config.yaml").read_text("utf-8")
        return text, "<embedded default>"
    try:
        return path.read_text("utf-8"), str(path)
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read {path}: it is not UTF-8 text") from None


def load_config_tree(text: str, source: str) -> Any:
    """The YAML tree of a config file; ConfigError naming file, line and column if invalid."""
    try:
        return load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(describe_yaml_error(err, source)) from None


def config_from_tree(
    data: Any, source: str, env: Mapping[str, str] | None = None, *, embedded: bool = False
) -> GatewayConfig:
    """Validate the YAML tree of `source`; ConfigError naming the file and every bad key.

    `server.playground: null` means automatic: on for the `embedded` default, off for a file.
    """
    try:
        config = parse_config(data, env)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}", err.problems) from None
    if embedded and config.server.playground is None:
        server = config.server.model_copy(update={"playground": True})
        config = config.model_copy(update={"server": server})
    return config


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Load a YAML file, or the embedded default (the demo model, no keys) when `path` is None.

    `server.playground: null` means automatic: the embedded default turns it on; a file that
    does not set it keeps it off.
    """
    text, source = read_config_text(path)
    return config_from_tree(load_config_tree(text, source), source, env, embedded=path is None)
