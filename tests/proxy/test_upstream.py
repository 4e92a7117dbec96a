"""Upstream configuration: validation naming the setting, header value resolution, secrets."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.conftest import remember
from wardgate.config import UpstreamSettings, load_config
from wardgate.errors import ConfigError
from wardgate.logs import RedactingFilter, add_secrets
from wardgate.proxy.upstream import (
    resolve_upstreams,
    secrets_of,
    validate_upstreams,
)
from wardgate.tls import ensure_auto_cert

SECRET = "ghp_0123456789abcdefSECRET"
remember(SECRET)


def upstream(**fields: Any) -> UpstreamSettings:
    fields.setdefault("url", "http://127.0.0.1:9000/base")
    return msgspec.convert(fields, UpstreamSettings)


def refused(upstreams: dict[str, UpstreamSettings]) -> str:
    with pytest.raises(ConfigError) as info:
        validate_upstreams(upstreams)
    return str(info.value)


# --- validation ----------------------------------------------------------------------------------------


def test_a_plain_upstream_is_valid() -> None:
    validate_upstreams({"api": upstream(), "my_svc-2": upstream(url="https://example.com")})


@pytest.mark.parametrize("name", ["", "a b", "a/b", "x" * 65, "ünï", "a.b"])
def test_names_are_checked(name: str) -> None:
    assert "upstream name" in refused({name: upstream()})


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://h/x", "http:// or https://"),
        ("ws://h/x", "http:// or https://"),
        ("h:80/x", "http:// or https://"),
        ("http:///x", "must name a host"),
        ("http://user:pw@h/x", "must not hold credentials"),
        ("http://user@h/x", "must not hold credentials"),
        ("http://h/x?a=1", "query string"),
        ("http://h/x#frag", "fragment"),
        ("http://h/x?", "query string"),
        ("http://h:99999/x", "not a valid URL"),
        ("http://h:0/x", "port 0"),
        ("http://h/x y", "spaces"),
    ],
)
def test_urls_are_checked(url: str, says: str) -> None:
    message = refused({"api": upstream(url=url)})
    assert message.startswith("upstreams.api.url")
    assert says in message


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({"Bad Name": "x"}, "upstreams.api.headers: a header name"),
        ({"Connection": "x"}, "upstreams.api.headers.Connection: this header is managed"),
        ({"host": "x"}, "upstreams.api.headers.host: this header is managed"),
        ({"Transfer-Encoding": "x"}, "managed by wardgate"),
        ({"Proxy-Authorization": "x"}, "managed by wardgate"),
        ({"Sec-WebSocket-Protocol": "x"}, "managed by wardgate"),
        ({"X-Key": "a", "x-key": "b"}, "configured twice"),
        ({"X-Key": "${}"}, "environment variable name"),
        ({"X-Key": "${1BAD}"}, "environment variable name"),
        ({"X-Key": "Bearer ${TOKEN"}, "written ${NAME}"),
        ({"X-Key": "@relative/file"}, "absolute file path"),
        ({"X-Key": "a\nb"}, "control characters"),
    ],
)
def test_headers_are_checked(headers: dict[str, str], says: str) -> None:
    message = refused({"api": upstream(headers=headers)})
    assert says in message
    for value in headers.values():
        if len(value) > 3:
            assert value not in message


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"allow_methods": []}, "upstreams.api.allow_methods must list"),
        ({"allow_methods": ["get"]}, "upper case"),
        ({"allow_methods": ["TRACE"]}, "upper case"),
        ({"allow_methods": ["CONNECT"]}, "upper case"),
        ({"allow_paths": []}, "upstreams.api.allow_paths must list"),
        ({"allow_paths": ["api/**"]}, "starting with '/'"),
        ({"allow_paths": ["/a/../b"]}, "'..'"),
        ({"allow_paths": ["/a//b"]}, "empty segments"),
        ({"max_connections_per_user": 0}, "max_connections_per_user"),
        ({"timeout": 0}, "timeout"),
        ({"max_body_bytes": -1}, "max_body_bytes"),
        ({"ca_file": "/etc/ssl/ca.pem"}, "upstreams.api.ca_file is for https upstreams only"),
        (
            {"url": "https://127.0.0.1:9443/", "ca_file": "certs/ca.pem"},
            "upstreams.api.ca_file must be an absolute path",
        ),
    ],
)
def test_other_settings_are_checked(fields: dict[str, Any], says: str) -> None:
    assert says in refused({"api": upstream(**fields)})


def test_config_loading_validates_upstreams_without_resolving(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "upstreams:\n  api:\n    url: http://127.0.0.1:9/x\n"
        "    headers: {Authorization: 'Bearer ${NOT_SET_ANYWHERE}'}\n"
    )
    config = load_config(config_file=path, environ={"WARDGATE_HOME": str(tmp_path)})
    assert "api" in config.upstreams  # the CLI works where the secret is absent
    path.write_text("upstreams:\n  api:\n    url: ftp://x\n")
    with pytest.raises(ConfigError, match=r"upstreams\.api\.url"):
        load_config(config_file=path, environ={"WARDGATE_HOME": str(tmp_path)})


# --- resolution ----------------------------------------------------------------------------------------


def test_env_references_are_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WG_TEST_UPSTREAM_TOKEN", SECRET)
    resolved = resolve_upstreams(
        {"api": upstream(headers={"Authorization": "Bearer ${WG_TEST_UPSTREAM_TOKEN}", "X-Tenant": "acme"})}
    )["api"]
    assert dict(resolved.headers) == {"Authorization": f"Bearer {SECRET}", "X-Tenant": "acme"}
    assert SECRET not in repr(resolved)
    secrets = resolved.scrubber.secrets()
    assert f"Bearer {SECRET}" in secrets
    assert SECRET in secrets
    assert "acme" not in secrets  # a plain literal of a non-credential header


def test_several_references_in_one_value() -> None:
    env = {"USER_PART": "alice-user-name", "PASS_PART": "correct-horse-battery"}
    resolved = resolve_upstreams({"api": upstream(headers={"X-Creds": "${USER_PART}:${PASS_PART}"})}, env)
    assert dict(resolved["api"].headers) == {"X-Creds": "alice-user-name:correct-horse-battery"}
    assert {"alice-user-name", "correct-horse-battery"} <= set(resolved["api"].scrubber.secrets())


def test_file_references_are_read_and_stripped(tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text(f"  {SECRET}\n")
    resolved = resolve_upstreams({"api": upstream(headers={"X-Api-Key": f"@{secret_file}"})}, {})
    assert dict(resolved["api"].headers) == {"X-Api-Key": SECRET}
    assert SECRET in resolved["api"].scrubber.secrets()


def test_a_missing_variable_names_the_setting_not_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_upstreams({"api": upstream(headers={"Authorization": "Bearer ${WG_NOT_SET_X}"})}, {})
    assert (
        str(info.value)
        == "upstreams.api.headers.Authorization: the environment variable WG_NOT_SET_X is not set"
    )


def test_an_unreadable_file_names_the_setting_not_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as info:
        resolve_upstreams({"api": upstream(headers={"X-Api-Key": f"@{missing}"})}, {})
    assert str(info.value).startswith("upstreams.api.headers.X-Api-Key: the file it names cannot be read")
    assert str(missing) not in str(info.value)
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="cannot be read"):
        resolve_upstreams({"api": upstream(headers={"X-Api-Key": f"@{binary}"})}, {})


@pytest.mark.parametrize(
    "value",
    ["line one\nline two", "with\rcarriage", "nul\x00byte", "  ", ""],
)
def test_resolved_values_must_be_valid_header_values(tmp_path: Path, value: str) -> None:
    secret_file = tmp_path / "value"
    secret_file.write_text(f"x{value}x" if value.strip() else value)
    env = {"WG_VALUE": f"x{value}x" if value.strip() else value}
    for configured in ("${WG_VALUE}", f"@{secret_file}"):
        with pytest.raises(ConfigError) as info:
            resolve_upstreams({"api": upstream(headers={"X-Api-Key": configured})}, env)
        assert "upstreams.api.headers.X-Api-Key" in str(info.value)
        if value.strip():
            assert value not in str(info.value)


@pytest.mark.parametrize(
    ("header", "value", "secret"),
    [
        ("Authorization", "Bearer literal-token-value", True),
        ("X-API-Key", "literal", True),
        ("X-Auth-Token", "literal", True),
        ("X-Client-Secret", "literal", True),
        ("Cookie", "sid=abcdefghij", True),
        ("X-Tenant", "acme", False),
        ("Accept", "application/json", False),
    ],
)
def test_which_values_are_secrets(header: str, value: str, secret: bool) -> None:
    assert bool(secrets_of(header, value, value, [])) is secret


def test_derived_secrets_and_their_quoted_forms() -> None:
    found = secrets_of("Authorization", "Bearer ${T}", "Bearer ab/cdefgh+ij", ["ab/cdefgh+ij"])
    assert found[:2] == ["Bearer ab/cdefgh+ij", "ab/cdefgh+ij"]
    assert "ab\\/cdefgh+ij" in found  # JSON with escaped slashes
    assert "ab%2Fcdefgh%2Bij" in found  # percent-encoded
    short = secrets_of("X-Key", "${T}", "abc", ["abc"])
    assert short == ["abc"]  # the whole value always; short derived pieces are not added twice


def test_resolved_upstream_urls() -> None:
    resolved = resolve_upstreams(
        {
            "api": upstream(url="https://h.example:8443/base/"),
            "root": upstream(url="http://h.example"),
        },
        {},
    )
    api, root = resolved["api"], resolved["root"]
    assert api.url("/x/y", "a=1") == "https://h.example:8443/base/x/y?a=1"
    assert api.url("/", "", websocket=True) == "wss://h.example:8443/base/"
    assert root.url("/x", "", websocket=True) == "ws://h.example/x"
    assert api.base_url == "https://h.example:8443/base"
    assert api.allow == "GET, HEAD"


def test_secrets_are_added_to_the_log_redaction_layer(caplog: pytest.LogCaptureFixture) -> None:
    redacting = RedactingFilter()
    handler = logging.StreamHandler()
    handler.addFilter(redacting)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        add_secrets([SECRET])
    finally:
        root.removeHandler(handler)
    assert SECRET in redacting.secrets
    assert SECRET not in redacting.redact(f"upstream said {SECRET}")


# --- trusting a private CA ----------------------------------------------------------------------------


def test_ca_file_trusts_its_authorities_and_still_checks_host_names(tmp_path: Path) -> None:
    cert = ensure_auto_cert(tmp_path, ["127.0.0.1"]).cert_file
    api = resolve_upstreams({"api": upstream(url="https://127.0.0.1:9443/", ca_file=str(cert))}, {})["api"]
    assert api.tls is not None
    assert api.tls.verify_mode is ssl.CERT_REQUIRED
    assert api.tls.check_hostname
    assert api.tls.cert_store_stats()["x509"] == 1  # that file only, not the system store
    assert "tls" not in repr(api)
    plain = resolve_upstreams({"api": upstream(url="https://127.0.0.1:9443/")}, {})["api"]
    assert plain.tls is None  # the system's authorities


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "does not exist"),
        ("", "holds no PEM certificate"),
        ("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", "holds no PEM certificate"),
        ("directory", "is a directory"),
    ],
)
def test_a_bad_ca_file_names_the_setting(tmp_path: Path, content: str | None, says: str) -> None:
    path = tmp_path / "ca.pem"
    if content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        resolve_upstreams({"api": upstream(url="https://127.0.0.1:9443/", ca_file=str(path))}, {})
    assert str(info.value).startswith("upstreams.api.ca_file: ")
    assert says in str(info.value)
