"""Teams and API keys: config models, hashing, header parsing, authentication, permissions."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict
from pydantic import ValidationError

from gateway.auth import (
    KeyStore,
    Principal,
    cmd_keys_new,
    hash_key,
    key_from_headers,
    mask_key,
    model_allowed,
    new_key,
)
from gateway.config import ConfigError, GatewayConfig, RouteConfig, parse_config
from gateway.context import Identity
from gateway.errors import GatewayError
from gateway.teams import KeyConfig, LimitsConfig, TeamConfig


def parse_auth(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> GatewayConfig:
    """`auth`/`teams` validated as part of a whole (minimal) config, as at start-up."""
    tree = {
        "upstreams": {"d": {"kind": "demo"}},
        "routes": [{"model": "demo", "upstream": "d"}],
        "plugins": [{"name": "rate_limit"}],  # limits need it
    }
    return parse_config({**tree, **data}, env)


KEY_A = "sk-sluice-alpha-0123456789abcdef"
KEY_B = "sk-sluice-bravo-0123456789abcdef"
KEY_OLD = "sk-sluice-old-key-0123456789abcd"
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def _clock() -> datetime:
    return NOW


def _team(*keys: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"keys": list(keys), **extra}


def _key(name: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "sha256": hash_key(key), **extra}


def _store(teams: dict[str, Any], clock: Any = _clock) -> KeyStore:
    settings = parse_auth({"teams": teams}, env={})
    return KeyStore(settings.teams, clock=clock)


def _error(excinfo: pytest.ExceptionInfo[GatewayError]) -> tuple[int, str | None, str]:
    err = excinfo.value
    return err.status, err.code, err.message


def _rendered(err: GatewayError) -> str:
    """Everything the client could see: message, body and headers."""
    return err.message + orjson.dumps(err.body()).decode() + repr(err.headers) + repr(err)


@pytest.fixture
def store() -> KeyStore:
    return _store(
        {
            "ml": _team(
                _key("ci", KEY_A, limits={"requests_per_minute": 60}),
                _key("old", KEY_OLD, expires="2025-01-01"),
                weight=3,
                limits={"tokens_per_minute": 100_000},
                model_limits={"gpt-4o": {"concurrent_streams": 2}},
            ),
            "web": _team(_key("frontend", KEY_B, models=["openai/*", "demo"])),
        }
    )


# ----- hashing and new keys ----------------------------------------------------------------


def test_hash_key_is_hex_sha256_of_utf8() -> None:
    assert hash_key(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", hash_key("x"))


def test_new_key_shape_and_uniqueness() -> None:
    key, digest = new_key()
    assert key.startswith("sk-sluice-")
    assert re.fullmatch(r"sk-sluice-[A-Za-z0-9_-]{43}", key)  # 32 bytes, URL-safe base64
    assert digest == hash_key(key)
    assert new_key()[0] != key
    other, _ = new_key("team-")
    assert other.startswith("team-")


def test_new_key_round_trip_through_the_store() -> None:
    key, digest = new_key()
    teams = {"ml": TeamConfig(keys=[KeyConfig.model_validate({"name": "n", "sha256": digest})])}
    assert KeyStore(teams).authenticate(key).key_id == "ml/n"


def test_cmd_keys_new_prints_a_key_whose_yaml_authenticates_it() -> None:
    text = cmd_keys_new("ml", "ci")
    keys = re.findall(r"sk-sluice-[A-Za-z0-9_-]{43}", text)
    assert len(keys) == 1, "the key is printed exactly once"
    assert "only this once" in text
    snippet = [
        line for line in text.splitlines() if line.strip().startswith(("- name:", "sha256:"))
    ]
    pasted = yaml.safe_load("\n".join(line[4:] for line in snippet[:2]))
    store = _store({"ml": {"keys": pasted}})
    principal = store.authenticate(keys[0])
    assert (principal.team, principal.key_id) == ("ml", "ml/ci")
    assert "teams.ml.keys" in text
    assert "${SLUICE_KEY_ML_CI}" in text
    assert "sha256_file: /etc/sluice/keys/ml-ci" in text


def test_cmd_keys_new_defaults_the_name_and_rejects_bad_names() -> None:
    assert re.search(r"- name: key-\d{8}-[0-9a-f]{4}\n", cmd_keys_new("ml"))
    with pytest.raises(ValueError, match="--team"):
        cmd_keys_new("m l", "ci")
    with pytest.raises(ValueError, match="--name"):
        cmd_keys_new("ml", "a/b")


# ----- headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Authorization": "Bearer k1"}, "k1"),
        ({"authorization": "bearer k1"}, "k1"),
        ({"AUTHORIZATION": "  BEARER    k1   "}, "k1"),
        ({"Authorization": "Bearer\tk1"}, "k1"),
        ({"x-api-key": "k2"}, "k2"),
        ({"X-Api-Key": "  k2 "}, "k2"),
        ({"Authorization": "Bearer k1", "x-api-key": "k2"}, "k1"),
        ({"Authorization": "Basic dXNlcjpwYXNz", "x-api-key": "k2"}, "k2"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"Authorization": "Bearer"}, None),
        ({"Authorization": "Bearer    "}, None),
        ({"x-api-key": "   "}, None),
        ({"Content-Type": "application/json"}, None),
        ({}, None),
    ],
)
def test_key_from_headers(headers: dict[str, str], expected: str | None) -> None:
    assert key_from_headers(headers) == expected


def test_key_from_aiohttp_headers() -> None:
    headers = CIMultiDict([("AuThOrIzAtIoN", "Bearer k1"), ("Authorization", "Bearer k9")])
    assert key_from_headers(headers) == "k1"
    assert key_from_headers(CIMultiDict([("X-API-KEY", "k2")])) == "k2"


# ----- authentication --------------------------------------------------------------------


def test_authenticates_bearer_and_x_api_key(store: KeyStore) -> None:
    for headers in ({"Authorization": f"Bearer {KEY_A}"}, {"x-api-key": KEY_A}):
        principal = store.authenticate(key_from_headers(headers))
        assert principal.key_id == "ml/ci"


def test_principal_carries_team_settings(store: KeyStore) -> None:
    principal = store.authenticate(KEY_A)
    assert principal == Principal(
        team="ml",
        key_id="ml/ci",
        weight=3.0,
        team_limits=LimitsConfig(tokens_per_minute=100_000),
        key_limits=LimitsConfig(requests_per_minute=60),
        model_limits={"gpt-4o": LimitsConfig(concurrent_streams=2)},
        models=None,
    )
    assert principal.identity() == Identity(team="ml", key_id="ml/ci")
    assert store.authenticate(KEY_B).models == ("openai/*", "demo")
    assert store.authenticate(KEY_B).key_limits is None
    assert store.authenticate(KEY_A) is principal, "one principal per key, not per request"


@pytest.mark.parametrize("key", [None, ""])
def test_missing_key_is_401(store: KeyStore, key: str | None) -> None:
    with pytest.raises(GatewayError) as excinfo:
        store.authenticate(key)
    status, code, message = _error(excinfo)
    assert (status, code) == (401, "missing_api_key")
    assert message.startswith("You didn't provide an API key.")
    assert "Authorization: Bearer" in message
    assert "x-api-key" in message


def test_unknown_key_is_401_and_only_masked(store: KeyStore) -> None:
    presented = "sk-proj-not-a-real-key-zz9Q"
    with pytest.raises(GatewayError) as excinfo:
        store.authenticate(presented)
    status, code, message = _error(excinfo)
    assert (status, code) == (401, "invalid_api_key")
    assert "sk-...zz9Q" in message
    assert presented not in _rendered(excinfo.value)
    assert "not-a-real" not in _rendered(excinfo.value)


def test_short_unknown_key_is_not_echoed_at_all(store: KeyStore) -> None:
    with pytest.raises(GatewayError) as excinfo:
        store.authenticate("hunter2")
    assert excinfo.value.message.startswith("Incorrect API key provided.")
    assert "hunter" not in _rendered(excinfo.value)
    assert "ter2" not in _rendered(excinfo.value)


def test_odd_keys_are_just_unknown(store: KeyStore) -> None:
    for odd in ["sk-\udcff-surrogate-key", "sk-naïve-ключ-12345", "sk-" + "x" * 8000]:
        with pytest.raises(GatewayError) as excinfo:
            store.authenticate(odd)
        assert excinfo.value.code == "invalid_api_key"


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=12, max_size=80))
def test_no_unknown_key_reaches_the_client(presented: str) -> None:
    store = KeyStore({"t": TeamConfig(keys=[KeyConfig(name="k", sha256=hash_key(KEY_A))])})
    with pytest.raises(GatewayError) as excinfo:
        store.authenticate("sk-" + presented)
    assert "sk-" + presented not in _rendered(excinfo.value)
    assert excinfo.value.message.startswith(f"Incorrect API key provided: sk-...{presented[-4:]}. ")


def test_expired_key_is_401(store: KeyStore) -> None:
    with pytest.raises(GatewayError) as excinfo:
        store.authenticate(KEY_OLD)
    status, code, message = _error(excinfo)
    assert (status, code) == (401, "expired_api_key")
    assert "2025-01-01T00:00:00Z" in message
    assert KEY_OLD not in _rendered(excinfo.value)
    assert hash_key(KEY_OLD) not in _rendered(excinfo.value)


def test_expiry_is_checked_against_the_clock_at_each_request() -> None:
    now = [datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC)]
    store = _store({"t": _team(_key("k", KEY_A, expires="2026-01-01"))}, clock=lambda: now[0])
    assert store.authenticate(KEY_A).key_id == "t/k"
    now[0] += timedelta(seconds=1)  # a bare date ends at 00:00 UTC that day
    with pytest.raises(GatewayError, match="expired"):
        store.authenticate(KEY_A)


@pytest.mark.parametrize(
    ("expires", "expected"),
    [
        ("2026-03-01", datetime(2026, 3, 1, tzinfo=UTC)),
        ("2026-03-01T10:30:00Z", datetime(2026, 3, 1, 10, 30, tzinfo=UTC)),
        ("2026-03-01T12:30:00+02:00", datetime(2026, 3, 1, 10, 30, tzinfo=UTC)),
        ("2026-03-01T10:30:00", datetime(2026, 3, 1, 10, 30, tzinfo=UTC)),  # naive: UTC
    ],
)
def test_expiry_parsing_is_utc(expires: str, expected: datetime) -> None:
    key = KeyConfig.model_validate(_key("k", KEY_A, expires=expires))
    assert key.expires == expected
    assert key.expires is not None
    assert key.expires.tzinfo is UTC


def test_expiry_from_yaml_values() -> None:
    data = yaml.safe_load(
        "teams:\n  t:\n    keys:\n"
        f"      - {{name: a, sha256: {hash_key(KEY_A)}, expires: 2026-03-01}}\n"
        f"      - {{name: b, sha256: {hash_key(KEY_B)}, expires: 2026-03-01 10:30:00+02:00}}\n"
    )
    keys = parse_auth(data, env={}).teams["t"].keys
    assert keys[0].expires == datetime(2026, 3, 1, tzinfo=UTC)
    assert keys[1].expires == datetime(2026, 3, 1, 8, 30, tzinfo=UTC)


def test_bad_expiry_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"teams\.t\.keys\[0\]\.expires: expected an ISO date"):
        parse_auth({"teams": {"t": _team(_key("k", KEY_A, expires="next tuesday"))}}, env={})


# ----- constant-time comparison -----------------------------------------------------------


def test_compare_digest_decides(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # gateway.auth calls hmac.compare_digest
    store.authenticate(KEY_A)
    assert calls == [(hashlib.sha256(KEY_A.encode()).digest(),) * 2]
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: False)
    with pytest.raises(GatewayError) as excinfo:
        store.authenticate(KEY_A)
    assert excinfo.value.code == "invalid_api_key", "a failed compare_digest rejects the key"


# ----- masking ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "masked"),
    [
        ("sk-abcdefghijkl", "sk-...ijkl"),
        ("sk-123456789", "sk-...6789"),  # 12 characters: the shortest masked
        ("sk-12345678", ""),  # 11 characters: nothing
        ("", ""),
        ("sk-has spaces in it", ""),
        ("sk-control\x00chars-here", ""),
        ("sk-<script>alert(1)</script>", ""),
    ],
)
def test_mask_key(key: str, masked: str) -> None:
    assert mask_key(key) == masked


# ----- model permissions -----------------------------------------------------------------


def test_keys_without_models_may_use_any_model(store: KeyStore) -> None:
    store.authorize(store.authenticate(KEY_A), "anything-at-all")


@pytest.mark.parametrize("model", ["openai/gpt-4o", "openai/o1-mini", "demo"])
def test_allowed_models(store: KeyStore, model: str) -> None:
    store.authorize(store.authenticate(KEY_B), model)


@pytest.mark.parametrize("model", ["anthropic/claude", "openai", "demo-2", "dem", "gpt-4o"])
def test_models_not_allowed_are_403(store: KeyStore, model: str) -> None:
    principal = store.authenticate(KEY_B)
    with pytest.raises(GatewayError) as excinfo:
        store.authorize(principal, model)
    status, code, message = _error(excinfo)
    assert (status, code) == (403, "model_not_allowed")
    assert excinfo.value.param == "model"
    assert model in message
    assert KEY_B not in _rendered(excinfo.value)


def test_route_names_and_aliases_count() -> None:
    store = _store({"t": _team(_key("k", KEY_A, models=["gpt4", "ollama/*"]))})
    principal = store.authenticate(KEY_A)
    route = RouteConfig(model="gpt-4o", aliases=["gpt4"], upstream="u")
    store.authorize(principal, "gpt-4o", route)  # allowed through its alias
    with pytest.raises(GatewayError, match="not allowed"):
        store.authorize(principal, "gpt-4o")  # without the route only the name counts
    prefix_route = RouteConfig(model_prefix="ollama/", upstream="u")
    store.authorize(principal, "ollama/llama3", prefix_route)
    other = RouteConfig(model="mini", upstream="u")
    with pytest.raises(GatewayError, match="not allowed"):
        store.authorize(principal, "mini", other)


def test_model_allowed_patterns() -> None:
    assert model_allowed(["*"], ["whatever"])
    assert model_allowed(["openai/*"], ["openai/*"])  # a prefix route's own name
    assert not model_allowed(["openai/*"], ["openai-compatible/x"])
    assert not model_allowed([], ["demo"])


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([], "at least 1 item"),
        (["op*enai"], "only a trailing `*`"),
        (["*/gpt"], "only a trailing `*`"),
        ([""], "non-empty"),
        ([" demo"], "non-empty"),
    ],
)
def test_bad_model_patterns_are_config_errors(models: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=r"teams\.t\.keys\[0\]\.models") as excinfo:
        parse_auth({"teams": {"t": _team(_key("k", KEY_A, models=models))}}, env={})
    assert message in str(excinfo.value)


# ----- where hashes come from ------------------------------------------------------------


def test_sha256_is_normalised(tmp_path: Path) -> None:
    settings = parse_auth(
        {"teams": {"t": _team({"name": "k", "sha256": f"  {hash_key(KEY_A).upper()}\n"})}},
        env={},
    )
    assert KeyStore(settings.teams).authenticate(KEY_A).key_id == "t/k"


def test_sha256_from_environment() -> None:
    data = {"teams": {"t": _team({"name": "k", "sha256": "${CI_KEY_SHA256}"})}}
    settings = parse_auth(data, env={"CI_KEY_SHA256": hash_key(KEY_A) + "\n"})
    assert KeyStore(settings.teams).authenticate(KEY_A).key_id == "t/k"
    with pytest.raises(ConfigError, match="CI_KEY_SHA256 is not set"):
        parse_auth(data, env={})


def test_sha256_file(tmp_path: Path) -> None:
    secret = tmp_path / "ci"
    secret.write_text(hash_key(KEY_A).upper() + "\n", encoding="ascii")
    settings = parse_auth({"teams": {"t": _team({"name": "ci", "sha256_file": str(secret)})}})
    assert KeyStore(settings.teams).authenticate(KEY_A).key_id == "t/ci"


def test_sha256_file_is_read_at_start_up(tmp_path: Path) -> None:
    secret = tmp_path / "ci"
    secret.write_text(hash_key(KEY_A), encoding="ascii")
    settings = parse_auth({"teams": {"t": _team({"name": "ci", "sha256_file": str(secret)})}})
    store = KeyStore(settings.teams)
    secret.write_text(hash_key(KEY_B), encoding="ascii")
    assert store.authenticate(KEY_A).key_id == "t/ci"


def test_missing_sha256_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as excinfo:
        parse_auth({"teams": {"ml": _team({"name": "ci", "sha256_file": str(missing)})}})
    text = str(excinfo.value)
    assert "teams.ml.keys[0]: sha256_file: cannot read" in text
    assert str(missing) in text
    assert "No such file" in text


def test_unreadable_sha256_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"teams\.ml\.keys\[0\]: sha256_file: cannot read"):
        parse_auth({"teams": {"ml": _team({"name": "ci", "sha256_file": str(tmp_path)})}})


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a hash\n",
        KEY_A.encode(),  # the key itself instead of its hash
        hash_key(KEY_A)[:-1].encode(),
        hash_key(KEY_A).encode() + b" extra",
        b"\xff\xfe" + hash_key(KEY_A).encode(),
        hash_key(KEY_A).encode() + b" " * 5000,
    ],
)
def test_malformed_sha256_file(tmp_path: Path, content: bytes) -> None:
    secret = tmp_path / "ci"
    secret.write_bytes(content)
    with pytest.raises(ConfigError) as excinfo:
        parse_auth({"teams": {"ml": _team({"name": "ci", "sha256_file": str(secret)})}})
    text = str(excinfo.value)
    assert f"teams.ml.keys[0]: sha256_file: {secret} does not hold the hex SHA-256" in text
    assert KEY_A not in text


@pytest.mark.parametrize(
    "value", ["abc", KEY_A, "g" * 64, hash_key(KEY_A) + "0", "${EMPTY}", "${EMPTY:-}"]
)
def test_bad_inline_sha256_is_not_echoed(value: str) -> None:
    data = {"teams": {"ml": _team({"name": "ci", "sha256": value})}}
    with pytest.raises(ConfigError) as excinfo:
        parse_auth(data, env={"EMPTY": ""})
    text = str(excinfo.value)
    assert "teams.ml.keys[0].sha256: must be the hex SHA-256" in text
    if len(value) > 8:
        assert value not in text


def test_a_pasted_key_gets_a_hint() -> None:
    with pytest.raises(ConfigError, match="looks like a key, not its hash"):
        parse_auth({"teams": {"ml": _team({"name": "ci", "sha256": KEY_A})}}, env={})


@pytest.mark.parametrize(
    "key", [{"name": "ci"}, {"name": "ci", "sha256": hash_key(KEY_A), "sha256_file": "/x"}]
)
def test_exactly_one_hash_source(key: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="exactly one of `sha256` and `sha256_file`"):
        parse_auth({"teams": {"ml": _team(key)}}, env={})


# ----- config rules ----------------------------------------------------------------------


def test_auth_defaults_to_none_without_teams() -> None:
    settings = parse_auth({}, env={})
    assert (settings.auth, settings.teams) == ("none", {})
    assert parse_auth({"auth": "none"}, env={}).auth == "none"
    assert parse_auth({"teams": {"t": {"weight": 2}}}, env={}).auth == "none"


def test_teams_with_keys_imply_auth_keys() -> None:
    assert parse_auth({"teams": {"t": _team(_key("k", KEY_A))}}, env={}).auth == "keys"


def test_auth_none_with_keys_is_rejected() -> None:
    with pytest.raises(ConfigError, match="auth: `none` would leave the keys"):
        parse_auth({"auth": "none", "teams": {"t": _team(_key("k", KEY_A))}}, env={})


@pytest.mark.parametrize("teams", [None, {}, {"t": {"weight": 2}}, {"t": {"keys": []}}])
def test_auth_keys_needs_a_key(teams: dict[str, Any] | None) -> None:
    data: dict[str, Any] = {"auth": "keys"}
    if teams is not None:
        data["teams"] = teams
    with pytest.raises(ConfigError, match="auth: `keys` needs at least one team with a key"):
        parse_auth(data, env={})


def test_unknown_auth_mode() -> None:
    with pytest.raises(ConfigError, match="auth: Input should be 'none' or 'keys'"):
        parse_auth({"auth": "oauth"}, env={})


def test_duplicate_key_names_in_a_team_are_rejected() -> None:
    team = _team(_key("ci", KEY_A), _key("dev", KEY_OLD), _key("ci", KEY_B))
    with pytest.raises(ConfigError, match=r"teams\.ml: keys\[2\]\.name: 'ci' is already used"):
        parse_auth({"teams": {"ml": team}}, env={})


def test_the_same_name_in_two_teams_is_fine() -> None:
    store = _store({"a": _team(_key("ci", KEY_A)), "b": _team(_key("ci", KEY_B))})
    assert store.authenticate(KEY_B).key_id == "b/ci"


def test_the_same_hash_in_two_teams_is_rejected() -> None:
    teams = {"a": _team(_key("ci", KEY_A)), "b": _team(_key("x", KEY_B), _key("y", KEY_A))}
    with pytest.raises(ConfigError) as excinfo:
        parse_auth({"teams": teams}, env={})
    text = str(excinfo.value)
    assert "teams.b.keys[1]: the same key is already configured as teams.a.keys[0]" in text
    assert hash_key(KEY_A) not in text


def test_the_same_hash_twice_in_one_team_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"teams\.a\.keys\[1\]: the same key"):
        parse_auth({"teams": {"a": _team(_key("x", KEY_A), _key("y", KEY_A))}}, env={})


def test_key_store_rejects_ambiguous_hashes_itself() -> None:
    key = KeyConfig.model_validate(_key("k", KEY_A))
    with pytest.raises(ValueError, match="the same key"):
        KeyStore({"a": TeamConfig(keys=[key]), "b": TeamConfig(keys=[key])})


@pytest.mark.parametrize("name", ["", "a/b", "-x", "has space", "x" * 65])
def test_team_and_key_names(name: str) -> None:
    with pytest.raises(ConfigError, match=r"teams\..*: team names are"):
        parse_auth({"teams": {name: _team(_key("k", KEY_A))}}, env={})
    with pytest.raises(ConfigError, match=r"teams\.t\.keys\[0\]\.name"):
        parse_auth({"teams": {"t": _team(_key(name, KEY_A))}}, env={})


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf")])
def test_weight_must_be_positive_and_finite(weight: float) -> None:
    with pytest.raises(ConfigError, match=r"teams\.t\.weight"):
        parse_auth({"teams": {"t": _team(_key("k", KEY_A), weight=weight)}}, env={})


def test_limits_model() -> None:
    limits = LimitsConfig.model_validate(
        {
            "requests_per_minute": 1,
            "tokens_per_minute": 2,
            "concurrent_streams": 3,
            "tokens_per_day": 4,
            "tokens_per_month": 5,
        }
    )
    assert limits.tokens_per_month == 5
    assert LimitsConfig() == LimitsConfig.model_validate({})
    for bad in ({"requests_per_minute": 0}, {"tokens_per_day": -5}, {"per_hour": 1}):
        with pytest.raises(ValidationError):
            LimitsConfig.model_validate(bad)


def test_limit_errors_name_the_key() -> None:
    team = _team(_key("k", KEY_A, limits={"tokens_per_day": 0}))
    with pytest.raises(ConfigError, match=r"teams\.t\.keys\[0\]\.limits\.tokens_per_day"):
        parse_auth({"teams": {"t": team}}, env={})
    team = _team(_key("k", KEY_A), model_limits={"gpt-4o": {"rpm": 5}})
    with pytest.raises(ConfigError, match=r"teams\.t\.model_limits\.gpt-4o\.rpm: unknown key"):
        parse_auth({"teams": {"t": team}}, env={})


def test_models_are_frozen() -> None:
    team = TeamConfig()
    with pytest.raises(ValidationError):
        team.weight = 2  # type: ignore[misc]


# ----- nothing secret in reprs -----------------------------------------------------------


def test_reprs_hold_no_keys_or_hashes(store: KeyStore) -> None:
    assert repr(store) == "KeyStore(teams=2, keys=3)"
    assert len(store) == 3
    settings = parse_auth({"teams": {"t": _team(_key("k", KEY_A))}}, env={})
    key = settings.teams["t"].keys[0]
    principal = store.authenticate(KEY_A)
    digest = hash_key(KEY_A)
    for text in (repr(settings), str(settings), repr(key), repr(principal), repr(store)):
        assert digest not in text
        assert KEY_A not in text
    assert digest not in key.model_dump_json()
    assert key.sha256 is not None
    assert key.sha256.get_secret_value() == digest


def test_errors_carry_a_www_authenticate_challenge(store: KeyStore) -> None:
    for presented in (None, "sk-wrong-0000000000"):
        with pytest.raises(GatewayError) as excinfo:
            store.authenticate(presented)
        assert excinfo.value.headers["WWW-Authenticate"].startswith("Bearer")
