"""Config models of the price table (`pricing:` and a route's `price:`); see docs/costs.md."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

CURRENCY_PATTERN: Final = r"^[A-Z]{3}$"
"""An ISO 4217 code such as USD or EUR; the gateway only labels amounts with it."""

PerMillion = Annotated[
    Decimal,
    Field(ge=0, decimal_places=6, allow_inf_nan=False, description="per million tokens"),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceConfig(_Strict):
    """What one model costs, in the pricing currency per million tokens.

    `cached_input` prices prompt tokens read from the provider's cache (default: `input`);
    `cache_write` prices prompt tokens written to it (Anthropic; default: `input`).
    """

    input: PerMillion
    output: PerMillion
    cached_input: PerMillion | None = None
    cache_write: PerMillion | None = None


def check_price_pattern(pattern: str) -> str:
    """A model name, or a prefix ending in `*`; ValueError otherwise."""
    if not pattern or pattern != pattern.strip():
        raise ValueError("model names must be non-empty, without surrounding spaces")
    if "*" in pattern[:-1] or pattern == "*":
        raise ValueError(f"{pattern!r}: only a trailing `*` after a prefix is supported")
    return pattern


class PricingConfig(_Strict):
    """The price table: per model (exact name, or prefix ending in `*`), in one currency.

    The priced name is the model the deployment was sent (its `upstream_model`, what the
    provider bills), else the route's name; a route's own `price:` wins over the table.
    """

    currency: str = Field("USD", pattern=CURRENCY_PATTERN, description="ISO 4217 code")
    use_starter_table: bool = Field(
        False,
        description="also use the shipped, dated starter table (USD list prices; review it); "
        "entries under `models` win",
    )
    models: dict[str, PriceConfig] = Field(
        default_factory=dict, description="model name or prefix* -> price per million tokens"
    )

    @field_validator("models")
    @classmethod
    def _check_models(cls, models: dict[str, PriceConfig]) -> dict[str, PriceConfig]:
        for pattern in models:
            try:
                check_price_pattern(pattern)
            except ValueError as err:
                raise ValueError(f"models.{pattern}: {err}") from None
        return models

    @field_validator("use_starter_table")
    @classmethod
    def _usd_only(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("currency", "USD") != "USD":
            raise ValueError("the starter table is in USD; set currency: USD or price every model")
        return value
