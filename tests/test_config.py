"""Settings: layering (defaults < file < env < flags) and the refusal of contradictory modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from wardgate.config import ENV_SETTINGS, Mode, load_config
from wardgate.errors import ConfigError


def load(tmp_path: Path, text: str = "", env: dict[str, str] | None = None, **flags: Any) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    environ = {"WARDGATE_HOME": str(tmp_path / "home"), **(env or {})}
    return load_config(config_file=path, flags=flags, environ=environ)


def test_embedded_defaults(tmp_path: Path) -> None:
    config = load_config(environ={"WARDGATE_HOME": str(tmp_path)})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8766)
    assert config.security.mode is Mode.AUTHENTICATED
    assert config.require_auth
    assert config.audit_enabled
    assert not config.security.allow_query_token
    assert config.pairing_expiry == 3600
    assert config.security.token.session_expiry == 300
    assert config.refresh_expiry == 30 * 86400
    assert "http://localhost:*" in config.origin_patterns
    assert config.home == tmp_path
    assert config.store_path == tmp_path / "wardgate.db"


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    text = "server:\n  port: 9000\n  host: 127.0.0.2\nsecurity:\n  token:\n    session_expiry: 60\n"
    config = load(tmp_path, text)
    assert (config.server.port, config.server.host, config.security.token.session_expiry) == (
        9000,
        "127.0.0.2",
        60,
    )
    config = load(
        tmp_path, text, env={"WARDGATE_SERVER_PORT": "9100", "WARDGATE_SECURITY_TOKEN_SESSION_EXPIRY": "90"}
    )
    assert (config.server.port, config.security.token.session_expiry) == (9100, 90)
    config = load(tmp_path, text, env={"WARDGATE_SERVER_PORT": "9100"}, **{"server.port": 9200})
    assert config.server.port == 9200
    assert config.server.host == "127.0.0.2"


def test_env_values_are_yaml_scalars(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        env={
            "WARDGATE_SECURITY_ALLOW_QUERY_TOKEN": "true",
            "WARDGATE_SECURITY_TRUSTED_PROXIES": "[10.0.0.0/8, 192.168.1.1]",
            "WARDGATE_LOGGING_LEVEL": "debug",
        },
    )
    assert config.security.allow_query_token is True
    assert config.security.trusted_proxies == ["10.0.0.0/8", "192.168.1.1"]
    assert config.logging.level == "debug"


def test_every_leaf_setting_has_an_env_name() -> None:
    assert ENV_SETTINGS["WARDGATE_SECURITY_TOKEN_SESSION_EXPIRY"] == ("security", "token", "session_expiry")
    assert ENV_SETTINGS["WARDGATE_SECURITY_ORIGINS_ALLOW_ALL"] == ("security", "origins", "allow_all")
    assert ENV_SETTINGS["WARDGATE_SERVER_PORT"] == ("server", "port")


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("serverr:\n  port: 1\n", {}, "serverr"),
        ("server:\n  prot: 1\n", {}, "prot"),
        ("server:\n  port: abc\n", {}, "server.port"),
        ("server:\n  port: 70000\n", {}, "server.port"),
        ("", {"WARDGATE_SECURITY_MODEE": "local"}, "WARDGATE_SECURITY_MODEE"),
        ("security:\n  mode: paranoid\n", {}, "security.mode"),
        ("[1, 2]", {}, "mapping"),
        ("a: [", {}, "not valid YAML"),
    ],
)
def test_bad_settings_name_the_setting(tmp_path: Path, text: str, env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, env)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("server:\n  host: 0.0.0.0\n", "security.mode: remote"),
        ("security:\n  mode: local\nserver:\n  host: 192.168.1.10\n", "loopback"),
        ("security:\n  require_auth: false\n", "security.require_auth"),
        ("security:\n  origins:\n    allow_all: true\n", "security.origins.allow_all"),
        (
            "security:\n  mode: remote\n  origins:\n    allowed: ['https://*.devtunnels.ms']\n",
            "security.tls.enabled",
        ),
        ("security:\n  mode: remote\n  tls:\n    terminated_by_proxy: true\n", "security.origins.allowed"),
        (
            "security:\n  mode: remote\n  tls: {terminated_by_proxy: true}\n  origins: {allow_all: true}\n",
            "allow_all",
        ),
        (
            "security:\n  mode: enterprise\n  tls: {auto_cert: true}\n  origins: {allowed: ['https://a.example']}\n"
            "  audit: {enabled: false}\n",
            "security.audit.enabled",
        ),
        ("security:\n  tls:\n    enabled: true\n", "security.tls.cert_file"),
        ("security:\n  origins:\n    allowed: ['https://*evil.com']\n", "security.origins.allowed"),
        ("security:\n  trusted_proxies: ['10.0.0.1/8']\n", "security.trusted_proxies"),
        ("store:\n  backend: mongo\n", "store.backend"),
        ("security:\n  token:\n    session_expiry: 0\n", "session_expiry"),
    ],
)
def test_contradictory_configs_refuse_to_start(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert needle in str(info.value)


def test_valid_modes(tmp_path: Path) -> None:
    local = load(tmp_path, "security:\n  mode: local\n  require_auth: false\n  origins: {allow_all: true}\n")
    assert not local.require_auth
    assert not local.audit_enabled
    remote = load(
        tmp_path,
        "server: {host: 0.0.0.0}\nsecurity:\n  mode: remote\n  tls: {auto_cert: true}\n"
        "  origins: {allowed: ['https://*.devtunnels.ms']}\n",
    )
    assert remote.require_auth
    assert remote.pairing_expiry == 1800
    assert remote.refresh_expiry == 7 * 86400
    assert remote.tls_enabled


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=tmp_path / "nope.yaml", environ={})


def test_default_config_file_in_home_is_read(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("server:\n  port: 8999\n")
    assert load_config(environ={"WARDGATE_HOME": str(tmp_path)}).server.port == 8999


def test_text_settings_from_env_are_verbatim(tmp_path: Path) -> None:
    config = load_config(
        environ={
            "WARDGATE_HOME": str(tmp_path),
            "WARDGATE_STORE_PREFIX": "team-a:",
            "WARDGATE_SERVER_PUBLIC_URL": "https://x.example:8443",
            "WARDGATE_STORE_PASSWORD": "${REDIS_PASSWORD}",
            "WARDGATE_LIMITS_MAX_CONNECTIONS": "7",
        }
    )
    assert config.store.prefix == "team-a:"
    assert config.server.public_url == "https://x.example:8443"
    assert config.store.password == "${REDIS_PASSWORD}"
    assert config.limits.max_connections == 7
