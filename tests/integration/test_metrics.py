"""Prometheus metrics over loopback: real requests through a gateway, then GET /metrics parsed
with prometheus_client's own parser. Every test waits for its requests' `on_end` (a probe
plugin placed last, after which the proxy records the request without yielding) before it
scrapes, so what it reads is final.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway import __version__
from gateway.auth import hash_key
from gateway.context import Outcome
from gateway.testing.fake_upstream import (
    FakeUpstream,
    Script,
    json_script,
    openai_completion,
    openai_stream,
)
from gateway.testing.harness import RunningGateway, run_gateway
from plugins.content_filter import ContentFilter
from plugins.latency import LATENCY, LatencyMeter
from plugins.rate_limit import RateLimit
from plugins.token_count import TokenCounter
from tests.integration._support import (
    BOUND,
    CHAT,
    GatedUpstream,
    ProbeLog,
    chat_body,
    config_for,
    gated_script,
    make_probe,
)

ML_KEY = "sk-sluice-ml-metrics-key-0000001"
OPS_KEY = "sk-sluice-ops-metrics-key-000001"
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
TOKEN_COUNT = {"name": "token_count", "options": {"default_encoding": None}}
REQUEST_LABELS = {"team", "model", "upstream", "status", "outcome"}


def _registry() -> tuple[dict[str, type[Any]], ProbeLog]:
    probe, log = make_probe()
    registry: dict[str, type[Any]] = {
        "token_count": TokenCounter,
        "latency": LatencyMeter,
        "content_filter": ContentFilter,
        "rate_limit": RateLimit,
        "probe": probe,
    }
    return registry, log


def _with_teams(config: dict[str, Any], **limits: Any) -> dict[str, Any]:
    config["teams"] = {
        "ml": {"keys": [{"name": "ci", "sha256": hash_key(ML_KEY)}], "limits": limits},
        "ops": {"keys": [{"name": "bot", "sha256": hash_key(OPS_KEY)}]},
    }
    return config


def _plugins(*extra: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """`extra`, then latency and the probe (last, see the module docstring)."""
    return [*extra, {"name": "latency"}, {"name": "probe"}]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Scrape:
    """Every sample of one /metrics answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[Sample] = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def get(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels` (0 if none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def label_sets(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]

    def label_values(self) -> set[str]:
        return {value for s in self.samples for value in s.labels.values()}


async def _scrape(
    http: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None
) -> Scrape:
    async with asyncio.timeout(BOUND), http.get(f"{url}/metrics", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape(await resp.text())


async def _stream(
    http: aiohttp.ClientSession, gw: RunningGateway, key: str | None = None, **body: Any
) -> tuple[aiohttp.ClientResponse, bytes]:
    headers = _auth(key) if key else None
    async with asyncio.timeout(BOUND):
        resp = await http.post(gw.v1 + CHAT, json=chat_body(**body), headers=headers)
        return resp, await resp.read()


# ----- streamed requests: counters, histograms, labels -----------------------------------------


async def test_streams_count_tokens_histograms_and_labels(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    requests = 3
    for _ in range(requests):
        fake.queue(Script(openai_stream(["Hello", " world", "!"], usage=USAGE)))
    registry, log = _registry()
    config = _with_teams(config_for(fake, plugins=_plugins(TOKEN_COUNT)))
    async with run_gateway(config, registry=registry) as gw:
        for _ in range(requests):
            resp, _ = await _stream(http, gw, ML_KEY)
            assert resp.status == 200
            assert float(resp.headers["x-sluice-overhead-ms"]) >= 0
        ends = await log.wait_ends(requests)
        scrape = await _scrape(http, gw.url)

    ml = {"team": "ml", "model": "m"}
    assert scrape.get("sluice_prompt_tokens_total", **ml) == requests * USAGE["prompt_tokens"]
    assert scrape.get("sluice_completion_tokens_total", **ml) == (
        requests * USAGE["completion_tokens"]
    )
    assert scrape.get("sluice_time_to_first_token_seconds_count", **ml) == requests
    assert scrape.get("sluice_request_duration_seconds_count", **ml) == requests
    gaps = 0
    for ctx in ends:
        stats = ctx.get(LATENCY)
        assert stats is not None
        gaps += stats.gap_count
    assert gaps > 0
    assert scrape.get("sluice_inter_token_latency_seconds_count", model="m") == gaps
    assert scrape.get("sluice_inter_token_latency_seconds_bucket", model="m", le="+Inf") == gaps
    assert scrape.get("sluice_gateway_overhead_seconds_count", kind="request") == requests
    assert scrape.get("sluice_gateway_overhead_seconds_count", kind="event") == requests
    assert scrape.get("sluice_inflight_streams", **ml) == 0
    assert scrape.get("sluice_plugin_events_total", plugin="latency") == sum(
        ctx.events_in for ctx in ends
    )
    assert scrape.get("sluice_plugin_event_seconds_total", plugin="token_count") > 0
    assert scrape.get("sluice_build_info", version=__version__) == 1

    (labels,) = scrape.label_sets("sluice_requests_total")
    assert labels == {
        "team": "ml",
        "model": "m",
        "upstream": "fake",
        "status": "200",
        "outcome": "completed",
    }
    assert scrape.get("sluice_requests_total", **labels) == requests
    for name in ("sluice_time_to_first_token_seconds_bucket", "sluice_inflight_streams"):
        assert {frozenset(ls) - {"le"} for ls in scrape.label_sets(name)} == {
            frozenset({"team", "model"})
        }
    assert set(scrape.label_sets("sluice_inter_token_latency_seconds_count")[0]) == {"model"}
    assert "sluice_retries_total" not in {s.name for s in scrape.samples}


async def test_disconnect_counts_the_local_partial_count_and_inflight_returns_to_zero(
    gated: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    script, (rest,) = gated_script(openai_stream(["one", " two", " three"], usage=USAGE), 2)
    gated.queue(script)
    registry, log = _registry()
    config = _with_teams(config_for(gated, plugins=_plugins(TOKEN_COUNT)))
    async with run_gateway(config, registry=registry) as gw:
        async with asyncio.timeout(BOUND):
            resp = await http.post(gw.v1 + CHAT, json=chat_body(), headers=_auth(OPS_KEY))
            await resp.content.readuntil(b"\n\n")
            during = await _scrape(http, gw.url)
            resp.close()
        (ctx,) = await log.wait_ends(1)
        after = await _scrape(http, gw.url)
    rest.set()

    ops = {"team": "ops", "model": "m"}
    assert during.get("sluice_inflight_streams", **ops) == 1
    assert after.get("sluice_inflight_streams", **ops) == 0
    assert ctx.outcome is Outcome.CLIENT_DISCONNECTED
    assert ctx.usage.source == "local_partial"
    assert ctx.usage.completion_tokens
    assert after.get("sluice_completion_tokens_total", **ops) == ctx.usage.completion_tokens
    assert after.get("sluice_prompt_tokens_total", **ops) == ctx.usage.prompt_tokens
    assert after.get("sluice_requests_total", outcome="client_disconnected", **ops) == 1


async def test_unary_requests_carry_the_exact_overhead(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(json_script(openai_completion("Hi there")))
    registry, log = _registry()
    async with run_gateway(config_for(fake, plugins=_plugins()), registry=registry) as gw:
        async with asyncio.timeout(BOUND):
            resp = await http.post(gw.v1 + CHAT, json=chat_body(stream=False))
            await resp.read()
        assert resp.status == 200
        (ctx,) = await log.wait_ends(1)
        scrape = await _scrape(http, gw.url)
    header = float(resp.headers["x-sluice-overhead-ms"])
    assert header == pytest.approx(ctx.overhead_seconds * 1000.0, abs=0.001)
    assert 0 <= ctx.overhead_seconds < ctx.timing.ended - ctx.timing.received  # type: ignore[operator]
    assert scrape.get("sluice_gateway_overhead_seconds_count", kind="request") == 1
    assert scrape.get("sluice_gateway_overhead_seconds_count", kind="event") == 0
    anonymous = {"team": "anonymous", "model": "m"}
    assert scrape.get("sluice_prompt_tokens_total", **anonymous) == 5
    assert scrape.get("sluice_completion_tokens_total", **anonymous) == 2
    assert scrape.get("sluice_time_to_first_token_seconds_count") == 0  # streams only


# ----- bounded labels ----------------------------------------------------------------------


async def test_unknown_model_names_never_become_label_values(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    registry, log = _registry()
    async with run_gateway(config_for(fake, plugins=_plugins()), registry=registry) as gw:
        for model in ("evil{}", 'x"y\\z', "a" * 300):
            resp, _ = await _stream(http, gw, model=model)
            assert resp.status == 404
            assert "x-sluice-overhead-ms" in resp.headers
        await log.wait_ends(3)
        scrape = await _scrape(http, gw.url)
    assert (
        scrape.get(
            "sluice_requests_total",
            team="anonymous",
            model="other",
            upstream="none",
            status="404",
            outcome="rejected",
        )
        == 3
    )
    assert "evil" not in scrape.text
    assert "aaaa" not in scrape.text
    assert scrape.label_values() <= {
        "anonymous",
        "other",
        "none",
        "404",
        "rejected",
        "fake",
        "m",
        "request",
        "event",
        "prompt",
        "completion",
        "latency",
        "probe",
        __version__,
        "ok",  # sluice_config_reloads_total{result}
        "invalid",
        "error",
        gw.state.runtime.source.sha256,  # sluice_config_info{sha256}
    } | {s.labels["le"] for s in scrape.samples if "le" in s.labels}


# ----- upstream health, retries, queues ----------------------------------------------------


async def test_ejection_sets_the_breaker_gauge_and_counts_errors(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(json_script({"error": {"message": "down"}}, status=503))
    registry, log = _registry()
    config = config_for(fake, plugins=_plugins(), failure_threshold=1, cooldown_seconds=60)
    async with run_gateway(config, registry=registry) as gw:
        before = await _scrape(http, gw.url)
        resp, _ = await _stream(http, gw)
        assert resp.status == 502
        await log.wait_ends(1)
        after = await _scrape(http, gw.url)
    assert before.get("sluice_upstream_breaker_state", upstream="fake") == 0
    assert before.get("sluice_upstream_ejections_total", upstream="fake") == 0
    assert after.get("sluice_upstream_breaker_state", upstream="fake") == 2
    assert after.get("sluice_upstream_ejections_total", upstream="fake") == 1
    assert after.get("sluice_upstream_errors_total", upstream="fake", kind="status_5xx") == 1
    assert after.get("sluice_upstream_queue_depth", upstream="fake") == 0
    assert after.get("sluice_requests_total", upstream="fake", status="502") == 1


async def test_retries_and_queue_waits_are_counted(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(
        json_script({"error": {"message": "busy"}}, status=429),
        Script(openai_stream(["ok"])),
    )
    registry, log = _registry()
    config = config_for(fake, plugins=_plugins(), route={"retries": 1}, max_concurrent=1)
    async with run_gateway(config, registry=registry) as gw:
        resp, _ = await _stream(http, gw)
        assert resp.status == 200
        await log.wait_ends(1)
        scrape = await _scrape(http, gw.url)
    assert scrape.get("sluice_retries_total", model="m") == 1
    assert scrape.get("sluice_upstream_errors_total", upstream="fake", kind="status_429") == 1
    assert scrape.get("sluice_upstream_queue_wait_seconds_count", upstream="fake") == 2
    assert scrape.get("sluice_requests_total", status="200", outcome="completed") == 1


async def test_stream_failures_are_counted_by_kind(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script(openai_stream(["cut"], done=False)))  # no [DONE]: truncated
    registry, log = _registry()
    async with run_gateway(config_for(fake, plugins=_plugins()), registry=registry) as gw:
        resp, _ = await _stream(http, gw)
        assert resp.status == 200
        await log.wait_ends(1)
        scrape = await _scrape(http, gw.url)
    assert scrape.get("sluice_upstream_errors_total", upstream="fake", kind="truncated") == 1
    assert scrape.get("sluice_requests_total", status="200", outcome="upstream_error") == 1


# ----- plugins -------------------------------------------------------------------------------


async def test_rate_limit_rejections_are_counted_by_team_and_kind(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    registry, log = _registry()
    plugins = _plugins({"name": "rate_limit"})
    config = _with_teams(config_for(fake, plugins=plugins), requests_per_minute=1)
    async with run_gateway(config, registry=registry) as gw:
        statuses = []
        for _ in range(3):
            resp, _ = await _stream(http, gw, ML_KEY)
            statuses.append(resp.status)
        await log.wait_ends(3)
        scrape = await _scrape(http, gw.url)
    assert statuses == [200, 429, 429]
    assert scrape.get("sluice_rate_limit_rejections_total", team="ml", kind="requests") == 2
    assert scrape.get("sluice_requests_total", team="ml", status="429", outcome="rejected") == 2
    assert scrape.get("sluice_rate_limit_backend_failures_total") == 0


async def test_content_filter_actions_are_counted_by_rule_and_action(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script(openai_stream(["say", " foo", " now"])))
    registry, log = _registry()
    rules = [{"name": "banned", "words": ["foo"]}, {"detector": "email"}]
    plugins = _plugins({"name": "content_filter", "options": {"rules": rules}})
    async with run_gateway(config_for(fake, plugins=plugins), registry=registry) as gw:
        redacted, body = await _stream(http, gw)
        assert redacted.status == 200
        assert b"REDACTED:banned" in body
        blocked, _ = await _stream(
            http, gw, messages=[{"role": "user", "content": "mail me at a@example.com"}]
        )
        assert blocked.status == 400
        await log.wait_ends(2)
        scrape = await _scrape(http, gw.url)
    actions = "sluice_content_filter_actions_total"
    assert scrape.get(actions, rule="banned", action="completion_redact") == 1
    assert scrape.get(actions, rule="email", action="prompt_reject") == 1
    assert scrape.get("sluice_plugin_errors_total", plugin="content_filter") == 0


# ----- the endpoint ----------------------------------------------------------------------------


async def test_metrics_on_a_separate_port(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    config = config_for(fake, server={"metrics": {"port": 0}})
    async with run_gateway(config) as gw:
        port = gw.state.metrics_port
        assert port is not None
        assert port != int(gw.url.rsplit(":", 1)[1])
        async with http.get(f"{gw.url}/metrics") as resp:
            assert resp.status == 404
        scrape = await _scrape(http, f"http://127.0.0.1:{port}")
    assert scrape.get("sluice_build_info", version=__version__) == 1
    assert gw.state.metrics_port is None  # closed with the gateway


async def test_metrics_need_the_admin_key_when_required(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    admin = "admin-secret-for-metrics"
    server = {"admin_key": admin, "metrics": {"require_admin_key": True}}
    async with run_gateway(config_for(fake, server=server)) as gw:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with http.get(f"{gw.url}/metrics", headers=headers) as resp:
                assert resp.status == 401
                assert b"sluice_" not in await resp.read()
        await _scrape(http, gw.url, {"Authorization": f"Bearer {admin}"})
        await _scrape(http, gw.url, {"X-Admin-Key": admin})


async def test_metrics_can_be_disabled(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    config = config_for(fake, server={"metrics": {"enabled": False}})
    async with run_gateway(config) as gw, http.get(f"{gw.url}/metrics") as resp:
        assert resp.status == 404


async def test_openmetrics_is_served_when_asked_for(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with run_gateway(config_for(fake)) as gw:
        accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with http.get(f"{gw.url}/metrics", headers=accept) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await resp.text()).endswith("# EOF\n")
