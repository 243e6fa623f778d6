"""The Prometheus side of the gateway, against real `promtool` and `prometheus` binaries.

- deploy/prometheus/sluice-rules.yaml passes `promtool check rules`, and its unit tests
  (sluice-rules.test.yaml) pass `promtool test rules`;
- a live /metrics page passes `promtool check metrics` (no lint problems), and exposes every
  metric the dashboard and the rules read;
- end to end: a Prometheus server on loopback scrapes a running gateway every second, with
  the rules loaded; after some traffic, every query of deploy/grafana/sluice-dashboard.json
  and every rule expression runs through its HTTP API, and the ones this traffic feeds
  return data.

Binaries missing: the tests skip, or fail when CI is set (`apt-get install prometheus`).
Every wait is bounded; Prometheus is polled through its HTTP API, never waited on by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
import yaml

from gateway.testing.harness import RunningGateway, run_gateway
from tests.integration._support import chat_body, closed_port

REPO: Final = Path(__file__).resolve().parents[2]
DASHBOARD: Final = REPO / "deploy" / "grafana" / "sluice-dashboard.json"
RULES: Final = REPO / "deploy" / "prometheus" / "sluice-rules.yaml"
RULES_TEST: Final = REPO / "deploy" / "prometheus" / "sluice-rules.test.yaml"

INSTALL_HINT: Final = "install it with `apt-get install prometheus` (it provides promtool)"
PROMTOOL_TIMEOUT: Final = 60.0  # seconds; a subprocess bound, never a pace
STARTUP_BOUND: Final = 30.0  # Prometheus start, first scrape
SETTLE_BOUND: Final = 30.0  # traffic scraped, rules evaluated
HTTP_BOUND: Final = 10.0  # any single HTTP call

# The demo config of the brief: one embedded demo model, token_count and latency plugins.
DEMO_CONFIG: Final[Mapping[str, Any]] = {
    "upstreams": {"demo": {"kind": "demo", "ttft_ms": 5, "itl_ms": 2}},
    "routes": [{"model": "demo", "upstream": "demo"}],
    "plugins": [{"name": "token_count"}, {"name": "latency"}],
}

# The demo config with every built-in plugin whose metrics the dashboard or the rules read
# (a plugin's metrics exist only where it is enabled: it declares them itself).
ALL_METRICS_CONFIG: Final[Mapping[str, Any]] = {
    **DEMO_CONFIG,
    "plugins": [
        {"name": "token_count"},
        {"name": "rate_limit"},
        {"name": "content_filter"},
        {"name": "latency"},
    ],
}

# Every metric family the gateway is meant to expose (docs/metrics.md); the dashboard and
# the rules together must use each of them.
METRIC_FAMILIES: Final = frozenset(
    {
        "sluice_requests_total",
        "sluice_time_to_first_token_seconds",
        "sluice_inter_token_latency_seconds",
        "sluice_request_duration_seconds",
        "sluice_gateway_overhead_seconds",
        "sluice_plugin_event_seconds_total",
        "sluice_plugin_events_total",
        "sluice_prompt_tokens_total",
        "sluice_completion_tokens_total",
        "sluice_token_count_difference_tokens",
        "sluice_inflight_streams",
        "sluice_upstream_errors_total",
        "sluice_retries_total",
        "sluice_upstream_breaker_state",
        "sluice_upstream_ejections_total",
        "sluice_upstream_queue_depth",
        "sluice_upstream_queue_wait_seconds",
        "sluice_rate_limit_rejections_total",
        "sluice_content_filter_actions_total",
        "sluice_tokenizer_estimator_in_use",
        "sluice_rate_limit_backend_failures_total",
        "sluice_plugin_errors_total",
        "sluice_build_info",
    }
)

# Queries the end-to-end traffic below cannot feed (no rate_limit or content_filter plugin,
# no 429): they must run without error, but may return nothing. Keys are dashboard
# "panel title [refId]" or rule names; a key that names no query fails the test.
MAY_BE_EMPTY: Final[Mapping[str, str]] = {
    "429s per team [A]": "no request is answered 429",
    "429s per team [B]": "no rate_limit plugin",
    "Content filter actions [A]": "no content_filter plugin",
    "sluice:rate_limit_rejections:rate5m": "no rate_limit plugin",
    "Rate-limit backend failures [A]": "no rate_limit plugin (its metrics exist only with it)",
    # Alert conditions that do not hold here (the other two do: see check_values).
    "SluiceHighTimeToFirstToken": "alert: TTFT is well under 10 s here",
    "SluiceRateLimitBackendFailing": "alert: no rate-limit backend",
}

# Template variables: what the end-to-end test substitutes for each (Grafana's "All" is .*).
ALL_VALUES: Final[Mapping[str, str]] = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$model": ".*",
    "$team": ".*",
}
REAL_VALUES: Final[Mapping[str, str]] = {**ALL_VALUES, "$model": "demo", "$team": "anonymous"}

_METRIC_NAME: Final = re.compile(r"\bsluice_[a-z0-9_]*[a-z0-9]")
_LABEL_VALUES: Final = re.compile(r"^label_values\((?:(?P<match>.+),\s*)?(?P<label>\w+)\)$")


# ----- binaries -------------------------------------------------------------------------------


def require_binary(name: str) -> str:
    """The binary's path; skip without it, or fail when CI is set."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH: {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (required in CI)")
        pytest.skip(message)
    return path


@pytest.fixture
def promtool() -> str:
    return require_binary("promtool")


@pytest.fixture
def prometheus_binary() -> str:
    return require_binary("prometheus")


def run_promtool(promtool: str, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
    """Exit code and combined output of one promtool run."""
    proc = subprocess.run(
        [promtool, *args],
        input=stdin,
        capture_output=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
        cwd=REPO,
    )
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    return proc.returncode, output


# ----- the dashboard and the rules as data ----------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One PromQL expression of the dashboard or the rules file."""

    key: str  # "panel title [refId]", or the rule's record/alert name
    expr: str


def _panels(panels: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as handle:
        dashboard: dict[str, Any] = json.load(handle)
    return dashboard


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[Query]:
    """`targets[].expr` of every panel, keyed "title [refId]"."""
    return [
        Query(f"{panel['title']} [{target['refId']}]", target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def load_rules() -> list[dict[str, Any]]:
    with RULES.open(encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    return [rule for group in document["groups"] for rule in group["rules"]]


def rule_queries() -> list[Query]:
    """Every recording and alerting rule's `expr`, keyed by its name."""
    return [Query(rule.get("record") or rule["alert"], rule["expr"]) for rule in load_rules()]


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """The expression with Grafana's template variables replaced (longest names first)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name[1:] + "}", values[name]).replace(name, values[name])
    assert "$" not in expr, f"unsubstituted template variable in {expr!r}"
    return expr


def referenced_metrics(exprs: Iterable[str]) -> set[str]:
    """The sluice_* series names the expressions read."""
    return {name for expr in exprs for name in _METRIC_NAME.findall(expr)}


# ----- dashboard and rules files: structure ---------------------------------------------------


def test_dashboard_is_a_grafana_dashboard_with_the_expected_variables() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "team"):
        assert variables[name]["type"] == "query"
        assert variables[name]["definition"].startswith("label_values(")
        assert variables[name]["includeAll"] is True
        assert variables[name]["allValue"] == ".*"
    panels = list(_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        targets = panel["targets"]
        assert targets, f"panel {panel['title']!r} has no query"
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in targets:
            assert target["expr"].strip(), panel["title"]
    keys = [query.key for query in dashboard_queries(dashboard)]
    assert len(keys) == len(set(keys)), "panel titles must be unique"


def test_dashboard_and_rules_read_every_metric_and_nothing_else() -> None:
    exprs = [q.expr for q in dashboard_queries(load_dashboard())] + [q.expr for q in rule_queries()]
    used = {_family(name) for name in referenced_metrics(exprs)}
    assert METRIC_FAMILIES - used == set(), "metrics no query reads"
    assert used - METRIC_FAMILIES == set(), "queries read metrics the gateway does not define"


def _family(name: str) -> str:
    """A series name's family: histogram series lose _bucket/_sum/_count."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in METRIC_FAMILIES:
            return base
    return name


def test_may_be_empty_names_only_existing_queries() -> None:
    keys = {q.key for q in dashboard_queries(load_dashboard())} | {q.key for q in rule_queries()}
    assert set(MAY_BE_EMPTY) - keys == set()


# ----- promtool -------------------------------------------------------------------------------


def test_promtool_check_rules(promtool: str) -> None:
    code, output = run_promtool(promtool, "check", "rules", str(RULES))
    assert code == 0, output
    assert "SUCCESS" in output, output


def test_promtool_test_rules(promtool: str) -> None:
    code, output = run_promtool(promtool, "test", "rules", str(RULES_TEST))
    assert code == 0, output
    assert "SUCCESS" in output, output


async def stream(
    http: aiohttp.ClientSession, gateway: RunningGateway, model: str, **extra: Any
) -> int:
    """One streamed chat request, read to its end; its HTTP status."""
    async with asyncio.timeout(HTTP_BOUND):
        body = chat_body(model=model, **extra)
        async with http.post(f"{gateway.v1}/chat/completions", json=body) as response:
            await response.read()
            return response.status


async def get_metrics(http: aiohttp.ClientSession, gateway: RunningGateway) -> str:
    async with asyncio.timeout(HTTP_BOUND), http.get(f"{gateway.url}/metrics") as response:
        assert response.status == 200, await response.text()
        return await response.text()


@dataclass(frozen=True)
class Exposition:
    """What an exposition page declares (`# TYPE` lines) and the series names it carries."""

    families: Mapping[str, str]  # family name to type
    series: frozenset[str]

    @classmethod
    def parse(cls, page: str) -> Exposition:
        families: dict[str, str] = {}
        series: set[str] = set()
        for line in page.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                families[name] = kind
            elif line and not line.startswith("#"):
                series.add(re.split(r"[{ ]", line, maxsplit=1)[0])
        return cls(families, frozenset(series))

    def provides(self, name: str) -> bool:
        """Whether a query can read series `name` here: it is on the page, or its family is
        declared with no series yet (a labelled metric nothing has touched)."""
        if name in self.series:
            return True
        family = name
        for suffix in ("_bucket", "_sum", "_count"):
            base = name.removesuffix(suffix)
            if base != name and self.families.get(base) == "histogram":
                family = base
        if family not in self.families:
            return False
        return not any(s == family or s.startswith(f"{family}_") for s in self.series)


async def test_live_metrics_page_passes_promtool_check_metrics(
    promtool: str, http: aiohttp.ClientSession
) -> None:
    usage = {"stream_options": {"include_usage": True}}  # feeds the token-count difference
    async with run_gateway(ALL_METRICS_CONFIG) as gateway:
        calls = [stream(http, gateway, "demo", **(usage if i % 2 else {})) for i in range(4)]
        assert await asyncio.gather(*calls) == [200] * 4
        assert await stream(http, gateway, "no-such-model") == 404
        page = await get_metrics(http, gateway)

    code, output = await asyncio.to_thread(
        run_promtool, promtool, "check", "metrics", stdin=page.encode()
    )
    assert code == 0, f"promtool check metrics:\n{output}"
    assert output.strip() == "", f"promtool lint output:\n{output}"

    exposition = Exposition.parse(page)
    missing = METRIC_FAMILIES - set(exposition.families)
    assert missing == set(), f"not on /metrics: {sorted(missing)}"
    read = referenced_metrics(
        [q.expr for q in dashboard_queries(load_dashboard())] + [q.expr for q in rule_queries()]
    )
    assert {name for name in read if not exposition.provides(name)} == set()


# ----- a Prometheus server on loopback --------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Prometheus:
    """A running server and a client for its HTTP API."""

    url: str
    process: asyncio.subprocess.Process
    log: Path
    http: aiohttp.ClientSession

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    async def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET /api/v1/<path>: the decoded JSON body, whatever the HTTP status."""
        async with (
            asyncio.timeout(HTTP_BOUND),
            self.http.get(f"{self.url}/api/v1/{path}", params=params) as response,
        ):
            return await response.json(content_type=None)

    async def query(self, expr: str) -> dict[str, Any]:
        """An instant query's response body (`status`, `data` or `error`)."""
        body: dict[str, Any] = await self.api("query", {"query": expr})
        return body

    async def scalar(self, expr: str) -> float | None:
        """The value of a one-sample instant query, None when it returned nothing."""
        body = await self.query(expr)
        assert body["status"] == "success", body
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    async def poll(self, check: Callable[[], Awaitable[bool]], within: float) -> bool:
        """Poll `check` (an API call) until it holds (True) or `within` seconds pass (False)."""
        deadline = time.monotonic() + within
        while not await check():
            if self.process.returncode is not None:
                pytest.fail(
                    f"prometheus exited (code {self.process.returncode}):\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)  # the polling interval of a bounded wait
        return True

    async def wait_for(
        self, what: str, check: Callable[[], Awaitable[bool]], within: float
    ) -> None:
        """`poll`, failing the test after `within` seconds."""
        if not await self.poll(check, within):
            pytest.fail(f"timed out after {within}s waiting for {what}:\n{self.log_tail()}")


def write_config(directory: Path, target: str) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "sluice",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@contextlib.asynccontextmanager
async def running_prometheus(
    binary: str, directory: Path, target: str, http: aiohttp.ClientSession
) -> AsyncIterator[Prometheus]:
    """Prometheus on a free loopback port scraping `target`, its data in `directory`."""
    config = write_config(directory, target)
    log = directory / "prometheus.log"
    port = free_port()
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log, http)
    try:

        async def ready() -> bool:
            try:
                async with (
                    asyncio.timeout(HTTP_BOUND),
                    http.get(f"{server.url}/-/ready") as response,
                ):
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await server.wait_for("/-/ready", ready, STARTUP_BOUND)
        yield server
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


# ----- end to end -----------------------------------------------------------------------------


def e2e_config() -> dict[str, Any]:
    """The demo config plus what makes more series move.

    - a concurrency gate on the demo upstream: queue waits;
    - route `broken`: two upstreams that refuse connections, one retry per request (502s,
      upstream errors, retries; failure_threshold high enough never to eject them);
    - route `ejected`: an upstream ejected by its first failure for the rest of the test
      (breaker state 2, one ejection).
    """
    refused = {"kind": "openai", "include_usage": False}
    demo = DEMO_CONFIG["upstreams"]["demo"]
    return {
        **DEMO_CONFIG,
        "upstreams": {
            "demo": {**demo, "max_concurrent": 4},
            "down-a": {**refused, "base_url": refused_url(), "failure_threshold": 100},
            "down-b": {**refused, "base_url": refused_url(), "failure_threshold": 100},
            "down-c": {
                **refused,
                "base_url": refused_url(),
                "failure_threshold": 1,
                "cooldown_seconds": 3600,
            },
        },
        "routes": [
            *DEMO_CONFIG["routes"],
            {
                "model": "broken",
                "retries": 1,
                "deployments": [{"upstream": "down-a"}, {"upstream": "down-b"}],
            },
            {"model": "ejected", "upstream": "down-c", "retries": 0},
        ],
    }


def refused_url() -> str:
    return f"http://127.0.0.1:{closed_port()}/v1"


async def send_wave(http: aiohttp.ClientSession, gateway: RunningGateway, wave: int) -> int:
    """17 requests at once: 12 demo streams (half asking for usage), 2 to an unknown model,
    2 to `broken` and 1 to `ejected`; returns how many were sent."""
    usage = {"stream_options": {"include_usage": True}}
    calls = [stream(http, gateway, "demo", **(usage if i % 2 else {})) for i in range(12)]
    models = ("no-such-model", "no-such-model", "broken", "broken", "ejected")
    calls += [stream(http, gateway, model) for model in models]
    statuses = await asyncio.gather(*calls)
    # `ejected` fails once (502) and is ejected: the next wave gets the breaker's 503.
    ejected = 502 if wave == 1 else 503
    assert statuses == [200] * 12 + [404, 404, 502, 502, ejected], statuses
    return len(statuses)


async def test_every_dashboard_and_rule_query_against_a_real_prometheus(
    prometheus_binary: str, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    dashboard = load_dashboard()
    queries = dashboard_queries(dashboard) + rule_queries()
    async with run_gateway(e2e_config()) as gateway:
        target = gateway.url.removeprefix("http://")
        async with running_prometheus(prometheus_binary, tmp_path, target, http) as prom:

            async def up() -> bool:
                return await prom.scalar('up{job="sluice"}') == 1

            await prom.wait_for("the first scrape (up == 1)", up, STARTUP_BOUND)

            # Two waves with a scrape between them, so every rate() has an increase.
            sent = 0
            for wave in (1, 2):
                sent += await send_wave(http, gateway, wave)

                async def scraped(total: int = sent) -> bool:
                    seen = await prom.scalar("sum(sluice_requests_total)")
                    return seen is not None and seen >= total

                await prom.wait_for(f"wave {wave} scraped", scraped, SETTLE_BOUND)

            await check_rules_loaded(prom)
            await check_template_variables(prom, dashboard)
            await check_queries(prom, queries)
            await check_values(prom, {q.key: q.expr for q in queries})


async def check_rules_loaded(prom: Prometheus) -> None:
    """Every rule of the file is loaded, has been evaluated, and is healthy."""
    names = {rule.get("record") or rule["alert"] for rule in load_rules()}

    async def evaluated() -> bool:
        body = await prom.api("rules")
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        return {r["name"] for r in rules} == names and all(r["health"] != "unknown" for r in rules)

    await prom.wait_for("every rule evaluated", evaluated, SETTLE_BOUND)
    body = await prom.api("rules")
    unhealthy = {
        r["name"]: r.get("lastError")
        for g in body["data"]["groups"]
        for r in g["rules"]
        if r["health"] != "ok"
    }
    assert unhealthy == {}


async def check_template_variables(prom: Prometheus, dashboard: Mapping[str, Any]) -> None:
    """The `label_values(...)` variables list the traffic's models and teams."""
    expected = {"model": "demo", "team": "anonymous"}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = _LABEL_VALUES.match(variable["definition"])
        assert match is not None, variable["definition"]
        params = {}
        if match["match"]:
            params["match[]"] = substitute(match["match"], ALL_VALUES)
        body = await prom.api(f"label/{match['label']}/values", params)
        assert body["status"] == "success", body
        assert expected[variable["name"]] in body["data"], (variable["name"], body["data"])


async def check_queries(prom: Prometheus, queries: list[Query]) -> None:
    """Every query parses and runs; those this traffic feeds return a finite sample.

    Recording rules are evaluated every second after a scrape, so data is polled for
    (bounded) before the final, asserted pass.
    """
    required = [q for q in queries if q.key not in MAY_BE_EMPTY]

    async def has_data(query: Query) -> bool:
        body = await prom.query(substitute(query.expr, ALL_VALUES))
        return body["status"] == "success" and any(
            math.isfinite(float(sample["value"][1])) for sample in body["data"]["result"]
        )

    async def all_have_data() -> bool:
        results = await asyncio.gather(*(has_data(q) for q in required))
        return all(results)

    await prom.poll(all_have_data, SETTLE_BOUND)  # then report exactly which ones lack data

    failures: list[str] = []
    for query in queries:
        for values in (ALL_VALUES, REAL_VALUES):
            expr = substitute(query.expr, values)
            body = await prom.query(expr)
            if body["status"] != "success":
                failures.append(f"{query.key}: {body.get('errorType')}: {body.get('error')}")
                continue
            if values is not ALL_VALUES or query.key in MAY_BE_EMPTY:
                continue
            samples = body["data"]["result"]
            if not samples:
                failures.append(f"{query.key}: no data for {expr}")
            elif not any(math.isfinite(float(s["value"][1])) for s in samples):
                failures.append(f"{query.key}: only NaN/Inf for {expr}: {samples}")
    assert failures == [], "\n".join(failures)


async def check_values(prom: Prometheus, exprs: Mapping[str, str]) -> None:
    """A few values this traffic determines, beyond "there is data"."""

    async def values(key: str, label: str) -> dict[str, float]:
        body = await prom.query(substitute(exprs[key], ALL_VALUES))
        assert body["status"] == "success", body
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in body["data"]["result"]}

    # down-c was ejected by its first failure; the others never were.
    assert set(await values("SluiceUpstreamEjected", "upstream")) == {"down-c"}
    breaker = await values("Circuit breaker state [A]", "upstream")
    assert breaker == {"demo": 0, "down-a": 0, "down-b": 0, "down-c": 2}
    # 3 of every 17 requests failed (502/503): the error-rate alert's condition holds.
    assert set(await values("SluiceHighErrorRate", "team")) == {"anonymous"}
    assert (await values("Retries per model [A]", "model")).get("broken", 0) > 0
    assert (
        0
        < (await values("Time to first token per model (p50 / p95 / p99) [A]", "model"))["demo"]
        < 10
    )
    # Both plugins ran on every streamed event and cost something.
    assert set(await values("Plugin time per event (µs) [A]", "plugin")) == {
        "latency",
        "token_count",
    }
