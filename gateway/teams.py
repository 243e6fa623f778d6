"""Config models for teams and API keys (`auth`, `teams`), validated with the rest at start-up.

Keys are never stored: each key's SHA-256 (hex) is given inline, through `${VAR}`
expansion, or in a mounted secret file (`sha256_file`, read when the config is loaded).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""Team and key names: they make up key ids (`team/key`), env var names and file names."""

_NAME_RE: Final = re.compile(NAME_PATTERN)
_HEX_DIGEST_RE: Final = re.compile(r"[0-9a-f]{64}")
_MAX_HASH_FILE_BYTES: Final = 4096
_HASH_HINT: Final = "the hex SHA-256 of the key (64 characters, as printed by `sluice keys new`)"

AuthMode = Literal["none", "keys"]


# ----- config models ---------------------------------------------------------------------


Money = Annotated[
    Decimal,
    Field(gt=0, decimal_places=6, allow_inf_nan=False, description="in the pricing currency"),
]


class LimitsConfig(_Strict):
    """Rate limits; every one is optional (unset: no limit at this level).

    `cost_per_day` / `cost_per_month` are budgets in the pricing currency (`pricing:`),
    in UTC calendar windows like the token budgets.
    """

    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    concurrent_streams: PositiveInt | None = None
    tokens_per_day: PositiveInt | None = None
    tokens_per_month: PositiveInt | None = None
    cost_per_day: Money | None = None
    cost_per_month: Money | None = None

    @property
    def has_cost(self) -> bool:
        """Whether a budget in currency is set."""
        return self.cost_per_day is not None or self.cost_per_month is not None


def _normalise_digest(text: str) -> str | None:
    """The lower-case hex digest in `text` (whitespace stripped), or None if it is not one."""
    digest = text.strip().lower()
    return digest if _HEX_DIGEST_RE.fullmatch(digest) else None


def _read_digest_file(path: Path) -> str:
    """The hex digest a secret file holds; ValueError naming the file (never its content)."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_HASH_FILE_BYTES + 1)
    except OSError as err:
        raise ValueError(f"sha256_file: cannot read {path}: {err.strerror or err}") from None
    digest = None
    if len(raw) <= _MAX_HASH_FILE_BYTES:
        try:
            digest = _normalise_digest(raw.decode("ascii"))
        except UnicodeDecodeError:
            digest = None
    if digest is None:
        raise ValueError(f"sha256_file: {path} does not hold {_HASH_HINT}")
    return digest


def _check_model_pattern(pattern: str) -> str:
    if not pattern or pattern != pattern.strip():
        raise ValueError("model names must be non-empty, without surrounding spaces")
    if "*" in pattern[:-1]:
        raise ValueError(f"{pattern!r}: only a trailing `*` is supported (e.g. 'openai/*')")
    return pattern


class KeyConfig(_Strict):
    """One API key of a team: its hash (never the key), expiry, models and limits."""

    name: str = Field(pattern=NAME_PATTERN, description="unique within the team")
    sha256: SecretStr | None = Field(
        None, description="hex SHA-256 of the key (inline or `${ENV_VAR}`)"
    )
    sha256_file: Path | None = Field(
        None, description="a file holding the hex SHA-256 (a mounted secret), read at start-up"
    )
    expires: datetime | None = Field(
        None,
        description="UTC; a bare date means 00:00 UTC that day (the key stops working then)",
    )
    models: list[str] | None = Field(
        None,
        min_length=1,
        description="route names, aliases or prefix patterns ('openai/*'); unset: every model",
    )
    limits: LimitsConfig | None = None

    _digest: bytes = PrivateAttr(b"")

    @field_validator("sha256", mode="before")
    @classmethod
    def _normalise_sha256(cls, value: Any) -> Any:
        if isinstance(value, str):
            digest = _normalise_digest(value)
            if digest is None:
                hint = " (this looks like a key, not its hash)" if value.startswith("sk-") else ""
                raise ValueError(f"must be {_HASH_HINT}{hint}")  # never echo the value
            return digest
        return value

    @field_validator("expires", mode="before")
    @classmethod
    def _parse_expiry(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            try:
                value = (
                    date.fromisoformat(text) if len(text) <= 10 else datetime.fromisoformat(text)
                )
            except ValueError:
                raise ValueError(
                    "expected an ISO date (2025-12-31) or date-time (2025-12-31T18:00:00Z)"
                ) from None
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if isinstance(value, date):
            return datetime(value.year, value.month, value.day, tzinfo=UTC)
        return value

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for pattern in value:
                _check_model_pattern(pattern)
        return value

    @model_validator(mode="after")
    def _load_digest(self) -> KeyConfig:
        if (self.sha256 is None) == (self.sha256_file is None):
            raise ValueError("give exactly one of `sha256` and `sha256_file`")
        if self.sha256 is not None:
            hex_digest = self.sha256.get_secret_value()
        else:
            assert self.sha256_file is not None
            hex_digest = _read_digest_file(self.sha256_file)
        self._digest = bytes.fromhex(hex_digest)
        return self

    @property
    def digest(self) -> bytes:
        """The 32-byte SHA-256 of the key, from `sha256` or `sha256_file`."""
        return self._digest


class TeamConfig(_Strict):
    """A team: its fair-share weight, its limits and its keys."""

    weight: float = Field(
        1.0, gt=0, le=1_000_000, allow_inf_nan=False, description="fair-share weight in queues"
    )
    limits: LimitsConfig = LimitsConfig()
    model_limits: dict[str, LimitsConfig] = Field(
        default_factory=dict, description="per route name or alias, on top of `limits`"
    )
    keys: list[KeyConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_key_names(self) -> TeamConfig:
        first: dict[str, int] = {}
        for i, key in enumerate(self.keys):
            if key.name in first:
                raise ValueError(
                    f"keys[{i}].name: {key.name!r} is already used by keys[{first[key.name]}]"
                )
            first[key.name] = i
        return self


def infer_auth_mode(data: Any) -> Any:
    """`mode="before"` step: a config with keys under `teams` but no `auth` gets `auth: keys`.

    Leaving out `auth` must never leave configured keys unchecked.
    """
    if not isinstance(data, dict) or "auth" in data:
        return data
    teams = data.get("teams")
    if isinstance(teams, dict) and any(
        isinstance(team, dict) and team.get("keys") for team in teams.values()
    ):
        return {**data, "auth": "keys"}
    return data


def _duplicate_key_problem(teams: Mapping[str, TeamConfig]) -> str | None:
    seen: dict[bytes, str] = {}
    for team_name, team in teams.items():
        for i, key in enumerate(team.keys):
            where = f"teams.{team_name}.keys[{i}]"
            if key.digest in seen:
                return (
                    f"{where}: the same key is already configured as {seen[key.digest]}; "
                    "a key must belong to exactly one team and name"
                )
            seen[key.digest] = where
    return None


def check_auth(auth: AuthMode, teams: Mapping[str, TeamConfig]) -> None:
    """The cross-team rules; ValueError naming the config path of the first problem."""
    for team_name in teams:
        if not _NAME_RE.fullmatch(team_name):
            raise ValueError(
                f"teams.{team_name}: team names are 1 to 64 characters among A-Z a-z 0-9 . _ - "
                "and start with a letter or digit"
            )
    has_keys = any(team.keys for team in teams.values())
    if auth == "keys" and not has_keys:
        raise ValueError("auth: `keys` needs at least one team with a key under `teams`")
    if auth == "none" and has_keys:
        raise ValueError(
            "auth: `none` would leave the keys under `teams` unchecked; "
            "set `auth: keys` (or remove the keys)"
        )
    problem = _duplicate_key_problem(teams)
    if problem is not None:
        raise ValueError(problem)


def first_cost_limits(teams: Mapping[str, TeamConfig]) -> str | None:
    """The config location of the first cost budget set in `teams`, or None."""
    for name, team in teams.items():
        if team.limits.has_cost:
            return f"teams.{name}.limits"
        for model, limits in team.model_limits.items():
            if limits.has_cost:
                return f"teams.{name}.model_limits.{model}"
        for i, key in enumerate(team.keys):
            if key.limits is not None and key.limits.has_cost:
                return f"teams.{name}.keys[{i}].limits"
    return None
