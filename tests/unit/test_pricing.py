"""The price table and what a request costs: cached input, cache writes, prefixes, per-route
overrides, unknown models (0, one warning per model), exact Decimal arithmetic, the starter
table, and the `pricing:` / `cost_per_*` config (refused where nothing could enforce it)."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import pytest

from gateway.auth import hash_key
from gateway.config import ConfigError, GatewayConfig, parse_config
from gateway.context import Endpoint, RequestContext, Usage
from gateway.pricing import (
    Price,
    Pricing,
    build_pricing,
    reservation_micros,
    starter_notice,
    starter_table,
    to_micros,
    tokens_cost,
    usage_cost,
)
from gateway.pricing_config import PriceConfig, PricingConfig
from gateway.translate.anthropic_openai import messages_response_to_chat

KEY = {"name": "ci", "sha256": hash_key("sk-pricing-config-000000000000001")}
GPT = Price(Decimal("2.50"), Decimal("10.00"), Decimal("1.25"), Decimal("2.50"))
CLAUDE = Price(Decimal("3"), Decimal("15"), Decimal("0.30"), Decimal("3.75"))


def config(**extra: Any) -> dict[str, Any]:
    """Route `m` (upstream model `gpt-4o-2024-08-06`) and route `local` on a demo upstream."""
    return {
        "upstreams": {"d": {"kind": "demo"}},
        "routes": [
            {"model": "m", "upstream": "d", "upstream_model": "gpt-4o-2024-08-06"},
            {"model": "local", "upstream": "d"},
        ],
        **extra,
    }


def parsed(**extra: Any) -> GatewayConfig:
    return parse_config(config(**extra), {})


def served(cfg: GatewayConfig, route: int, model: str | None, **usage: int) -> RequestContext:
    """A finished request on `cfg.routes[route]`, sent upstream as `model`, with `usage`."""
    ctx = RequestContext("req_1", Endpoint.CHAT, route=cfg.routes[route], upstream_model=model)
    ctx.usage.set_from_upstream(usage_object(**usage))
    return ctx


def usage_object(
    prompt: int, completion: int, cached: int | None = None, written: int | None = None
) -> dict[str, Any]:
    """An OpenAI-shaped usage object (as the proxy records it from every provider)."""
    data: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
    details: dict[str, int] = {}
    if cached is not None:
        details["cached_tokens"] = cached
    if written is not None:
        details["cache_creation_input_tokens"] = written
    if details:
        data["prompt_tokens_details"] = details
    return data


# ----- arithmetic --------------------------------------------------------------------------


def test_cost_prices_cached_and_written_prompt_tokens_apart() -> None:
    # 1000 prompt tokens: 600 read from the cache, 100 written to it, 300 fresh; 200 out.
    cost = tokens_cost(CLAUDE, 1000, 200, cached=600, cache_write=100)
    expected = (300 * Decimal(3) + 600 * Decimal("0.30") + 100 * Decimal("3.75") + 200 * 15) / (
        10**6
    )
    assert cost == expected == Decimal("0.004455")


def test_cost_is_exact_where_floats_drift() -> None:
    price = Price(Decimal("0.1"), Decimal("0.2"), Decimal("0.1"), Decimal("0.1"))
    total = sum((tokens_cost(price, 1, 1) for _ in range(10)), Decimal(0))
    assert total == Decimal("0.000003")  # ten times 0.0000003, exactly
    assert sum(0.0000001 + 0.0000002 for _ in range(10)) != 0.000003  # what floats give
    assert to_micros(Decimal("0.0000025")) == 2  # half-even into budgets' micro-units
    assert to_micros(Decimal("0.0000035")) == 4


def test_cached_tokens_beyond_the_prompt_never_make_a_negative_cost() -> None:
    assert tokens_cost(GPT, 10, 0, cached=50, cache_write=50) == 10 * GPT.cached_input / 10**6


def test_reservation_rounds_up_to_a_whole_micro_unit() -> None:
    cheap = Price(Decimal("0.02"), Decimal("0"), Decimal("0.02"), Decimal("0.02"))
    assert reservation_micros(cheap, 10, 100) == 1  # 0.2 micro-units: never reserve 0
    assert reservation_micros(GPT, 1000, 500) == 2500 + 5000


def test_missing_cached_and_cache_write_prices_default_to_input() -> None:
    price = Price.of(PriceConfig(input=Decimal(1), output=Decimal(2)))
    assert price == Price(Decimal(1), Decimal(2), Decimal(1), Decimal(1))


# ----- usage --------------------------------------------------------------------------------


def test_usage_keeps_openai_cached_and_anthropic_cache_written_tokens() -> None:
    usage = Usage()
    usage.set_from_upstream(usage_object(100, 5, cached=40, written=30))
    assert (usage.cached_tokens, usage.cache_write_tokens) == (40, 30)
    usage.set_from_upstream({"prompt_tokens": 100, "completion_tokens": 6})
    assert usage.cached_tokens == 40  # a later usage without details keeps what was known


def test_an_anthropic_answer_is_priced_with_its_cache_reads_and_writes() -> None:
    """Anthropic reports input_tokens apart from the cache's; the translation counts them
    all in prompt_tokens (like OpenAI) and keeps reads and writes apart for pricing."""
    message = {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 300,
            "cache_read_input_tokens": 600,
            "cache_creation_input_tokens": 100,
            "output_tokens": 200,
        },
    }
    usage = Usage()
    usage.set_from_upstream(messages_response_to_chat(message, "claude")["usage"])
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens) == (1000, 600, 100)
    assert usage_cost(CLAUDE, usage) == tokens_cost(CLAUDE, 1000, 200, 600, 100)


# ----- the table ----------------------------------------------------------------------------


def test_the_upstream_model_is_priced_by_exact_name_else_longest_prefix() -> None:
    models = {
        "gpt-4o": {"input": 2.5, "output": 10},
        "gpt-4o-*": {"input": 2.5, "output": 10},
        "gpt-4o-mini*": {"input": 0.15, "output": 0.6},
    }
    cfg = parsed(pricing={"models": models})
    pricing = build_pricing(cfg.pricing, cfg.routes)
    assert pricing.lookup("gpt-4o-mini-2024-07-18") == Price.of(
        PriceConfig(input=Decimal("0.15"), output=Decimal("0.6"))
    )
    cost = pricing.cost(served(cfg, 0, "gpt-4o-2024-08-06", prompt=1000, completion=100))
    assert (cost.amount, cost.currency, cost.priced) == (Decimal("0.0035"), "USD", True)


def test_the_route_name_is_priced_when_the_upstream_model_is_not() -> None:
    cfg = parsed(pricing={"models": {"local": {"input": 1, "output": 1}}})
    pricing = build_pricing(cfg.pricing, cfg.routes)
    assert pricing.cost(served(cfg, 1, "llama-3-8b", prompt=10, completion=10)).amount == Decimal(
        "0.00002"
    )


def test_a_route_price_overrides_the_table() -> None:
    routes = config()["routes"]
    routes[0]["price"] = {"input": 1, "cached_input": 0.5, "output": 4}
    cfg = parse_config(
        {
            **config(),
            "routes": routes,
            "pricing": {"models": {"gpt-4o*": {"input": 9, "output": 9}}},
        },
        {},
    )
    pricing = build_pricing(cfg.pricing, cfg.routes)
    cost = pricing.cost(served(cfg, 0, "gpt-4o-2024-08-06", prompt=100, completion=10, cached=50))
    assert cost.amount == Decimal("0.000115")  # 50 at 1 + 50 at 0.5 + 10 at 4, per million


def test_a_route_price_alone_turns_costs_on() -> None:
    routes = config()["routes"]
    routes[1]["price"] = {"input": 1, "output": 1}
    cfg = parse_config({**config(), "routes": routes}, {})
    assert cfg.priced
    assert cfg.pricing is None
    assert not parsed().priced


def test_an_unknown_model_costs_zero_with_one_warning_per_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = parsed(pricing={"models": {}})
    pricing = build_pricing(cfg.pricing, cfg.routes)
    with caplog.at_level(logging.WARNING, logger="sluice.pricing"):
        for _ in range(3):
            cost = pricing.cost(served(cfg, 1, "llama-3-8b", prompt=10, completion=10))
            assert (cost.amount, cost.priced) == (Decimal(0), False)
        pricing.cost(served(cfg, 1, "qwen-2", prompt=1, completion=1))
    warnings = [r.getMessage() for r in caplog.records if r.name == "sluice.pricing"]
    assert len(warnings) == 2
    assert "'llama-3-8b'" in warnings[0]
    assert "cost 0" in warnings[0]


def test_a_request_without_usage_costs_zero_and_warns_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = parsed(pricing={"models": {}})
    pricing = build_pricing(cfg.pricing, cfg.routes)
    ctx = RequestContext("req_1", Endpoint.CHAT, route=cfg.routes[1])
    with caplog.at_level(logging.WARNING, logger="sluice.pricing"):
        assert pricing.cost(ctx).amount == 0
    assert not caplog.records


def test_admission_reserves_at_the_dearest_deployment() -> None:
    data = config(
        pricing={"models": {"a": {"input": 1, "output": 8}, "b": {"input": 3, "output": 2}}}
    )
    data["upstreams"]["e"] = {"kind": "demo"}
    data["routes"][0] = {
        "model": "m",
        "deployments": [
            {"upstream": "d", "upstream_model": "a"},
            {"upstream": "e", "upstream_model": "b"},
        ],
    }
    cfg = parse_config(data, {})
    price = build_pricing(cfg.pricing, cfg.routes).admission_price(cfg.routes[0], "m")
    assert price is not None
    assert (price.input, price.output) == (Decimal(3), Decimal(8))


def test_the_starter_table_is_dated_and_its_entries_win_nothing_over_yours() -> None:
    table = starter_table()
    assert table.as_of >= "2025-01-01"
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3", "o4-mini", "gpt-5", "gpt-5-mini"):
        assert model in table.models or f"{model}*" in table.models, model
    own = PricingConfig(
        use_starter_table=True,
        models={"gpt-4o": PriceConfig(input=Decimal(1), output=Decimal(1))},
    )
    pricing = Pricing(own, starter=table)
    assert pricing.starter_as_of == table.as_of
    assert pricing.lookup("gpt-4o") == Price.of(PriceConfig(input=Decimal(1), output=Decimal(1)))
    for model in (
        "gpt-4o-mini-2024-07-18",
        "gpt-4.1-nano",
        "o4-mini-2025-04-16",
        "gpt-5-2025-08-07",
        "claude-sonnet-4-5-20250929",
        "claude-haiku-4-5",
        "claude-opus-4-1-20250805",
        "text-embedding-3-small",
    ):
        assert pricing.lookup(model) is not None, model
    sonnet = pricing.lookup("claude-sonnet-4-5-20250929")
    assert sonnet is not None
    assert sonnet.cache_write > sonnet.input > sonnet.cached_input
    assert Pricing(PricingConfig()).lookup("gpt-4o") is None  # only when asked for


def test_the_starter_table_notice_names_its_date() -> None:
    notice = starter_notice(build_pricing(PricingConfig(use_starter_table=True), []))
    assert notice is not None
    assert starter_table().as_of in notice
    assert "review" in notice
    assert starter_notice(build_pricing(PricingConfig(), [])) is None
    assert starter_notice(None) is None


# ----- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pricing", "where"),
    [
        ({"models": {"m": {"input": -1, "output": 1}}}, "pricing.models.m.input"),
        ({"models": {"m": {"input": 1}}}, "pricing.models.m.output"),
        ({"models": {"m": {"input": 1, "output": 1, "cache_read": 1}}}, "cache_read"),
        ({"models": {"m": {"input": "0.0000001", "output": 1}}}, "pricing.models.m.input"),
        ({"models": {"*": {"input": 1, "output": 1}}}, "pricing.models"),
        ({"models": {"a*b": {"input": 1, "output": 1}}}, "pricing.models"),
        ({"currency": "dollars"}, "pricing.currency"),
        ({"currency": "EUR", "use_starter_table": True}, "pricing.use_starter_table"),
    ],
)
def test_bad_price_tables_are_refused_naming_the_key(pricing: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parsed(pricing=pricing)
    assert where in str(info.value)


def test_cost_limits_need_a_price_table_and_the_plugin() -> None:
    team = {"ml": {"keys": [KEY], "limits": {"cost_per_day": 5}}}
    with pytest.raises(ConfigError) as info:
        parsed(teams=team, plugins=[{"name": "rate_limit"}])
    assert "teams.ml.limits: cost limits need a price table" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parsed(teams=team, pricing={})
    assert "teams.ml.limits: limits are set but nothing enforces them" in str(info.value)
    cfg = parsed(teams=team, pricing={}, plugins=[{"name": "rate_limit"}])
    assert cfg.teams["ml"].limits.cost_per_day == Decimal(5)


@pytest.mark.parametrize("value", [0, -1, "0.0000001", "lots"])
def test_cost_limits_are_positive_amounts_to_the_micro_unit(value: Any) -> None:
    team = {"ml": {"keys": [KEY], "model_limits": {"m": {"cost_per_month": value}}}}
    with pytest.raises(ConfigError) as info:
        parsed(teams=team, pricing={}, plugins=[{"name": "rate_limit"}])
    assert "teams.ml.model_limits.m.cost_per_month" in str(info.value)
