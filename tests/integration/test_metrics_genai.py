"""`metrics.genai_semconv`: the GenAI semantic-convention histograms through GET /metrics,
parsed with prometheus_client's parser. A probe plugin placed last tells when each request
ended; the proxy records metrics right after, without yielding, so the scrape is final."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.testing.fake_upstream import FakeUpstream, Script, json_script, openai_stream
from gateway.testing.harness import run_gateway
from tests.integration._support import BOUND, CHAT, chat_body, config_for, make_probe

USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
NAMES = (
    "gen_ai_client_token_usage",
    "gen_ai_server_request_duration_seconds",
    "gen_ai_server_time_to_first_token_seconds",
    "gen_ai_server_time_per_output_token_seconds",
)


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


async def _run(
    http: aiohttp.ClientSession, fake: FakeUpstream, genai: bool, *models: str
) -> list[tuple[str, dict[str, str], float]]:
    probe, log = make_probe()
    config: dict[str, Any] = config_for(
        fake,
        server={"metrics": {"genai_semconv": genai}},
        plugins=[{"name": "probe"}],
        include_usage=True,
    )
    config["routes"][0]["aliases"] = ["m-alias"]
    async with run_gateway(config, registry={"probe": probe}) as gw:
        for model in models:
            async with asyncio.timeout(BOUND):
                resp = await http.post(gw.v1 + CHAT, json=chat_body(model=model))
                await resp.read()
        await log.wait_ends(len(models))
        async with http.get(gw.url + "/metrics") as resp:
            return _samples(await resp.text())


def _get(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and labels.items() <= lab.items())


async def test_genai_histograms_with_the_conventions_labels(http: aiohttp.ClientSession) -> None:
    stream = openai_stream(["a", "b", "c", "d", "e"], model="gpt-test-2024", usage=USAGE)
    error = {"error": {"message": "down", "type": "server_error"}}
    fake = FakeUpstream(Script(stream))
    fake.queue(Script(stream), Script(stream), json_script(error, status=500))
    async with fake:
        samples = await _run(http, fake, True, "m", "m-alias", "m")
    labels = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "openai",
        "gen_ai_request_model": "m",  # the route, whatever alias the client used
        "gen_ai_response_model": "gpt-test",  # the configured deployment model: bounded
    }
    ok = {**labels, "error_type": ""}
    duration = "gen_ai_server_request_duration_seconds_count"
    assert _get(samples, duration, **ok) == 2
    assert _get(samples, duration, **labels, error_type="upstream_error") == 1
    tokens = "gen_ai_client_token_usage_sum"
    assert _get(samples, tokens, **ok, gen_ai_token_type="input") == 22
    assert _get(samples, tokens, **ok, gen_ai_token_type="output") == 10
    assert _get(samples, "gen_ai_server_time_to_first_token_seconds_count", **ok) == 2
    # Without the latency plugin: first to last event written over the completion tokens.
    assert _get(samples, "gen_ai_server_time_per_output_token_seconds_count", **ok) == 2
    # The conventions' advised buckets, e.g. TTFT from 1 ms and token usage in powers of 4.
    ttft_bounds = {
        lab["le"]
        for n, lab, _ in samples
        if n == "gen_ai_server_time_to_first_token_seconds_bucket"
    }
    assert {"0.001", "10.0", "+Inf"} <= ttft_bounds
    token_bounds = {lab["le"] for n, lab, _ in samples if n == "gen_ai_client_token_usage_bucket"}
    assert {"1.0", "4.0", "6.7108864e+07"} <= token_bounds
    # Bounded: no label value the client chose beyond the configuration.
    values = {v for n, lab, _ in samples if n.startswith("gen_ai_") for v in lab.values()}
    assert "gpt-test-2024" not in values
    assert "m-alias" not in values


async def test_genai_histograms_off_by_default(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream(Script(openai_stream(["a"], usage=USAGE))) as fake:
        samples = await _run(http, fake, False, "m")
    assert not [n for n, _, _ in samples if n.startswith(NAMES)]
    assert _get(samples, "sluice_requests_total") == 1
