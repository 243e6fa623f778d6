"""Config loading: YAML shape, ${VAR} expansion, and errors that name the offending key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    ConfigError,
    DemoUpstream,
    OpenAIUpstream,
    load_config,
    parse_config,
)
from gateway.config_yaml import load_yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "config.example.yaml"

MINIMAL_ISSUE_YAML = """\
upstreams:
  local-vllm:
    kind: openai
    base_url: http://127.0.0.1:8000/v1
    api_key: ${VLLM_API_KEY}
routes:
  - model: llama-3-8b
    upstream: local-vllm
    upstream_model: meta-llama/Meta-Llama-3-8B-Instruct
  - model: same-name
    upstream: local-vllm
"""


def _write(tmp_path: Path, text: str, name: str = "sluice.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _demo_config(**top: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "upstreams": {"d": {"kind": "demo"}},
        "routes": [{"model": "m", "upstream": "d"}],
    }
    data.update(top)
    return data


def _with_upstream(upstream: dict[str, Any], name: str = "x") -> dict[str, Any]:
    return {"upstreams": {name: upstream}, "routes": [{"model": "m", "upstream": name}]}


def _error(data: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, {} if env is None else env)
    return str(info.value)


# --- the shape from the issue ------------------------------------------------------------


def test_minimal_issue_shape_parses(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL_ISSUE_YAML), {"VLLM_API_KEY": "sk-local"})

    upstream = config.upstreams["local-vllm"]
    assert isinstance(upstream, OpenAIUpstream)
    assert upstream.base_url == "http://127.0.0.1:8000/v1"
    assert upstream.api_key is not None
    assert upstream.api_key.get_secret_value() == "sk-local"
    assert [r.model for r in config.routes] == ["llama-3-8b", "same-name"]
    assert config.routes[0].upstream == "local-vllm"
    assert config.auth == "none"
    assert config.plugins == []


def test_upstream_model_defaults_to_model(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL_ISSUE_YAML), {"VLLM_API_KEY": "k"})

    assert config.routes[0].target_model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert config.routes[1].upstream_model is None
    assert config.routes[1].target_model == "same-name"


def test_defaults_fill_server_and_timeouts() -> None:
    config = parse_config(_with_upstream({"kind": "openai", "base_url": "http://h/v1"}), {})

    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    upstream = config.upstreams["x"]
    assert isinstance(upstream, OpenAIUpstream)
    assert upstream.api_key is None
    assert upstream.timeouts.first_byte == 120.0
    assert upstream.timeouts.idle == 60.0


# --- ${VAR} expansion ----------------------------------------------------------------------


def test_env_var_is_expanded_inside_a_longer_string() -> None:
    data = _with_upstream({"kind": "openai", "base_url": "http://${HOST}:${PORT}/v1"})
    config = parse_config(data, {"HOST": "10.0.0.5", "PORT": "9000"})

    upstream = config.upstreams["x"]
    assert isinstance(upstream, OpenAIUpstream)
    assert upstream.base_url == "http://10.0.0.5:9000/v1"


def test_env_default_is_used_when_var_is_missing() -> None:
    data = _with_upstream(
        {"kind": "openai", "base_url": "${BASE:-http://fallback:1/v1}", "api_key": "${K:-}"}
    )
    config = parse_config(data, {})

    upstream = config.upstreams["x"]
    assert isinstance(upstream, OpenAIUpstream)
    assert upstream.base_url == "http://fallback:1/v1"
    assert upstream.api_key is not None
    assert upstream.api_key.get_secret_value() == ""


def test_env_value_wins_over_default() -> None:
    data = _with_upstream({"kind": "openai", "base_url": "${BASE:-http://fallback/v1}"})
    config = parse_config(data, {"BASE": "https://real.example/v1"})

    upstream = config.upstreams["x"]
    assert isinstance(upstream, OpenAIUpstream)
    assert upstream.base_url == "https://real.example/v1"


def test_expanded_string_is_coerced_to_the_field_type() -> None:
    config = parse_config(_demo_config(server={"port": "${PORT:-9091}"}), {})
    assert config.server.port == 9091


def test_expansion_reaches_lists_and_plugin_options() -> None:
    data = _demo_config(plugins=[{"name": "p", "options": {"token": "${TOK}"}}])
    config = parse_config(data, {"TOK": "abc"})
    assert config.plugins[0].options == {"token": "abc"}


def test_missing_env_var_names_key_path_and_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL_ISSUE_YAML)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})

    message = str(info.value)
    assert "upstreams.local-vllm.api_key" in message
    assert "VLLM_API_KEY" in message
    assert str(path) in message


def test_missing_env_var_in_a_list_names_the_index() -> None:
    data = _demo_config(plugins=[{"name": "p", "options": {"k": "${NOPE}"}}])
    message = _error(data)
    assert "plugins[0].options.k" in message
    assert "NOPE" in message


def test_parse_config_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_TEST_BASE", "http://from-env:1/v1")
    config = parse_config(_with_upstream({"kind": "openai", "base_url": "${SLUICE_TEST_BASE}"}))
    upstream = config.upstreams["x"]
    assert isinstance(upstream, OpenAIUpstream)
    assert upstream.base_url == "http://from-env:1/v1"


# --- unknown keys, references, types -------------------------------------------------------


def test_unknown_top_level_key_is_rejected() -> None:
    message = _error(_demo_config(upstream={"typo": True}))
    assert "upstream: unknown key" in message


def test_unknown_key_in_upstream_is_rejected() -> None:
    message = _error(_with_upstream({"kind": "openai", "base_url": "http://h", "apikey": "k"}))
    assert "upstreams.x.apikey: unknown key" in message
    # pydantic's discriminator tag is not a key the user wrote
    assert ".openai." not in message


def test_unknown_key_in_timeouts_is_rejected() -> None:
    upstream = {"kind": "demo", "timeouts": {"idle": 5, "frist_byte": 1}}
    message = _error(_with_upstream(upstream, name="sim"))
    assert "upstreams.sim.timeouts.frist_byte: unknown key" in message
    assert ".demo." not in message


def test_unknown_key_in_server_is_rejected() -> None:
    message = _error(_demo_config(server={"hostname": "0.0.0.0"}))
    assert "server.hostname: unknown key" in message


def test_unknown_key_in_route_is_rejected() -> None:
    data = _demo_config()
    data["routes"][0]["upstreams"] = "d"
    assert "routes[0].upstreams: unknown key" in _error(data)


def test_route_to_unknown_upstream_names_the_route() -> None:
    data = _demo_config(routes=[{"model": "m", "upstream": "nowhere"}])
    message = _error(data)
    assert "routes[0].upstream" in message
    assert "'nowhere'" in message
    assert "d" in message.split("known:")[1]


def test_duplicate_route_model_is_rejected() -> None:
    data = _demo_config(
        routes=[{"model": "m", "upstream": "d"}, {"model": "m", "upstream": "d"}],
    )
    message = _error(data)
    assert "routes[1].model" in message
    assert "'m'" in message


@pytest.mark.parametrize(
    ("top", "key"),
    [
        ({"server": {"port": "eighty"}}, "server.port"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"max_body_bytes": 10}}, "server.max_body_bytes"),
        ({"routes": "m"}, "routes"),
        ({"routes": []}, "routes"),
        ({"plugins": [{"name": "p", "fail": "sometimes"}]}, "plugins[0].fail"),
        ({"auth": "keys"}, "auth"),
    ],
)
def test_wrong_types_name_the_key(top: dict[str, Any], key: str) -> None:
    message = _error(_demo_config(**top))
    assert f"\n  {key}: " in message


@pytest.mark.parametrize(
    ("upstream", "key"),
    [
        ({"kind": "openai", "base_url": "ftp://h"}, "upstreams.x.base_url"),
        ({"kind": "openai"}, "upstreams.x.base_url"),
        (
            {"kind": "openai", "base_url": "http://h", "max_connections": 0},
            "upstreams.x.max_connections",
        ),
        (
            {"kind": "openai", "base_url": "http://h", "verify_tls": "maybe"},
            "upstreams.x.verify_tls",
        ),
        ({"kind": "demo", "ttft_ms": -1}, "upstreams.x.ttft_ms"),
        ({"kind": "demo", "timeouts": {"idle": 0}}, "upstreams.x.timeouts.idle"),
    ],
)
def test_wrong_upstream_values_name_the_key(upstream: dict[str, Any], key: str) -> None:
    assert f"\n  {key}: " in _error(_with_upstream(upstream))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("X-Correlation-Id", "X-Correlation-Id")],
)
def test_request_id_header_can_be_renamed_or_turned_off(
    value: str | None, expected: str | None
) -> None:
    config = parse_config(
        _with_upstream({"kind": "openai", "base_url": "http://h", "request_id_header": value}), {}
    )
    upstream = config.upstreams["x"]
    assert isinstance(upstream, OpenAIUpstream)
    assert upstream.request_id_header == expected


def test_request_id_header_defaults_to_x_request_id() -> None:
    config = parse_config(_with_upstream({"kind": "openai", "base_url": "http://h"}), {})
    assert config.upstreams["x"].request_id_header == "X-Request-Id"


@pytest.mark.parametrize(
    "value", ["has space", "X-Id:", "Authorization", "content-type", "X-Forwarded-For", "Host"]
)
def test_request_id_header_must_be_a_free_header_name(value: str) -> None:
    upstream = {"kind": "openai", "base_url": "http://h", "request_id_header": value}
    assert "\n  upstreams.x.request_id_header: " in _error(_with_upstream(upstream))


def test_upstream_named_like_a_kind_keeps_its_name_in_the_path() -> None:
    message = _error(_with_upstream({"kind": "openai", "base_url": "nope"}, name="openai"))
    assert "upstreams.openai.base_url" in message


def test_unknown_kind_names_the_kind_key_readably() -> None:
    message = _error(_with_upstream({"kind": "bedrock", "base_url": "http://h"}))
    assert "'bedrock'" in message
    assert "openai" in message
    assert "demo" in message
    assert "upstreams.x.kind" in message


def test_missing_kind_names_the_kind_key() -> None:
    message = _error(_with_upstream({"base_url": "http://h"}))
    assert "upstreams.x.kind" in message


# --- files ---------------------------------------------------------------------------------


def test_embedded_default_loads() -> None:
    config = load_config(None, {})

    assert config.auth == "none"
    assert [r.model for r in config.routes] == ["demo"]
    assert isinstance(config.upstreams[config.routes[0].all_deployments[0].upstream], DemoUpstream)
    assert [p.name for p in config.plugins] == ["latency"]


def test_example_config_validates_with_key_in_env() -> None:
    config = load_config(EXAMPLE, {"OPENAI_API_KEY": "sk-test-not-real"})

    assert {"openai", "local-vllm", "demo"} <= set(config.upstreams)
    assert {r.model for r in config.routes} >= {"gpt-4o-mini", "llama-3-8b", "demo"}
    llama = next(r for r in config.routes if r.model == "llama-3-8b")
    assert llama.target_model == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_example_config_fails_without_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, {})
    message = str(info.value)
    assert "upstreams.openai.api_key" in message
    assert "OPENAI_API_KEY" in message


@pytest.mark.parametrize("text", ["- just\n- a list\n", "42\n", "", "just a string\n"])
def test_non_mapping_yaml_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(path) in str(info.value)
    assert "mapping" in str(info.value)


def test_invalid_yaml_is_a_config_error_with_the_path(tmp_path: Path) -> None:
    path = _write(tmp_path, "upstreams: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(path) in str(info.value)
    assert "YAML" in str(info.value)


def test_missing_file_is_a_config_error_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(path) in str(info.value)


def test_directory_is_a_config_error_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, {})
    assert str(tmp_path) in str(info.value)


def test_non_utf8_file_is_a_config_error_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"# caf\xe9\nupstreams: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(path) in str(info.value)


def test_parse_config_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        parse_config(["a"], {})


# --- secrets -------------------------------------------------------------------------------


def test_api_key_never_appears_in_repr_or_str() -> None:
    secret = "sk-live-0123456789abcdef"
    data = _with_upstream({"kind": "openai", "base_url": "http://h", "api_key": "${KEY}"})
    config = parse_config(data, {"KEY": secret})

    assert secret not in repr(config)
    assert secret not in str(config)
    assert secret not in repr(config.upstreams["x"])
    assert secret not in config.model_dump_json()
    upstream = config.upstreams["x"]
    assert isinstance(upstream, OpenAIUpstream)
    assert upstream.api_key is not None
    assert upstream.api_key.get_secret_value() == secret


def test_config_is_frozen() -> None:
    config = parse_config(_demo_config(), {})
    with pytest.raises(Exception, match="frozen"):
        config.auth = "none"  # type: ignore[misc]


# --- YAML errors name the file; duplicate keys; every problem in one report ----------------


def test_yaml_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "upstreams:\n  sim: {kind: demo\nroutes: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    message = str(info.value)
    assert message.startswith(f"{path}, line 3, column 7: not valid YAML: ")
    assert "<unicode string>" not in message


@pytest.mark.parametrize(
    ("text", "key", "line", "first"),
    [
        (MINIMAL_ISSUE_YAML + "routes: []\n", "routes", 12, 6),
        ("upstreams:\n  d: {kind: demo}\n  d: {kind: openai}\nroutes: []\n", "d", 3, 2),
        (
            "upstreams:\n  d:\n    kind: demo\n    ttft_ms: 1\n    ttft_ms: 2\nroutes: []\n",
            "ttft_ms",
            5,
            4,
        ),
    ],
)
def test_duplicate_key_is_an_error_naming_key_file_and_line(
    tmp_path: Path, text: str, key: str, line: int, first: int
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {"VLLM_API_KEY": "k"})
    message = str(info.value)
    assert message.startswith(f"{path}, line {line}, column ")
    assert f"duplicate key {key!r} (first given at line {first})" in message


def test_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    text = (
        "upstreams:\n"
        "  a: &base {kind: demo, ttft_ms: 1, itl_ms: 1}\n"
        "  b:\n    <<: *base\n    ttft_ms: 5\n"
        "routes:\n  - {model: m, upstream: b}\n"
    )
    config = load_config(_write(tmp_path, text), {})
    upstream = config.upstreams["b"]
    assert isinstance(upstream, DemoUpstream)
    assert (upstream.ttft_ms, upstream.itl_ms) == (5, 1)


def test_every_missing_env_var_and_validation_error_in_one_report(tmp_path: Path) -> None:
    text = (
        "server: {port: '${PORT}', hots: x}\n"
        "upstreams:\n  o: {kind: openai, base_url: 'http://h/v1', api_key: '${KEY_A}'}\n"
        "  d: {kind: demo, ttft_ms: -1}\n"
        "routes:\n  - {model: m, upstream: o, api_key: '${KEY_B}'}\n"
    )
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.problems == (
        "server.port: environment variable PORT is not set",
        "upstreams.o.api_key: environment variable KEY_A is not set",
        "routes[0].api_key: environment variable KEY_B is not set",
        "server.hots: unknown key",
        "upstreams.d.ttft_ms: Input should be greater than or equal to 0",
        "routes[0].api_key: unknown key",
    )
    assert str(info.value).startswith(f"{path}: invalid configuration:\n  server.port: ")


def test_unknown_upstream_is_reported_with_other_sections_errors() -> None:
    data = _demo_config(server={"port": "eighty"})
    data["routes"] = [{"model": "m", "upstream": "elsewhere"}]
    message = _error(data)
    assert "server.port: Input should be a valid integer" in message
    assert "routes[0].upstream: unknown upstream 'elsewhere' (known: d)" in message


def test_readme_yaml_examples_load_and_whole_configs_validate() -> None:
    readme = (REPO_ROOT / "README.md").read_text("utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL)
    assert len(blocks) >= 2
    whole = 0
    for block in blocks:
        data = load_yaml(block)  # a YAML error here is a README a user cannot paste
        assert isinstance(data, dict)
        if "upstreams" in data and "routes" in data:
            env = {name: "x" for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", block)}
            parse_config(data, env)
            whole += 1
        anthropic = [u for u in data.get("upstreams", {}).values() if u["kind"] == "anthropic"]
        assert all("base_url" in upstream for upstream in anthropic)
    assert whole >= 1
