"""Team limits are enforced by the rate_limit plugin: limits nothing enforces are refused
at start-up (and by `sluice check-config`), naming the key and what to add."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.auth import hash_key
from gateway.cli import main
from gateway.config import ConfigError, parse_config

KEY = {"name": "ci", "sha256": hash_key("sk-limits-config-0000000000000001")}


def config(
    team: dict[str, Any], plugins: list[Any] | None = None, route_plugins: list[Any] | None = None
) -> dict[str, Any]:
    """Team `ml` with `team`'s settings; `plugins` globally, `route_plugins` on route m."""
    return {
        "upstreams": {"d": {"kind": "demo"}},
        "routes": [{"model": "m", "upstream": "d", "plugins": route_plugins or []}],
        "teams": {"ml": {"keys": [KEY], **team}},
        "plugins": plugins or [],
    }


@pytest.mark.parametrize(
    ("team", "where"),
    [
        ({"limits": {"concurrent_streams": 1}}, "teams.ml.limits"),
        ({"model_limits": {"m": {"tokens_per_minute": 10}}}, "teams.ml.model_limits.m"),
        (
            {"keys": [{**KEY, "limits": {"requests_per_minute": 5}}]},
            "teams.ml.keys[0].limits",
        ),
    ],
)
def test_limits_without_the_rate_limit_plugin_are_refused(team: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config(team), {})
    message = str(info.value)
    assert where in message
    assert "add the rate_limit plugin to `plugins`" in message


def test_limits_with_the_plugin_globally_or_on_a_route_are_accepted() -> None:
    team = {"limits": {"concurrent_streams": 1}}
    parse_config(config(team, [{"name": "rate_limit"}]), {})
    parse_config(config(team, route_plugins=[{"name": "rate_limit"}]), {})
    parse_config(config({}), {})  # no limits, no plugin: fine


def test_check_config_refuses_limits_nothing_enforces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sluice.yaml"
    path.write_text(yaml.safe_dump(config({"limits": {"concurrent_streams": 1}})))
    assert main(["check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "OK" not in out
    assert "teams.ml.limits" in err
    assert "add the rate_limit plugin" in err
