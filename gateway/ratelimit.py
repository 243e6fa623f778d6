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
:class:`MemoryRateLimiter` (one replica) and :class:`RedisRateLimiter` (several replicas)
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

import asyncio
import datetime as dt
import hashlib
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gateway.redis_pipe import PipelinedRedis, ReplyError, connect_params

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = [
    "Decision",
    "Lease",
    "Limits",
    "MemoryRateLimiter",
    "RateLimiter",
    "RedisRateLimiter",
    "Scope",
    "key_scope",
    "openai_reset",
    "reservation",
    "team_model_scope",
    "team_scope",
]

log = logging.getLogger("sluice.ratelimit")

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
    def _reconciled(self) -> tuple[_Check, ...]:
        """The checks finish() touches: TPM, concurrency and budgets (not RPM)."""
        return tuple(c for c in self.checks if c.kind != "requests")

    @property
    def _budgets(self) -> tuple[_Check, ...]:
        return tuple(c for c in self.checks if c.code == _BUDGET)

    @property
    def _slots(self) -> tuple[_Check, ...]:
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


# --------------------------------------------------------------------------- Lua scripts
#
# Times are integer microseconds. A TAT is "u:r" meaning u + r/limit microseconds, with
# 0 <= r < limit, so that adding c * PERIOD / limit is exact integer arithmetic (every
# intermediate stays below 2^53, where Lua's doubles are exact).

_LUA_COMMON = """
local P = 60000000
local function int(x)
  return string.format('%.0f', x)
end
local function ceil_ms(us)
  local m = math.ceil(us / 1000)
  if m < 1 then m = 1 end
  return int(m)
end
local function get_tat(key)
  local v = redis.call('GET', key)
  if not v then return nil, nil end
  local u, r = string.match(v, '^(%-?%d+):(%d+)$')
  if not u then return nil, nil end
  return tonumber(u), tonumber(r)
end
local function base_tat(key, now)
  local u, r = get_tat(key)
  if u == nil or u < now then return now, 0 end
  return u, r
end
local function shift(u, r, units, limit)
  local num = r + units * P
  return u + math.floor(num / limit), num % limit
end
local function level(u, r, now, limit)
  local remaining = math.floor(((P - (u - now)) * limit - r) / P)
  if remaining < 0 then remaining = 0 end
  if remaining > limit then remaining = limit end
  local reset = u - now
  if r > 0 then reset = reset + 1 end
  return remaining, reset
end
local function put_tat(key, u, r, now)
  if u < now or (u == now and r == 0) then
    redis.call('DEL', key)
  else
    redis.call('SET', key, string.format('%.0f:%.0f', u, r), 'PX', ceil_ms(u - now + 1000000))
  end
end
local function charge_tat(key, units, limit, now)
  if units > 0 then
    local u, r = base_tat(key, now)
    u, r = shift(u, r, units, limit)
    put_tat(key, u, r, now)
  elseif units < 0 then
    local u, r = get_tat(key)
    if u ~= nil and (u > now or (u == now and r > 0)) then
      u, r = shift(u, r, units, limit)
      put_tat(key, u, r, now)
    end
  end
end
local function charge_budget(key, units, window_end, now)
  if units == 0 or window_end <= now then return end
  if units > 0 then
    redis.call('INCRBY', key, int(units))
  elseif redis.call('EXISTS', key) == 1 then
    if redis.call('INCRBY', key, int(units)) < 0 then redis.call('SET', key, '0') end
  else
    return
  end
  redis.call('PEXPIRE', key, ceil_ms(window_end - now + 60000000))
end
"""

# KEYS[1] lease marker, KEYS[1+i] key of check i, KEYS[n+2] the lease's "finished" mark.
# ARGV: now, lease id, lease ttl (us), n, then per check: code, limit, cost, arg.
# Returns {ok, then per check: status, remaining, reset_us, retry_us}; {0} for a lease
# already finished (an admission its caller gave up on, run after its release).
_LUA_ADMIT = (
    _LUA_COMMON
    + """
local now = tonumber(ARGV[1])
local lease_id = ARGV[2]
local ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[n + 2]) == 1 then return {0} end
local ok = 1
local new, res = {}, {}
for i = 1, n do
  local b = 4 + (i - 1) * 4
  local code, limit = ARGV[b + 1], tonumber(ARGV[b + 2])
  local cost, arg = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local key = KEYS[i + 1]
  -- status, retry, then remaining and reset before and after taking this request
  local st, retry, rem0, reset0, rem1, reset1 = 1, 0, 0, 0, 0, 0
  if code == 'g' then
    local u, r = base_tat(key, now)
    local nu, nr = shift(u, r, cost, limit)
    rem0, reset0 = level(u, r, now, limit)
    rem1, reset1 = level(nu, nr, now, limit)
    if cost > limit then
      st = 2
    elseif nu - now > P or (nu - now == P and nr > 0) then
      st = 0
      retry = nu - P - now
      if nr > 0 then retry = retry + 1 end
    else
      new[i] = {nu, nr}
    end
  elseif code == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
    local held = redis.call('ZCARD', key)
    rem0, rem1 = math.max(0, limit - held), math.max(0, limit - held - 1)
    if held >= limit then
      st = 0
      retry = arg
    end
  else
    local used = tonumber(redis.call('GET', key) or '0')
    rem0, rem1 = math.max(0, limit - used), math.max(0, limit - used - cost)
    reset0, reset1 = arg - now, arg - now
    if cost > limit then
      st = 2
    elseif used + cost > limit then
      st = 0
      retry = arg - now
    end
  end
  if st ~= 1 then ok = 0 end
  res[i] = {st, retry, rem0, reset0, rem1, reset1}
end
local out = {ok}
for i = 1, n do
  local x = res[i]
  table.insert(out, x[1])
  if ok == 1 then
    table.insert(out, x[5])
    table.insert(out, x[6])
  else
    table.insert(out, x[3])
    table.insert(out, x[4])
  end
  table.insert(out, x[2])
end
if ok == 1 then
  for i = 1, n do
    local b = 4 + (i - 1) * 4
    local code, cost, arg = ARGV[b + 1], tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
    local key = KEYS[i + 1]
    if code == 'g' then
      put_tat(key, new[i][1], new[i][2], now)
    elseif code == 'c' then
      redis.call('ZADD', key, int(now + ttl), lease_id)
      redis.call('PEXPIRE', key, ceil_ms(ttl + 1000000))
    else
      charge_budget(key, cost, arg, now)
    end
  end
  redis.call('SET', KEYS[1], '1', 'PX', ceil_ms(ttl))
end
return out
"""
)

# KEYS[1] lease marker, KEYS[1+i] key of check i (TPM, concurrency and budgets).
# ARGV: now, lease id, lease ttl (us), extra tokens to charge now, n, then per check:
# code, limit, arg. Renews the lease; returns 0 if a budget is exhausted, else 1.
_LUA_DEBIT = (
    _LUA_COMMON
    + """
local now = tonumber(ARGV[1])
local lease_id = ARGV[2]
local ttl = tonumber(ARGV[3])
local extra = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local ok = 1
redis.call('PEXPIRE', KEYS[1], ceil_ms(ttl))
for i = 1, n do
  local b = 5 + (i - 1) * 3
  local code, limit, arg = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local key = KEYS[i + 1]
  if code == 'g' then
    charge_tat(key, extra, limit, now)
  elseif code == 'c' then
    if redis.call('ZSCORE', key, lease_id) then
      redis.call('ZADD', key, 'XX', int(now + ttl), lease_id)
      redis.call('PEXPIRE', key, ceil_ms(ttl + 1000000))
    end
  elseif arg > now then
    charge_budget(key, extra, arg, now)
    if tonumber(redis.call('GET', key) or '0') > limit then ok = 0 end
  end
end
return ok
"""
)

# KEYS[1] lease marker, KEYS[1+i] key of check i (TPM, concurrency and budgets),
# KEYS[n+2] the lease's "finished" mark (kept for ARGV[7] ms: a retried release, or an
# admission still on its way, then changes nothing).
# ARGV: now, lease id, degraded (0/1), actual, charged, n, mark ttl (ms), then per check:
# code, limit, arg. Returns 1, or 0 when the lease was finished already.
_LUA_FINISH = (
    _LUA_COMMON
    + """
local now = tonumber(ARGV[1])
local lease_id = ARGV[2]
local degraded = ARGV[3] == '1'
local actual, charged = tonumber(ARGV[4]), tonumber(ARGV[5])
local n = tonumber(ARGV[6])
if redis.call('SET', KEYS[n + 2], '1', 'NX', 'PX', ARGV[7]) == false then return 0 end
local landed = redis.call('DEL', KEYS[1]) == 1
local delta = actual - charged
if degraded and not landed then delta = actual end
for i = 1, n do
  local b = 7 + (i - 1) * 3
  local code, limit, arg = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local key = KEYS[i + 1]
  if code == 'g' then
    charge_tat(key, delta, limit, now)
  elseif code == 'c' then
    redis.call('ZREM', key, lease_id)
  else
    charge_budget(key, delta, arg, now)
  end
end
return 1
"""
)


# --------------------------------------------------------------------------- memory backend


def _shift(u: int, r: int, units: int, limit: int) -> tuple[int, int]:
    num = r + units * PERIOD_US
    return u + num // limit, num % limit


def _level(u: int, r: int, now: int, limit: int) -> tuple[int, int]:
    """(remaining units, microseconds until full) of a GCRA state at ``now``."""
    remaining = ((PERIOD_US - (u - now)) * limit - r) // PERIOD_US
    return min(max(remaining, 0), limit), u - now + (1 if r > 0 else 0)


class MemoryRateLimiter:
    """Rate limits for a single replica, in process memory (mirrors the Lua scripts)."""

    _PURGE_EVERY = 1024

    def __init__(self, clock: Callable[[], float] = time.time, *, lease_ttl: float = 600.0) -> None:
        self.clock = clock
        self.lease_ttl = lease_ttl
        self._tats: dict[str, tuple[int, int]] = {}
        self._slots: dict[str, dict[str, int]] = {}  # key -> lease id -> expiry (us)
        self._budgets: dict[str, tuple[int, int]] = {}  # key -> (used, window end us)
        self._leases: dict[str, int] = {}  # lease id -> marker expiry (us)
        self._ops = 0
        self.failures = 0  # never fails; for a uniform interface
        self.failing = False

    # -- the Lua helpers, in Python

    def _get_tat(self, key: str) -> tuple[int, int] | None:
        return self._tats.get(key)

    def _base_tat(self, key: str, now: int) -> tuple[int, int]:
        tat = self._tats.get(key)
        if tat is None or tat[0] < now:
            return now, 0
        return tat

    def _put_tat(self, key: str, u: int, r: int, now: int) -> None:
        if u < now or (u == now and r == 0):
            self._tats.pop(key, None)
        else:
            self._tats[key] = (u, r)

    def _charge_tat(self, key: str, units: int, limit: int, now: int) -> None:
        if units > 0:
            self._put_tat(key, *_shift(*self._base_tat(key, now), units, limit), now)
        elif units < 0:
            tat = self._get_tat(key)
            if tat is not None and (tat[0] > now or (tat[0] == now and tat[1] > 0)):
                self._put_tat(key, *_shift(*tat, units, limit), now)

    def _used(self, key: str, now: int) -> int:
        entry = self._budgets.get(key)
        return entry[0] if entry is not None and entry[1] > now else 0

    def _charge_budget(self, key: str, units: int, window_end: int, now: int) -> None:
        if units == 0 or window_end <= now:
            return
        if units < 0 and key not in self._budgets:
            return
        used = max(0, self._used(key, now) + units) if units < 0 else self._used(key, now) + units
        self._budgets[key] = (used, window_end + BUDGET_GRACE_MS * 1000)

    def _held(self, key: str, now: int) -> dict[str, int]:
        held = self._slots.setdefault(key, {})
        for lease_id in [i for i, exp in held.items() if exp <= now]:
            del held[lease_id]
        return held

    def _purge(self, now: int) -> None:
        self._ops += 1
        if self._ops % self._PURGE_EVERY:
            return
        self._tats = {k: v for k, v in self._tats.items() if v[0] >= now}
        self._budgets = {k: v for k, v in self._budgets.items() if v[1] > now}
        self._slots = {k: v for k, v in self._slots.items() if self._held(k, now)}
        self._leases = {k: v for k, v in self._leases.items() if v > now}

    # -- the scripts

    def _evaluate(self, c: _Check, now: int) -> tuple[int, int, tuple[int, int], tuple[int, int]]:
        """Phase one of the admit script for one check.

        Returns (status, retry after, (remaining, reset) before, the same after).
        """
        status, retry = _OK, 0
        if c.code == _GCRA:
            u, r = self._base_tat(c.key, now)
            nu, nr = _shift(u, r, c.cost, c.limit)
            before, after = _level(u, r, now, c.limit), _level(nu, nr, now, c.limit)
            if c.cost > c.limit:
                status = _TOO_LARGE
            elif nu - now > PERIOD_US or (nu - now == PERIOD_US and nr > 0):
                status = _DENIED
                retry = nu - PERIOD_US - now + (1 if nr > 0 else 0)
        elif c.code == _CONC:
            held = len(self._held(c.key, now))
            before, after = (max(0, c.limit - held), 0), (max(0, c.limit - held - 1), 0)
            if held >= c.limit:
                status, retry = _DENIED, c.arg
        else:
            used = self._used(c.key, now)
            before = (max(0, c.limit - used), c.arg - now)
            after = (max(0, c.limit - used - c.cost), c.arg - now)
            if c.cost > c.limit:
                status = _TOO_LARGE
            elif used + c.cost > c.limit:
                status, retry = _DENIED, c.arg - now
        return status, retry, before, after

    async def admit(
        self, scopes: Sequence[Scope], tokens: int, now: float | None = None
    ) -> Decision:
        """Check and take all limits of all scopes, all-or-nothing (see the module doc)."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        t = self.clock() if now is None else now
        unique, checks = _plan(scopes, tokens, t)
        lease = Lease(uuid.uuid4().hex, unique, tokens, tuple(checks), tokens, renewed_at=t)
        if not checks:
            return Decision(True, None, None, 0.0, {}, lease)
        now_us, ttl = _to_us(t), _to_us(self.lease_ttl)
        self._purge(now_us)
        evaluated = [self._evaluate(c, now_us) for c in checks]
        ok = all(status == _OK for status, *_ in evaluated)
        if ok:
            for c in checks:
                if c.code == _GCRA:
                    u, r = self._base_tat(c.key, now_us)
                    self._put_tat(c.key, *_shift(u, r, c.cost, c.limit), now_us)
                elif c.code == _CONC:
                    self._slots.setdefault(c.key, {})[lease.id] = now_us + ttl
                else:
                    self._charge_budget(c.key, c.cost, c.arg, now_us)
            self._leases[lease.id] = now_us + ttl
        results = [
            (status, *(after if ok else before), retry)
            for status, retry, before, after in evaluated
        ]
        return _decide(ok, checks, results, lease if ok else None)

    async def debit(self, lease: Lease, tokens: int) -> bool:
        """Count streamed tokens; charge those past the reservation; False if a budget is out."""
        extra, t = _take_debit(lease, tokens), self.clock()
        if not _debit_due(lease, extra, t, self.lease_ttl):
            return True
        now_us, ttl = _to_us(t), _to_us(self.lease_ttl)
        if lease.id in self._leases:
            self._leases[lease.id] = now_us + ttl
        ok = True
        for c in lease._reconciled:
            if c.code == _GCRA:
                self._charge_tat(c.key, extra, c.limit, now_us)
            elif c.code == _CONC:
                held = self._slots.get(c.key, {})
                if lease.id in held:
                    held[lease.id] = now_us + ttl
            elif c.arg > now_us:
                self._charge_budget(c.key, extra, c.arg, now_us)
                ok = ok and self._used(c.key, now_us) <= c.limit
        lease.charged += extra
        lease.renewed_at = t
        return ok

    async def finish(self, lease: Lease, actual_tokens: int) -> None:
        """Reconcile the reservation with ``actual_tokens`` and release the slot; idempotent."""
        if lease.finished:
            return
        lease.finished = True
        now_us, actual = _to_us(self.clock()), max(0, actual_tokens)
        landed = self._leases.pop(lease.id, None) is not None
        delta = actual - lease.charged
        if lease.degraded and not landed:
            delta = actual
        for c in lease._reconciled:
            if c.code == _GCRA:
                self._charge_tat(c.key, delta, c.limit, now_us)
            elif c.code == _CONC:
                self._slots.get(c.key, {}).pop(lease.id, None)
            else:
                self._charge_budget(c.key, delta, c.arg, now_us)

    async def close(self) -> None:
        """Nothing to release."""


def _take_debit(lease: Lease, tokens: int) -> int:
    """Add ``tokens`` to the lease's consumption; return the new excess to charge now."""
    lease.consumed += max(0, tokens)
    return max(0, lease.consumed - lease.charged)


def _debit_due(lease: Lease, extra: int, now: float, lease_ttl: float) -> bool:
    """Whether a debit has to reach the store: an excess to charge, a budget to check, or
    a concurrency lease due for renewal (a third of its TTL since the last one)."""
    if lease.degraded or lease.finished:
        return False
    renew = bool(lease._slots) and now - lease.renewed_at >= lease_ttl / 3
    return bool(extra or lease._budgets or renew)


# --------------------------------------------------------------------------- Redis backend


class _BackendError(Exception):
    """Redis failed or did not answer in time (already counted and logged)."""


DEFAULT_TIMEOUT = 0.25  # seconds per Redis call: a loaded 2-core machine stays under it
# A release that failed is retried after these pauses (seconds), in a task the limiter
# holds and `close` awaits: a slot must not stay taken for the lease's whole TTL because
# Redis hiccuped once. A call that timed out may still have run (the mark makes a retry,
# or an admission that lands after its release, change nothing).
RELEASE_RETRIES = (0.1, 0.3, 1.0, 3.0)
FINISHED_MARK_MS = 120_000  # how long Redis remembers a finished lease
WARM_CONNECTIONS = 4  # connections opened at start-up, before the first request


class RedisRateLimiter:
    """Rate limits shared by several replicas through one Redis (atomic Lua scripts).

    Each admit, each debit that has to reach Redis and each finish is one EVALSHA
    (after the first load of a script on a server). Every call is bounded by
    ``timeout`` seconds; on failure the limiter admits (``fail_open``) or denies with
    kind "backend". ``failures`` counts failed calls, ``failing`` is the current state.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sluice:rl:",
        timeout: float = DEFAULT_TIMEOUT,
        fail_open: bool = True,
        lease_ttl: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.prefix = prefix
        self.timeout = timeout
        self.fail_open = fail_open
        self.lease_ttl = lease_ttl
        self.clock = clock
        self.failures = 0
        self.failing = False
        self._redis: Redis = Redis.from_url(
            url,
            # calls are bounded by asyncio.timeout(self.timeout) (adjustable at run time);
            # the socket timeouts are only a backstop
            socket_timeout=max(1.0, timeout),
            socket_connect_timeout=max(1.0, timeout),
            # one immediate retry on a broken pooled connection (e.g. after a restart);
            # the whole call stays bounded by `timeout` below.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=0,
        )
        # The scripts go through one pipelined connection of our own (see gateway.redis_pipe)
        # when the URL is plain TCP; redis-py serves every other URL (TLS, Unix sockets).
        params = connect_params(url)
        self._pipe = PipelinedRedis(**params) if params is not None else None
        self._admit: AsyncScript = self._redis.register_script(_LUA_ADMIT)
        self._debit: AsyncScript = self._redis.register_script(_LUA_DEBIT)
        self._finish: AsyncScript = self._redis.register_script(_LUA_FINISH)
        self._releases: set[asyncio.Task[None]] = set()  # finishes still being retried

    def _lease_key(self, lease_id: str) -> str:
        return f"{self.prefix}lease:{lease_id}"

    def _finished_key(self, lease_id: str) -> str:
        return f"{self.prefix}done:{lease_id}"

    async def start(self, within: float = 10.0) -> bool:
        """Connect and load the scripts before the first request (call it before ready).

        Waits up to ``within`` seconds; if Redis cannot be reached by then, logs it and
        returns False (requests then fail open or closed as configured).
        """
        from redis.exceptions import RedisError

        pipe = self._pipe
        try:
            async with asyncio.timeout(within):
                if pipe is not None:
                    await pipe.call("PING")
                    for script in (self._admit, self._debit, self._finish):
                        await pipe.call("SCRIPT LOAD", script.script)
                else:
                    await asyncio.gather(*(self._redis.ping() for _ in range(WARM_CONNECTIONS)))
                    for script in (self._admit, self._debit, self._finish):
                        await self._redis.script_load(script.script)
        except (RedisError, ReplyError, OSError, TimeoutError) as exc:
            self.failing = True
            log.warning(
                "rate-limit backend not reachable at start-up (%s); failing %s until it is",
                type(exc).__name__,
                "open" if self.fail_open else "closed",
            )
            return False
        return True

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            async with asyncio.timeout(self.timeout):
                if self._pipe is not None:
                    result = await self._evalsha(self._pipe, script, keys, args)
                else:
                    result = await script(keys=keys, args=args)
        except (RedisError, ReplyError, OSError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError) and self._pipe is not None:
                self._pipe.abort()  # a reply that never comes must not go to the next caller
            self.failures += 1
            if not self.failing:
                self.failing = True
                log.warning(
                    "rate-limit backend failing (%s: %s); failing %s until it recovers",
                    type(exc).__name__,
                    exc,
                    "open" if self.fail_open else "closed",
                )
            raise _BackendError from exc
        if self.failing:
            self.failing = False
            log.info("rate-limit backend recovered (%d failed calls so far)", self.failures)
        return result

    @staticmethod
    async def _evalsha(
        pipe: PipelinedRedis, script: AsyncScript, keys: list[str], args: list[Any]
    ) -> Any:
        """EVALSHA; the script is loaded again first if the server lost it (a restart)."""
        try:
            return await pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except ReplyError as err:
            if not str(err).startswith("NOSCRIPT"):
                raise
        await pipe.call("SCRIPT LOAD", script.script)
        return await pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)

    async def admit(
        self, scopes: Sequence[Scope], tokens: int, now: float | None = None
    ) -> Decision:
        """Check and take all limits of all scopes in one EVALSHA, all-or-nothing."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        t = self.clock() if now is None else now
        unique, checks = _plan(scopes, tokens, t)
        lease = Lease(uuid.uuid4().hex, unique, tokens, tuple(checks), tokens, renewed_at=t)
        if not checks:
            return Decision(True, None, None, 0.0, {}, lease)
        keys = [self._lease_key(lease.id)] + [self.prefix + c.key for c in checks]
        keys.append(self._finished_key(lease.id))
        args: list[Any] = [_to_us(t), lease.id, _to_us(self.lease_ttl), len(checks)]
        for c in checks:
            args += [c.code, c.limit, c.cost, c.arg]
        # Whether the script ran is unknown when the call fails or is cancelled (a reply
        # that came too late): the lease is then degraded, and finished here unless it is
        # handed to the caller (fail open), so a slot Redis did take is given back.
        lease.degraded = True
        try:
            raw = await self._run(self._admit, keys, args)
        except _BackendError:
            if self.fail_open:
                return Decision(True, None, None, 0.0, {}, lease)
            self._release(lease, 0)
            return Decision(False, "backend", None, BACKEND_RETRY_AFTER, {}, None)
        except asyncio.CancelledError:
            self._release(lease, 0)
            raise
        lease.degraded = False
        values = [int(v) for v in raw]
        if len(values) == 1:  # already finished: cannot happen to a caller still waiting
            return Decision(False, "backend", None, BACKEND_RETRY_AFTER, {}, None)
        results = [
            (values[1 + 4 * i], values[2 + 4 * i], values[3 + 4 * i], values[4 + 4 * i])
            for i in range(len(checks))
        ]
        ok = values[0] == 1
        return _decide(ok, checks, results, lease if ok else None)

    async def debit(self, lease: Lease, tokens: int) -> bool:
        """Count streamed tokens; charge those past the reservation; False if a budget is out.

        Reaches Redis only when there is an excess to charge, the lease has a budget to
        check, or its concurrency slot is due for renewal (a third of ``lease_ttl``): call
        it every few hundred tokens or seconds, not per token. On backend failure returns
        True (a stream is not cut for an outage).
        """
        extra, t = _take_debit(lease, tokens), self.clock()
        if not _debit_due(lease, extra, t, self.lease_ttl):
            return True
        checks = lease._reconciled
        keys = [self._lease_key(lease.id)] + [self.prefix + c.key for c in checks]
        args: list[Any] = [_to_us(t), lease.id, _to_us(self.lease_ttl), extra, len(checks)]
        for c in checks:
            args += [c.code, c.limit, c.arg]
        try:
            raw = await self._run(self._debit, keys, args)
        except _BackendError:
            return True
        lease.charged += extra
        lease.renewed_at = t
        return int(raw) == 1

    async def finish(self, lease: Lease, actual_tokens: int) -> None:
        """Reconcile and release in one EVALSHA; idempotent; never raises.

        Waits for the first attempt only (bounded by ``timeout``); a failed one is retried
        in the background (``RELEASE_RETRIES``), and cancelling the caller does not stop it.
        """
        first = self._release(lease, actual_tokens)
        if first is not None:
            await first.wait()

    def _release(self, lease: Lease, actual_tokens: int) -> asyncio.Event | None:
        """Start finishing ``lease`` in a held task; the event is set after the first try."""
        if lease.finished:
            return None
        lease.finished = True
        checks = lease._reconciled
        if not checks:
            return None
        keys = [self._lease_key(lease.id)] + [self.prefix + c.key for c in checks]
        keys.append(self._finished_key(lease.id))
        args: list[Any] = [
            _to_us(self.clock()),
            lease.id,
            int(lease.degraded),
            max(0, actual_tokens),
            lease.charged,
            len(checks),
            FINISHED_MARK_MS,
        ]
        for c in checks:
            args += [c.code, c.limit, c.arg]
        tried = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._releasing(keys, args, tried))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return tried

    async def _releasing(self, keys: list[str], args: list[Any], tried: asyncio.Event) -> None:
        try:
            for pause in (0.0, *RELEASE_RETRIES):
                if pause:
                    await asyncio.sleep(pause)
                try:
                    await self._run(self._finish, keys, args)
                    return
                except _BackendError:
                    pass  # counted and logged
                finally:
                    tried.set()
            log.warning(
                "rate-limit release failed %d times; the slot comes back when its lease expires",
                1 + len(RELEASE_RETRIES),
            )
        except Exception:  # never raise from a release
            self.failures += 1
            log.exception("rate-limit finish failed")
        finally:
            tried.set()

    async def close(self) -> None:
        """Let releases still being retried finish (bounded), then close the connections."""
        if self._releases:
            bound = sum(RELEASE_RETRIES) + (1 + len(RELEASE_RETRIES)) * self.timeout + 1.0
            _done, pending = await asyncio.wait(set(self._releases), timeout=bound)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._pipe is not None:
            await self._pipe.close()
        await self._redis.aclose()
