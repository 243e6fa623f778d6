"""The whole config check behind `sluice check-config` and `sluice serve`: every problem at once.

The core models and every plugin's options are validated in the same run, so a file with
a bad route and a bad plugin option lists both, each under its key path, instead of
revealing the plugin problem only once the core ones are fixed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gateway.app import build_state
from gateway.chain import check_plugin_options, discover_plugins
from gateway.config import (
    ConfigError,
    GatewayConfig,
    config_from_tree,
    config_report,
    load_config_tree,
    read_config_text,
)
from gateway.config_yaml import expand_env, placeholder_consequence


def _plugin_specs(data: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(key path, entry) of every plugin entry in a raw config tree: global, then per route."""
    plugins = data.get("plugins")
    if isinstance(plugins, list):
        yield from ((f"plugins[{i}]", spec) for i, spec in enumerate(plugins))
    routes = data.get("routes")
    if isinstance(routes, list):
        for r, route in enumerate(routes):
            plugins = route.get("plugins") if isinstance(route, dict) else None
            if isinstance(plugins, list):
                yield from ((f"routes[{r}].plugins[{i}]", spec) for i, spec in enumerate(plugins))


def plugin_problems(
    data: Any, registry: Mapping[str, type[Any]], env: Mapping[str, str] | None = None
) -> list[str]:
    """Unknown plugins and bad plugin options in a raw config tree that failed validation.

    Entries the core validation already refuses (no name, options not a mapping) are left
    to it, and so are the consequences of a missing `${VAR}` (see placeholder_consequence).
    """
    if not isinstance(data, dict):
        return []
    expanded, missing = expand_env(data, env)
    problems: list[str] = []
    for where, spec in _plugin_specs(expanded):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            continue
        options = spec.get("options", {})
        if not isinstance(options, dict):
            continue
        problems += [
            line
            for loc, line in check_plugin_options(spec["name"], options, registry, where)
            if not placeholder_consequence(loc, line, missing)
        ]
    return problems


def check_config(
    path: Path | None,
    env: Mapping[str, str] | None = None,
    registry: Mapping[str, type[Any]] | None = None,
) -> GatewayConfig:
    """Load `path` (None: the embedded default) and build what `serve` builds from it.

    Raises one ConfigError listing every problem found: the file's core validation errors,
    missing environment variables, unknown plugins and every bad plugin option.
    """
    registry = discover_plugins() if registry is None else registry
    text, source = read_config_text(path)
    data = load_config_tree(text, source)  # unreadable or not YAML: nothing more to check
    try:
        config = config_from_tree(data, source, env, embedded=path is None)
    except ConfigError as err:
        problems = [*err.problems, *plugin_problems(data, registry, env)]
        raise config_report(problems, source) from None
    try:
        build_state(config, registry)
    except ConfigError as err:
        raise config_report(err.problems, source) from None
    return config
