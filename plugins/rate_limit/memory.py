"""The memory backend of the rate limiter: one replica, in process memory, mirroring the
Lua scripts of :mod:`plugins.rate_limit.redis_backend` line by line (see
:mod:`plugins.rate_limit.limiter` for the semantics)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence

from plugins.rate_limit.limiter import (
    _CONC,
    _DENIED,
    _GCRA,
    _OK,
    _TOO_LARGE,
    BUDGET_GRACE_MS,
    PERIOD_US,
    Decision,
    Lease,
    Scope,
    _Check,
    _debit_due,
    _decide,
    _plan,
    _take_debit,
    _to_us,
)


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
        for c in lease.reconciled:
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
        for c in lease.reconciled:
            if c.code == _GCRA:
                self._charge_tat(c.key, delta, c.limit, now_us)
            elif c.code == _CONC:
                self._slots.get(c.key, {}).pop(lease.id, None)
            else:
                self._charge_budget(c.key, delta, c.arg, now_us)

    async def close(self) -> None:
        """Nothing to release."""
