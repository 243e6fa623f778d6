"""Rate limits per team, per key and per team+model, shared across replicas through Redis.

Limits (all optional, per :class:`Scope`): requests per minute (RPM), tokens per minute
(TPM), concurrent streams, and token budgets per UTC day and per UTC month.

Lifecycle of one request (token limits must hold for streams):

1. ``admit(scopes, tokens)`` -- RESERVE. Every limit of every scope is checked in one
   atomic step, all-or-nothing: RPM consumes 1 request, TPM and budgets reserve ``tokens``
   (prompt tokens counted locally + ``max_tokens``, or a configured default; see
   :func:`reservation`), concurrency takes a slot under a lease that expires. If any
   limit denies, nothing is consumed and the :class:`Decision` names that limit.
2. ``debit(lease, n)`` -- optional DEBIT while the stream runs, in batches. Tokens past
   the reservation are charged at once; returns False when a budget of the lease is
   exhausted (used > limit), so a hard budget can cut the stream. Also renews the lease.
3. ``finish(lease, actual)`` -- RECONCILE with the upstream's usage and RELEASE: the
   difference between what was charged and ``actual`` is refunded (actual < reserved) or
   charged (actual > reserved; never denied after the fact, counters may go over), and the
   concurrency slot is released. Call it on every ending; it is idempotent and never
   raises. Await any pending ``debit`` of the lease first (never run them concurrently).
   Budget corrections go to the window charged at admission; once it has ended they are
   dropped.

Algorithms
----------
RPM and TPM use GCRA (the generic cell rate algorithm), which is a token bucket stored as
one number: the theoretical arrival time (TAT). For a limit of N per minute each unit
(request or token) has an emission interval T = 60 s / N. A request of cost c is allowed
iff ``max(TAT, now) + c*T - now <= 60 s``; if so TAT becomes that value. The burst
capacity is therefore exactly the limit: starting idle, a burst of N+1 requests against a
limit of N lets exactly N through, and one more unit becomes available every T after
that. A request costing more than N can never fit and is denied with
``too_large=True`` (kind "tokens", or "budget" for a budget), never queued. A refund
moves TAT back by c*T, not below now. TAT is kept exactly as integer microseconds plus a
remainder in 1/N microseconds, so there is no floating-point drift (limits up to 1e8 per
minute are exact).

Budgets are fixed calendar windows in UTC (day: midnight to midnight, month: the 1st to
the 1st) with one counter per window that expires shortly after the window ends.

Concurrency is a set of held leases (Redis: a sorted set scored by expiry); expired
leases are dropped before counting, so the slots of a crashed replica come back after
``lease_ttl``. ``finish`` removes the lease; ``debit`` renews it for long streams.

Backends
--------
:class:`~plugins.rate_limit.memory.MemoryRateLimiter` (one replica) and
:class:`~plugins.rate_limit.redis_backend.RedisRateLimiter` (several replicas)
implement the same semantics: the memory one is written to mirror the Lua scripts
line by line, and the test-suite runs against both. The Redis one does one EVALSHA per
admit, per debit that has to touch Redis and per finish; every key it writes has a TTL.
``now`` is passed to the scripts as an argument (not Redis TIME): replicas must have
synchronised clocks (NTP), and tests control time.

When Redis is down or slow (each call is bounded by ``timeout``), the limiter fails open
(admits, with a degraded lease that ``finish`` still tries to account) or closed (denies
with kind "backend") by configuration; failures are counted in ``failures``, ``failing``
tells whether the backend is currently failing, and one log line is written when it
starts failing and one when it recovers.

A slot must not outlive its request: the lease id is made here, before the call, so an
admission that timed out or was cancelled (whose script may have run) is finished in the
background, and a release that failed is retried (``RELEASE_RETRIES``) in a task the
limiter holds; ``close`` waits for those. ``start`` connects and loads the scripts
before the first request.

Redis keys (``prefix`` default ``sluice:rl:``): ``s:<scope>:rpm`` / ``:tpm`` (TAT as
"us:rem"), ``s:<scope>:conc`` (sorted set), ``s:<scope>:bd:<YYYYMMDD>`` /
``s:<scope>:bm:<YYYYMM>`` (counters), ``lease:<id>`` (admission marker), ``done:<id>``
(finished-lease mark, two minutes: a retried release or a late admission is a no-op).
Scope names are sanitised (percent-encoding outside a safe set, hashed when long). A
request touches keys of several scopes in one script, so Redis Cluster needs a hash tag
in ``prefix``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Decision",
    "Lease",
    "Limits",
    "RateLimiter",
    "Scope",
    "key_scope",
    "openai_reset",
    "reservation",
    "team_model_scope",
    "team_scope",
]

PERIOD_US = 60_000_000  # one minute: the period of RPM and TPM
CONCURRENCY_RETRY_AFTER = 1.0  # seconds suggested to a client denied a concurrency slot
BACKEND_RETRY_AFTER = 1.0  # seconds suggested when failing closed
BUDGET_GRACE_MS = 60_000  # budget counters outlive their window by this much
_US = 1_000_000

# Check codes shared by the Lua scripts and the memory mirror.
_GCRA, _CONC, _BUDGET = "g", "c", "b"
# Per-check statuses.
_DENIED, _OK, _TOO_LARGE = 0, 1, 2


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class Limits:
    """The limits of one scope; None means unlimited. All values must be >= 1."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "requests_per_minute",
            "tokens_per_minute",
            "concurrent_streams",
            "tokens_per_day",
            "tokens_per_month",
        ):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, not {value!r}")


@dataclass(frozen=True)
class Scope:
    """A named bucket of limits: "team:ml", "key:ml/ci", "team:ml|model:gpt-4o".

    Build names with :func:`team_scope`, :func:`key_scope` and :func:`team_model_scope`
    so that :attr:`Decision.scope` can tell which kind of scope denied.
    """

    name: str
    limits: Limits

    @property
    def kind(self) -> str:
        """The kind of scope: "team", "key" or "team_model" (else the name up to ':')."""
        if "|model:" in self.name:
            return "team_model"
        return self.name.split(":", 1)[0]


def team_scope(team: str, limits: Limits) -> Scope:
    """The scope of a whole team."""
    return Scope(f"team:{team}", limits)


def key_scope(team: str, key: str, limits: Limits) -> Scope:
    """The scope of one API key (its name, never the secret) of a team."""
    return Scope(f"key:{team}/{key}", limits)


def team_model_scope(team: str, model: str, limits: Limits) -> Scope:
    """The scope of one team's use of one model."""
    return Scope(f"team:{team}|model:{model}", limits)


def reservation(prompt_tokens: int, max_tokens: int | None, default_max_tokens: int) -> int:
    """Tokens to reserve at admission: the prompt plus the most the completion may use."""
    return max(0, prompt_tokens) + max(0, default_max_tokens if max_tokens is None else max_tokens)


@dataclass(frozen=True)
class _Check:
    """One limit of one scope, planned for one request (shared by both backends)."""

    code: str  # _GCRA | _CONC | _BUDGET
    kind: str  # "requests" | "tokens" | "concurrency" | "budget"
    limit_name: str  # the Limits field
    scope: Scope
    key: str  # storage key, without the backend's prefix
    limit: int
    cost: int
    arg: int = 0  # budget: window end (us); concurrency: retry hint (us)


@dataclass
class Lease:
    """What an admitted request holds until :meth:`RateLimiter.finish`.

    ``charged`` is what the backend has charged to TPM and budgets so far (the reservation
    plus any excess charged by ``debit``); ``consumed`` counts the tokens passed to
    ``debit``. ``degraded`` leases were admitted while the backend was failing open.
    """

    id: str
    scopes: tuple[Scope, ...]
    reserved_tokens: int
    checks: tuple[_Check, ...] = ()
    charged: int = 0
    consumed: int = 0
    degraded: bool = False
    finished: bool = False
    renewed_at: float = 0.0

    @property
    def reconciled(self) -> tuple[_Check, ...]:
        """The checks finish() touches: TPM, concurrency and budgets (not RPM)."""
        return tuple(c for c in self.checks if c.kind != "requests")

    @property
    def budgets(self) -> tuple[_Check, ...]:
        """The daily and monthly budget checks."""
        return tuple(c for c in self.checks if c.code == _BUDGET)

    @property
    def slots(self) -> tuple[_Check, ...]:
        """The concurrency checks (slots the lease holds)."""
        return tuple(c for c in self.checks if c.code == _CONC)


@dataclass
class Decision:
    """The answer to ``admit``.

    ``headers`` carries OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``
    from the most constraining RPM and TPM limit (after this request, if admitted; as
    they stand, if denied); they are filled for admitted requests too, and missing only
    for limits that are not configured and when the backend failed.
    ``kind`` is "requests", "tokens", "concurrency", "budget" or "backend"; ``scope`` is
    "team", "key" or "team_model" (``scope_name`` the full name), ``limit`` the Limits
    field. ``too_large`` means the reservation exceeds the whole limit and can never be
    admitted (``retry_after`` is then 0: do not advise a retry).
    """

    allowed: bool
    kind: str | None
    scope: str | None
    retry_after: float
    headers: dict[str, str]
    lease: Lease | None
    scope_name: str | None = None
    limit: str | None = None
    too_large: bool = False


class RateLimiter(Protocol):
    """Admission, streaming debit and reconciliation of rate limits."""

    failures: int  # backend calls that failed (for metrics)
    failing: bool  # whether the backend is failing now

    async def admit(
        self, scopes: Sequence[Scope], tokens: int, now: float | None = None
    ) -> Decision: ...

    async def debit(self, lease: Lease, tokens: int) -> bool: ...

    async def finish(self, lease: Lease, actual_tokens: int) -> None: ...

    async def close(self) -> None: ...


def openai_reset(seconds: float) -> str:
    """Format a duration the way OpenAI's ``x-ratelimit-reset-*`` headers do.

    Go's ``time.Duration`` style at millisecond precision, rounded up: "20ms", "1s",
    "7.66s", "6m0s", "1h2m3s"; "0s" for zero or less.
    """
    if not seconds > 0:  # also catches NaN
        return "0s"
    if math.isinf(seconds):
        seconds = 365 * 86400.0
    ms = math.ceil(round(seconds * 1000, 6))
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    sec_text = f"{secs}.{ms:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{sec_text}"
    if minutes:
        return f"{minutes}m{sec_text}"
    return sec_text


# --------------------------------------------------------------------------- planning

_SAFE = re.compile(r"[^A-Za-z0-9_.:/@|=+\-]")
_MAX_NAME = 120


def _key_name(name: str) -> str:
    """A scope name made safe for keys: percent-encoded outside a safe set, hashed if long."""
    encoded = _SAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), name)
    if len(encoded) > _MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:32]
        encoded = f"{encoded[:64]}~{digest}"
    return encoded


def _to_us(seconds: float) -> int:
    return round(seconds * _US)


def _windows(now: float) -> tuple[tuple[str, int], tuple[str, int]]:
    """(day id, day end us) and (month id, month end us) of the UTC windows holding now."""
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    day_start = dt.datetime(t.year, t.month, t.day, tzinfo=dt.UTC)
    day_end = day_start + dt.timedelta(days=1)
    month_end = dt.datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=dt.UTC)
    return (
        (f"{t:%Y%m%d}", _to_us(day_end.timestamp())),
        (f"{t:%Y%m}", _to_us(month_end.timestamp())),
    )


def _plan(
    scopes: Sequence[Scope], tokens: int, now: float
) -> tuple[tuple[Scope, ...], list[_Check]]:
    """The checks of one request, in order; scopes deduplicated by name (first wins)."""
    seen: dict[str, Scope] = {}
    for scope in scopes:
        seen.setdefault(scope.name, scope)
    unique = tuple(seen.values())
    (day, day_end), (month, month_end) = _windows(now)
    rows = (
        ("requests_per_minute", _GCRA, "requests", "rpm", 1, 0),
        ("tokens_per_minute", _GCRA, "tokens", "tpm", tokens, 0),
        ("concurrent_streams", _CONC, "concurrency", "conc", 1, _to_us(CONCURRENCY_RETRY_AFTER)),
        ("tokens_per_day", _BUDGET, "budget", f"bd:{day}", tokens, day_end),
        ("tokens_per_month", _BUDGET, "budget", f"bm:{month}", tokens, month_end),
    )
    checks: list[_Check] = []
    for scope in unique:
        base = f"s:{_key_name(scope.name)}"
        for field_name, code, kind, suffix, cost, arg in rows:
            limit: int | None = getattr(scope.limits, field_name)
            if limit is not None:
                key = f"{base}:{suffix}"
                checks.append(_Check(code, kind, field_name, scope, key, limit, cost, arg))
    return unique, checks


_Result = tuple[int, int, int, int]  # status, remaining, reset (us), retry after (us)


def _decide(
    ok: bool, checks: Sequence[_Check], results: Sequence[_Result], lease: Lease | None
) -> Decision:
    """Build the Decision from per-check results (the same for both backends)."""
    headers: dict[str, str] = {}
    for kind, suffix in (("requests", "requests"), ("tokens", "tokens")):
        best: tuple[int, int, _Check] | None = None
        for check, (_, remaining, reset, _) in zip(checks, results, strict=True):
            if check.kind == kind and (best is None or (remaining, -reset) < (best[0], -best[1])):
                best = (remaining, reset, check)
        if best is not None:
            headers[f"x-ratelimit-limit-{suffix}"] = str(best[2].limit)
            headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, best[0]))
            headers[f"x-ratelimit-reset-{suffix}"] = openai_reset(best[1] / _US)
    if ok:
        return Decision(True, None, None, 0.0, headers, lease)
    denied = [(c, r) for c, r in zip(checks, results, strict=True) if r[0] != _OK]
    too_large = [(c, r) for c, r in denied if r[0] == _TOO_LARGE]
    check, result = too_large[0] if too_large else max(denied, key=lambda cr: cr[1][3])
    return Decision(
        allowed=False,
        kind=check.kind,
        scope=check.scope.kind,
        retry_after=0.0 if too_large else max(0, result[3]) / _US,
        headers=headers,
        lease=None,
        scope_name=check.scope.name,
        limit=check.limit_name,
        too_large=bool(too_large),
    )


def _take_debit(lease: Lease, tokens: int) -> int:
    """Add ``tokens`` to the lease's consumption; return the new excess to charge now."""
    lease.consumed += max(0, tokens)
    return max(0, lease.consumed - lease.charged)


def _debit_due(lease: Lease, extra: int, now: float, lease_ttl: float) -> bool:
    """Whether a debit has to reach the store: an excess to charge, a budget to check, or
    a concurrency lease due for renewal (a third of its TTL since the last one)."""
    if lease.degraded or lease.finished:
        return False
    renew = bool(lease.slots) and now - lease.renewed_at >= lease_ttl / 3
    return bool(extra or lease.budgets or renew)
