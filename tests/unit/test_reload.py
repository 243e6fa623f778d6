"""Config reload on the app's objects: what is kept, what is replaced, what is refused."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from gateway.app import GatewayState, build_state
from gateway.chain import discover_plugins
from gateway.cli import main
from gateway.config import ConfigError
from gateway.configcheck import check_config
from gateway.plugin import Plugin
from gateway.reload import Reloader, read_config
from gateway.upstreams.http import HttpUpstream

CLOSED_PORT_URL = "http://127.0.0.1:9/v1"  # never connected to: nothing is sent here


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tag: str = ""


class Closing(Plugin):
    """Records which instances were closed."""

    name = "closing"
    Options = _Options
    closed: ClassVar[list[str]] = []

    def __init__(self, options: BaseModel) -> None:
        super().__init__(options)
        assert isinstance(options, _Options)
        self.tag = options.tag

    async def close(self) -> None:
        self.closed.append(self.tag)


def _registry() -> dict[str, type[Any]]:
    installed = discover_plugins()
    return {"latency": installed["latency"], "closing": Closing}


def _config(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"admin_key": "admin", "drain_seconds": 30},
        "upstreams": {
            "a": {"kind": "openai", "base_url": CLOSED_PORT_URL},
            "b": {"kind": "openai", "base_url": "http://127.0.0.1:10/v1"},
        },
        "routes": [{"model": "m", "upstream": "a"}, {"model": "n", "upstream": "b"}],
        "plugins": [{"name": "latency"}, {"name": "closing", "options": {"tag": "one"}}],
    }
    config.update(changes)
    return config


def _write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _state(path: Path) -> tuple[GatewayState, Reloader]:
    config, source = read_config(path)
    state = build_state(config, _registry(), source=source)
    return state, Reloader(state, path, _registry())


def _pooled(upstream: HttpUpstream) -> bool:
    """Whether the upstream's connection pool is open (not narrowed by mypy, unlike a
    property read twice)."""
    return upstream.session_open


def _reloads(state: GatewayState, result: str) -> float:
    value = state.metrics.registry.get_sample_value(
        "sluice_config_reloads_total", {"result": result}
    )
    assert value is not None
    return value


async def test_unchanged_upstream_keeps_its_pool_and_breaker(tmp_path: Path) -> None:
    path = _write(tmp_path / "sluice.yaml", _config())
    state, reloader = _state(path)
    old = state.runtime
    for upstream in old.upstreams.values():
        await upstream.start()
    breaker = old.health["a"].breaker
    for _ in range(5):  # the default failure_threshold: ejected
        breaker.record_failure()
    assert breaker.state == "open"

    changed = _config()
    changed["upstreams"]["b"]["base_url"] = "http://127.0.0.1:11/v1"
    changed["routes"].append({"model": "o", "upstream": "a"})
    _write(path, changed)
    outcome = await reloader.reload()

    assert outcome is not None
    assert outcome.result == "ok", outcome.message
    assert state.upstreams["a"] is old.upstreams["a"]  # same adapter, same connection pool
    assert state.health["a"] is old.health["a"]
    assert state.health["a"].breaker.state == "open"
    assert state.upstreams["b"] is not old.upstreams["b"]
    assert state.health["b"] is not old.health["b"]
    assert state.router.models == ["m", "n", "o"]
    assert _reloads(state, "ok") == 1
    await state.generations.close()


async def test_replaced_parts_close_after_the_last_request_on_them(tmp_path: Path) -> None:
    Closing.closed.clear()
    path = _write(tmp_path / "sluice.yaml", _config())
    state, reloader = _state(path)
    old = state.runtime
    for upstream in old.upstreams.values():
        await upstream.start()
    in_flight = state.generations.enter()  # a request admitted before the reload
    latency = old.default_chain.entries[0].plugin

    changed = _config(
        plugins=[{"name": "latency"}, {"name": "closing", "options": {"tag": "two"}}],
        routes=[{"model": "m", "upstream": "a"}],
    )
    del changed["upstreams"]["b"]
    _write(path, changed)
    outcome = await reloader.reload()
    assert outcome is not None
    assert outcome.result == "ok", outcome.message
    assert state.runtime is not in_flight
    assert state.default_chain.entries[0].plugin is latency  # same spec: same instance
    await state.generations.settled()
    removed = in_flight.upstreams["b"]
    assert isinstance(removed, HttpUpstream)
    assert Closing.closed == []  # the old request still runs on "one" and on upstream b
    assert _pooled(removed)

    state.generations.leave(in_flight)
    await state.generations.settled()
    assert Closing.closed == ["one"]
    assert not _pooled(removed)
    kept = state.upstreams["a"]
    assert isinstance(kept, HttpUpstream)
    assert kept.session_open
    await state.generations.close()
    assert sorted(Closing.closed) == ["one", "two"]


async def test_invalid_file_is_refused_with_check_configs_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "sluice.yaml", _config())
    state, reloader = _state(path)
    running = state.runtime
    bad = _config(routes=[{"model": "m", "upstream": "nowhere"}])
    bad["server"]["colour"] = "blue"
    _write(path, bad)

    with caplog.at_level(logging.ERROR, logger="sluice.reload"):
        outcome = await reloader.reload()

    assert main(["check-config", str(path)]) == 1
    cli_report = capsys.readouterr().err.strip()
    assert "server.colour: unknown key" in cli_report
    assert "routes[0].upstream: unknown upstream 'nowhere'" in cli_report
    with pytest.raises(ConfigError) as refused:  # the same check, with the reloader's plugins
        check_config(path, registry=reloader.registry)
    check_report = f"sluice: {refused.value}"
    assert outcome is not None
    assert outcome.result == "invalid"
    assert outcome.message == check_report
    assert check_report in caplog.text
    assert state.runtime is running
    assert state.router.models == ["m", "n"]
    assert (_reloads(state, "invalid"), _reloads(state, "ok")) == (1, 0)
    assert state.last_reload is outcome


async def test_invalid_plugin_options_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "sluice.yaml", _config())
    state, reloader = _state(path)
    running = state.runtime
    _write(path, _config(plugins=[{"name": "closing", "options": {"nope": 1}}]))
    outcome = await reloader.reload()
    assert outcome is not None
    assert outcome.result == "invalid"
    assert "plugins[0].options.nope: unknown key" in outcome.message
    assert state.runtime is running


async def test_restart_only_settings_are_named_and_keep_their_running_value(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path / "sluice.yaml", _config())
    state, reloader = _state(path)
    changed = _config()
    changed["server"] = {"admin_key": "admin", "drain_seconds": 5, "port": 9999}
    _write(path, changed)
    outcome = await reloader.reload()
    assert outcome is not None
    assert outcome.result == "ok"
    assert outcome.needs_restart == ("server.port",)
    assert outcome.message == "server.port changed: restart to apply; other changes applied"
    assert state.config.server.port == 8080  # what the listener really uses
    assert state.config.server.drain_seconds == 5
    assert state.runtime.source.sha256 == read_config(path)[1].sha256
    await state.generations.close()


async def test_the_embedded_default_has_nothing_to_reload() -> None:
    config, source = read_config(None)
    state = build_state(config, source=source)
    reloader = Reloader(state, None)
    assert await reloader.reload() is None
    assert _reloads(state, "ok") == 0
    assert state.runtime.source.name == "<embedded default>"


async def test_the_replay_store_is_restart_only_but_route_opt_ins_reload(tmp_path: Path) -> None:
    path = _write(tmp_path / "sluice.yaml", _config())
    state, reloader = _state(path)
    changed = _config()
    changed["replay"] = {"max_entries": 5}
    changed["routes"][0]["replay"] = True
    _write(path, changed)
    outcome = await reloader.reload()
    assert outcome is not None
    assert outcome.needs_restart == ("replay",)
    assert state.config.replay.max_entries == 1000  # the store built at start-up
    assert state.runtime.config.routes[0].replay is not None
    await state.generations.close()
