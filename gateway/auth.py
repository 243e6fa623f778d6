"""Teams and API keys: config models, key hashing, and the key store that authenticates.

Keys are never stored: the config holds the SHA-256 of each key (hex), given inline,
through `${VAR}` expansion, or in a mounted secret file (`sha256_file`, read at start-up).
A presented key is hashed and looked up by its hash (see `KeyStore.authenticate`).

Nothing in this module logs, and no key reaches an error message, a response or a repr
(an unknown key is echoed only in OpenAI's masked form, `sk-...abcd`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from gateway.context import Identity, StateKey
from gateway.errors import GatewayError
from gateway.teams import (
    _NAME_RE,
    LimitsConfig,
    TeamConfig,
    _duplicate_key_problem,
)

if TYPE_CHECKING:
    from gateway.config import RouteConfig

_MASK_SAFE_RE: Final = re.compile(r"[A-Za-z0-9._~+/=-]+")


PRINCIPAL: StateKey[Principal] = StateKey("principal")
"""The authenticated key's principal (limits, weight), in the request context; unset with
`auth: none`."""


# ----- keys ------------------------------------------------------------------------------


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as stored in the config."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key(prefix: str = "sk-sluice-") -> tuple[str, str]:
    """A fresh key (32 random bytes, URL-safe base64, after `prefix`) and its hex SHA-256."""
    key = prefix + secrets.token_urlsafe(32)
    return key, hash_key(key)


def mask_key(key: str) -> str:
    """OpenAI's masked echo of a key: first 3 + '...' + last 4, or '' for short or odd keys."""
    if len(key) < 12 or not _MASK_SAFE_RE.fullmatch(key):
        return ""
    return f"{key[:3]}...{key[-4:]}"


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The key in `Authorization: Bearer <key>` or else `x-api-key: <key>` (Anthropic clients).

    Header names and the `Bearer` scheme are case-insensitive; surrounding spaces are
    ignored. An `Authorization` header with another scheme is skipped, not an error.
    """
    authorization: str | None = None
    api_key: str | None = None
    for name, value in headers.items():
        lowered = name.lower()
        if lowered == "authorization" and authorization is None:
            authorization = value
        elif lowered == "x-api-key" and api_key is None:
            api_key = value
    if authorization is not None:
        parts = authorization.split(None, 1)
        if len(parts) == 2 and parts[0].lower() == "bearer" and parts[1].strip():
            return parts[1].strip()
    if api_key is not None and api_key.strip():
        return api_key.strip()
    return None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a key belongs to, and what it may do; one per configured key, shared by requests."""

    team: str
    key_id: str  # "team/keyname": safe to log
    weight: float
    team_limits: LimitsConfig
    key_limits: LimitsConfig | None
    model_limits: Mapping[str, LimitsConfig]
    models: tuple[str, ...] | None  # None: every model

    def identity(self) -> Identity:
        """For `RequestContext.identity`."""
        return Identity(team=self.team, key_id=self.key_id)


def model_allowed(patterns: Iterable[str], names: Iterable[str]) -> bool:
    """Whether any name matches any pattern (exact, or a prefix when it ends with `*`)."""
    names = tuple(names)
    for pattern in patterns:
        if pattern.endswith("*"):
            prefix = pattern[:-1]
            if any(name.startswith(prefix) for name in names):
                return True
        elif pattern in names:
            return True
    return False


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _missing_key() -> GatewayError:
    return GatewayError(
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization "
        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or in an x-api-key "
        "header. Ask your gateway operator for a key.",
        code="missing_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _invalid_key(key: str) -> GatewayError:
    masked = mask_key(key)
    shown = f": {masked}" if masked else ""
    return GatewayError(
        401,
        f"Incorrect API key provided{shown}. Check the key, or ask your gateway operator for one.",
        code="invalid_api_key",
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


def _expired_key(expires: datetime) -> GatewayError:
    when = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    return GatewayError(
        401,
        f"The API key provided expired at {when}. Ask your gateway operator for a new one.",
        code="expired_api_key",
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    principal: Principal
    expires: datetime | None


class KeyStore:
    """Authenticates keys against the configured hashes and authorizes models per key."""

    def __init__(
        self, teams: Mapping[str, TeamConfig], *, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        problem = _duplicate_key_problem(teams)
        if problem is not None:
            raise ValueError(problem)
        self._clock = clock
        self._teams = len(teams)
        self._by_digest: dict[bytes, _Entry] = {}
        for team_name, team in teams.items():
            model_limits = MappingProxyType(dict(team.model_limits))
            for key in team.keys:
                principal = Principal(
                    team=team_name,
                    key_id=f"{team_name}/{key.name}",
                    weight=team.weight,
                    team_limits=team.limits,
                    key_limits=key.limits,
                    model_limits=model_limits,
                    models=tuple(key.models) if key.models is not None else None,
                )
                self._by_digest[key.digest] = _Entry(key.digest, principal, key.expires)

    def __len__(self) -> int:
        return len(self._by_digest)

    def __repr__(self) -> str:
        return f"KeyStore(teams={self._teams}, keys={len(self._by_digest)})"

    def authenticate(self, key: str | None) -> Principal:
        """The principal of a presented key (from `key_from_headers`); 401 GatewayError if none.

        Lookup is a dict lookup by the key's SHA-256, then `hmac.compare_digest` on the hit.
        Timing can only tell an attacker about SHA-256(presented key), which they computed
        themselves; learning which stored hash it shares a bucket or a prefix with would need
        a SHA-256 preimage to turn into a key. So this is as safe as comparing against every
        stored hash in constant time, and O(1) instead of O(keys). The final compare_digest
        keeps the equality check itself constant-time.
        """
        if not key:
            raise _missing_key()
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            raise _invalid_key(key)
        if entry.expires is not None and self._clock() >= entry.expires:
            raise _expired_key(entry.expires)
        return entry.principal

    def allows(self, principal: Principal, model: str, route: RouteConfig | None = None) -> bool:
        """Whether the key's `models` allow `model` (see `authorize`)."""
        if principal.models is None:
            return True
        names = [model]
        if route is not None:
            names += [route.name, *route.aliases]
        return model_allowed(principal.models, names)

    def authorize(self, principal: Principal, model: str, route: RouteConfig | None = None) -> None:
        """403 `model_not_allowed` unless the key's `models` allow `model`.

        With `route` (the resolved route), the route's name and aliases count too, so a key
        allowed `gpt-4o` may use it through its alias, and `openai/*` allows a prefix route.
        """
        if not self.allows(principal, model, route):
            raise GatewayError(
                403,
                f"This API key is not allowed to use the model `{model[:200]}`.",
                type="permission_error",
                code="model_not_allowed",
                param="model",
            )


# ----- CLI -------------------------------------------------------------------------------


def _env_name(team: str, name: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", f"SLUICE_KEY_{team}_{name}".upper())


def cmd_keys_new(team: str, name: str | None = None) -> str:
    """The text `sluice keys new --team T [--name N]` prints; ValueError for a bad name.

    The key appears in it once and is not kept anywhere.
    """
    if name is None:
        name = f"key-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(2)}"
    for what, value in (("team", team), ("name", name)):
        if not _NAME_RE.fullmatch(value):
            raise ValueError(
                f"--{what} {value!r}: use 1 to 64 characters among A-Z a-z 0-9 . _ - "
                "starting with a letter or digit"
            )
    key, digest = new_key()
    env = _env_name(team, name)
    secret_file = f"/etc/sluice/keys/{team}-{name}"
    return "\n".join(
        [
            f"New API key {team}/{name}:",
            "",
            f"    {key}",
            "",
            "Copy it now: it is shown only this once and cannot be recovered",
            "(Sluice keeps only its SHA-256 hash).",
            "",
            f"Add under teams.{team}.keys in the config (and `auth: keys`):",
            "",
            f"    - name: {name}",
            f"      sha256: {digest}",
            "",
            "Or keep the hash out of the config file:",
            f"  environment variable:  sha256: ${{{env}}}",
            f"                         with {env}={digest}",
            f"  secret file:           sha256_file: {secret_file}",
            "                         a file holding just the hash, e.g. from",
            f"                         kubectl create secret generic sluice-keys "
            f"--from-literal={team}-{name}={digest}",
        ]
    )
