"""Budgets in currency (`cost_per_day`, `cost_per_month`), enforced by the rate_limit plugin.

They run on the rate limiter's own budget mechanism (UTC calendar windows; memory or
Redis, the Lua scripts and their memory mirror unchanged), counted in integer micro-units
of the pricing currency under scopes of their own (``team:ml|cost``, ``key:ml/ci|cost``,
``team:ml|model:gpt-4o|cost``), next to the token limits of the same request:

1. RESERVE at admission, before the token limits: the prompt estimate at the input price
   plus ``max_tokens`` (or ``default_max_tokens``) at the output price, at the dearest
   deployment of the route, rounded up. If the token limits then refuse the request, the
   reservation is given back at once (finished at 0).
2. DEBIT while a stream runs, only once its cost so far passes the reservation (an
   upstream that ignores ``max_tokens``): other replicas see it, and with ``hard_budget``
   a stream whose cost budget runs out is cut.
3. RECONCILE at the end with the request's cost (:meth:`gateway.pricing.Pricing.cost`,
   the same figure as the access log's ``cost``); without any usage, the prompt estimate
   is charged if an upstream was tried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Final

from gateway.context import RequestContext
from gateway.plugin import Reject
from gateway.pricing import Price, Pricing, reservation_micros, to_micros, tokens_cost
from gateway.teams import LimitsConfig
from plugins.rate_limit.limiter import Decision, Lease, Limits, Scope

if TYPE_CHECKING:
    from gateway.auth import Principal
    from gateway.config import RouteConfig

COST_SUFFIX: Final = "|cost"
_WINDOWS: Final = {"tokens_per_day": "cost_per_day", "tokens_per_month": "cost_per_month"}
_WORDS: Final = {"cost_per_day": "per UTC day", "cost_per_month": "per UTC month"}


def cost_limits(config: LimitsConfig | None) -> Limits | None:
    """The budgets of `config` as limiter budgets in micro-units (None: no cost budget)."""
    if config is None or not config.has_cost:
        return None
    day, month = config.cost_per_day, config.cost_per_month
    return Limits(
        tokens_per_day=to_micros(day) if day is not None else None,
        tokens_per_month=to_micros(month) if month is not None else None,
    )


def cost_scopes_for(principal: Principal, route: RouteConfig | None) -> list[Scope]:
    """The cost scopes of a request: team, key and team+model, like the token scopes."""
    scopes: list[Scope] = []
    if (team := cost_limits(principal.team_limits)) is not None:
        scopes.append(Scope(f"team:{principal.team}{COST_SUFFIX}", team))
    if (key := cost_limits(principal.key_limits)) is not None:
        scopes.append(Scope(f"key:{principal.key_id}{COST_SUFFIX}", key))
    if route is not None:
        for name in (route.name, *route.aliases):
            config = principal.model_limits.get(name)
            if config is not None:
                model = cost_limits(config)
                if model is not None:
                    scope_name = f"team:{principal.team}|model:{route.name}{COST_SUFFIX}"
                    scopes.append(Scope(scope_name, model))
                break
    return scopes


@dataclass
class CostHold:
    """An admitted request's cost lease: what it reserved by, and what it debited."""

    lease: Lease
    price: Price
    prompt_estimate: int
    exhausted: bool = False  # a debit said a cost budget ran out

    def excess(self, used_tokens: int) -> int:
        """Micro-units to debit now for `used_tokens` (prompt + completion so far): the
        amount past what the lease was charged, 0 while within the reservation."""
        completion = max(0, used_tokens - self.prompt_estimate)
        so_far = to_micros(tokens_cost(self.price, self.prompt_estimate, completion))
        if so_far <= self.lease.charged:
            return 0
        return max(0, so_far - self.lease.consumed)


def reserve(
    pricing: Pricing, ctx: RequestContext, prompt: int, completion: int
) -> tuple[int, Price]:
    """Micro-units to reserve for a request and the price they were reckoned at (0 for an
    unknown model, which costs nothing)."""
    assert ctx.route is not None
    price = pricing.admission_price(ctx.route, ctx.model)
    if price is None:
        zero = Decimal(0)
        return 0, Price(zero, zero, zero, zero)
    return reservation_micros(price, prompt, completion), price


def actual_micros(pricing: Pricing, ctx: RequestContext, hold: CostHold) -> int:
    """What the request cost, in micro-units, to reconcile its reservation with."""
    usage = ctx.usage
    if usage.prompt_tokens is not None or usage.completion_tokens is not None:
        return pricing.cost(ctx).micros
    if ctx.upstream_name is None:
        return 0  # refused before any upstream saw it
    return to_micros(tokens_cost(hold.price, hold.prompt_estimate, 0))


def _money(micros: int, currency: str) -> str:
    return f"{Decimal(micros).scaleb(-6).normalize():f} {currency}"


def refusal(decision: Decision, scopes: list[Scope], currency: str) -> Reject:
    """The 429 for a request a cost budget refuses (503 when the backend failed closed)."""
    if decision.kind == "backend":
        return Reject(
            503,
            "Rate limits cannot be checked right now; retry shortly.",
            code="rate_limit_backend_unavailable",
            type="server_error",
            headers={"Retry-After": "1"},
        )
    name = decision.scope_name or ""
    limit_name = _WINDOWS.get(decision.limit or "", "cost_per_day")
    scope = next((s for s in scopes if s.name == name), None)
    limit = getattr(scope.limits, decision.limit or "", None) if scope is not None else None
    budget = f"{_money(limit, currency)} {_WORDS[limit_name]}" if limit else _WORDS[limit_name]
    who = name.removesuffix(COST_SUFFIX) or "this key"
    if decision.too_large:
        return Reject(
            429,
            f"This request may cost more than the whole {limit_name} budget of {who} "
            f"({budget}); lower max_tokens or the prompt.",
            code="cost_budget_exceeded",
            type="cost_budget",
        )
    seconds = max(1, math.ceil(decision.retry_after))
    return Reject(
        429,
        f"The {limit_name} budget of {who} ({budget}) is spent; it resets in {seconds} s.",
        code="cost_budget_exceeded",
        type="cost_budget",
        headers={"Retry-After": str(seconds)},
    )


def exhausted_error() -> Reject:
    """The final error event of a stream cut because its cost budget ran out."""
    return Reject(
        429,
        "The cost budget ran out during this answer.",
        code="budget_exhausted",
        type="cost_budget",
    )
