"""What a request costs: the price table, resolved per request, and exact money arithmetic.

A price is in the pricing currency per million tokens, which is the same number as
micro-units (millionths of the currency) per token: a request's cost in micro-units is
``sum(tokens * price)``, exact in :class:`~decimal.Decimal`. Budgets count integer
micro-units (:func:`to_micros`); the Prometheus counter adds the float of each exact cost.

Cost of a request, from its final usage (``ctx.usage``: the upstream's usage, else the
``token_count`` plugin's local count)::

    (prompt - cached - cache_write) * input + cached * cached_input
      + cache_write * cache_write_price + completion * output

``cached`` and ``cache_write`` are the prompt tokens read from and written to the
provider's prompt cache, where the upstream reported them (OpenAI's
``prompt_tokens_details.cached_tokens``; Anthropic's ``cache_read_input_tokens`` and
``cache_creation_input_tokens``, which the gateway counts in ``prompt_tokens`` like OpenAI).

The priced model is the one the deployment was sent (``ctx.upstream_model``: what the
provider bills), else the route's name; a route's own ``price:`` wins. An unknown model
costs 0 and is logged once per model (per config generation), never guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import yaml

from gateway.context import RequestContext, StateKey, Usage
from gateway.pricing_config import PriceConfig, PricingConfig

if TYPE_CHECKING:
    from gateway.config import RouteConfig

log = logging.getLogger("sluice.pricing")

MICROS: Final = 1_000_000
_ZERO: Final = Decimal(0)
STARTER_TABLE: Final = "pricing_default.yaml"


@dataclass(frozen=True, slots=True)
class Price:
    """Prices per million tokens (= micro-units per token), every field filled in."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal

    @classmethod
    def of(cls, config: PriceConfig) -> Price:
        """A configured price, with cached and cache-write tokens at `input` when not set."""
        cached = config.input if config.cached_input is None else config.cached_input
        written = config.input if config.cache_write is None else config.cache_write
        return cls(config.input, config.output, cached, written)


@dataclass(frozen=True, slots=True)
class Cost:
    """The cost of one request: `amount` in `currency`; `priced` False for an unknown model."""

    amount: Decimal
    currency: str
    priced: bool = True

    @property
    def micros(self) -> int:
        """The amount in integer micro-units (half-even rounding), as budgets count it."""
        return to_micros(self.amount)


def to_micros(amount: Decimal) -> int:
    """`amount` (currency units) as integer micro-units, rounded half-even."""
    return int(amount.scaleb(6).to_integral_value(ROUND_HALF_EVEN))


def tokens_cost(
    price: Price, prompt: int, completion: int, cached: int = 0, cache_write: int = 0
) -> Decimal:
    """The exact cost in currency units of these token counts at `price`.

    `cached` and `cache_write` are parts of `prompt`; they are clamped to it (a usage
    object that reports more cached than prompt tokens never makes a negative cost).
    """
    prompt, completion = max(0, prompt), max(0, completion)
    cached = min(max(0, cached), prompt)
    written = min(max(0, cache_write), prompt - cached)
    micros = (
        (prompt - cached - written) * price.input
        + cached * price.cached_input
        + written * price.cache_write
        + completion * price.output
    )
    return micros.scaleb(-6)


def usage_cost(price: Price, usage: Usage, prompt_fallback: int = 0) -> Decimal:
    """The cost of a request's usage; `prompt_fallback` when no prompt count is known."""
    prompt = usage.prompt_tokens if usage.prompt_tokens is not None else prompt_fallback
    return tokens_cost(
        price,
        prompt,
        usage.completion_tokens or 0,
        usage.cached_tokens or 0,
        usage.cache_write_tokens or 0,
    )


def reservation_micros(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """Micro-units to reserve at admission: the prompt at `input`, the most the answer may
    use at `output`, rounded up (never reserve less than the request may cost)."""
    amount = tokens_cost(price, prompt_tokens, completion_tokens).scaleb(6)
    return int(amount.to_integral_value(ROUND_CEILING))


def _parse_table(
    models: Mapping[str, PriceConfig],
) -> tuple[dict[str, Price], list[tuple[str, Price]]]:
    exact: dict[str, Price] = {}
    prefixes: list[tuple[str, Price]] = []
    for pattern, config in models.items():
        if pattern.endswith("*"):
            prefixes.append((pattern[:-1], Price.of(config)))
        else:
            exact[pattern] = Price.of(config)
    prefixes.sort(key=lambda item: len(item[0]), reverse=True)
    return exact, prefixes


@dataclass(frozen=True, slots=True)
class StarterTable:
    """The shipped starter table: its date and its prices (USD)."""

    as_of: str
    models: dict[str, PriceConfig]


def starter_table() -> StarterTable:
    """The starter table shipped with the package (`gateway/pricing_default.yaml`)."""
    text = resources.files("gateway").joinpath(STARTER_TABLE).read_text("utf-8")
    data: dict[str, Any] = yaml.safe_load(text)
    models = PricingConfig.model_validate({"models": data["models"]}).models
    return StarterTable(str(data["as_of"]), dict(models))


class Pricing:
    """The price table of one config generation, resolving a request's price and cost.

    Remembers which unknown models it warned about (one log line per model).
    """

    def __init__(
        self,
        config: PricingConfig,
        routes: Iterable[RouteConfig] = (),
        starter: StarterTable | None = None,
    ) -> None:
        self.currency = config.currency
        models: dict[str, PriceConfig] = {}
        if config.use_starter_table:
            table = starter if starter is not None else starter_table()
            models.update(table.models)
            self.starter_as_of: str | None = table.as_of
        else:
            self.starter_as_of = None
        models.update(config.models)
        self._exact, self._prefixes = _parse_table(models)
        self._routes: dict[str, Price] = {
            route.name: Price.of(route.price) for route in routes if route.price is not None
        }
        self._warned: set[str] = set()

    def lookup(self, model: str) -> Price | None:
        """The table's price of `model`: its exact entry, else the longest matching prefix."""
        price = self._exact.get(model)
        if price is not None:
            return price
        for prefix, candidate in self._prefixes:
            if model.startswith(prefix):
                return candidate
        return None

    def price_of(self, route: RouteConfig | None, model: str | None) -> Price | None:
        """The price of a request served as `model` on `route`: the route's `price:`, else
        the table's price of `model`, else of the route's name; None if unknown (logged
        once per model)."""
        if route is not None:
            own = self._routes.get(route.name)
            if own is not None:
                return own
        names = [name for name in (model, route.name if route is not None else None) if name]
        for name in names:
            price = self.lookup(name)
            if price is not None:
                return price
        if names and names[0] not in self._warned:
            self._warned.add(names[0])
            log.warning(
                "no price for model %r (route %s): its requests cost 0; add it under "
                "pricing.models or give the route a price",
                names[0][:200],
                route.name if route is not None else None,
            )
        return None

    def admission_price(self, route: RouteConfig, model: str) -> Price | None:
        """The price to reserve by before a deployment is picked: the dearest input and
        output among the route's deployments (for the client's `model` name)."""
        if route.name in self._routes:
            return self._routes[route.name]
        fallback = model
        if route.model_prefix is not None and model.startswith(route.model_prefix):
            fallback = model[len(route.model_prefix) :]
        elif route.model is not None:
            fallback = route.model
        prices = [
            price
            for deployment in route.all_deployments
            if (price := self.price_of(route, deployment.upstream_model or fallback)) is not None
        ]
        if not prices:
            return None
        return Price(
            max(p.input for p in prices),
            max(p.output for p in prices),
            max(p.cached_input for p in prices),
            max(p.cache_write for p in prices),
        )

    def cost(self, ctx: RequestContext) -> Cost:
        """What `ctx`'s request cost, from its usage as it stands (final after `on_end`)."""
        usage = ctx.usage
        if usage.prompt_tokens is None and usage.completion_tokens is None:
            return Cost(_ZERO, self.currency)  # nothing was used (or nothing is known)
        price = self.price_of(ctx.route, ctx.upstream_model)
        if price is None:
            return Cost(_ZERO, self.currency, priced=False)
        return Cost(usage_cost(price, usage), self.currency)


def build_pricing(config: PricingConfig | None, routes: Iterable[RouteConfig]) -> Pricing:
    """The price table of a config (no `pricing:` block: only the routes' own prices)."""
    return Pricing(config or PricingConfig(), routes)


def starter_notice(pricing: Pricing | None) -> str | None:
    """The warning to show when the starter table is in use (at start-up, reload, check)."""
    if pricing is None or pricing.starter_as_of is None:
        return None
    return (
        f"pricing: using the starter price table as of {pricing.starter_as_of} (USD list "
        "prices); review it before billing anyone by it (see docs/costs.md)"
    )


PRICING: StateKey[Pricing] = StateKey("pricing")
"""The running config's price table, set on every request at admission when `pricing:` is."""


def cost_of(ctx: RequestContext) -> Cost | None:
    """What `ctx`'s request cost so far, or None when no price table is configured."""
    pricing = ctx.get(PRICING)
    return pricing.cost(ctx) if pricing is not None else None
