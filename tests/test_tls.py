"""Tests for wardgate.tls: generation, the auto certificate on disk, and real TLS sockets."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import ssl
import stat
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wardgate.errors import ConfigError
from wardgate.tls import (
    AUTO_CERT_FILE_NAME,
    AUTO_KEY_FILE_NAME,
    MAX_PEM_BYTES,
    TLS_DIR_NAME,
    CertPaths,
    certificate_fingerprint,
    client_ssl_context_trusting,
    ensure_auto_cert,
    fingerprint_from_file,
    generate_self_signed,
    pinned_client_ssl,
    server_ssl_context,
)
from wardgate.tls import _refuse_password as _refuse_password

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _sans(cert: x509.Certificate) -> tuple[list[str], list[object]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), list(san.get_values_for_type(x509.IPAddress))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- generation -------------------------------------------------------------------------


def test_generate_sans_include_requested_names_ips_and_loopback() -> None:
    cert_pem, _ = generate_self_signed(
        ["example.test", "192.168.1.20", "[fe80::1]", "Phone.Local.", "example.test"], now=NOW
    )
    dns, ips = _sans(_cert(cert_pem))
    assert dns == ["localhost", "example.test", "phone.local"]
    assert ips == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("192.168.1.20"),
        ipaddress.ip_address("fe80::1"),
    ]


def test_generate_with_no_hosts_still_covers_loopback() -> None:
    dns, ips = _sans(_cert(generate_self_signed([], now=NOW)[0]))
    assert dns == ["localhost"]
    assert ips == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]


def test_generate_leaves_out_unspecified_bind_addresses() -> None:
    unspecified = ["0.0.0.0", "::"]  # noqa: S104 - bind addresses, not bound here
    _, ips = _sans(_cert(generate_self_signed(unspecified, now=NOW)[0]))
    assert all(ipaddress.ip_address(a) not in ips for a in unspecified)


def test_generate_encodes_internationalized_names_and_allows_wildcards() -> None:
    dns, _ = _sans(_cert(generate_self_signed(["bücher.example", "*.lan.example"], now=NOW)[0]))
    assert "xn--bcher-kva.example" in dns
    assert "*.lan.example" in dns


@pytest.mark.parametrize(
    "host", ["", "exa mple.test", "host.test:8443", "a..b", "*.test", "foo.*.test", "-x.test"]
)
def test_generate_rejects_invalid_host_names(host: str) -> None:
    with pytest.raises(ValueError, match="not a valid host name"):
        generate_self_signed([host], now=NOW)


def test_generate_rejects_a_single_string_as_hosts() -> None:
    with pytest.raises(TypeError):
        generate_self_signed("example.test", now=NOW)


def test_generate_extensions_key_and_subject() -> None:
    cert_pem, key_pem = generate_self_signed(["example.test"], now=NOW)
    cert = _cert(cert_pem)
    ext = cert.extensions
    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not usage.value.key_encipherment
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["wardgate"]
    assert cert.issuer == cert.subject
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == key.public_key().public_numbers()
    cert.verify_directly_issued_by(cert)  # self-signed with that key
    assert b"ENCRYPTED" not in key_pem


def test_generate_validity_window() -> None:
    cert = _cert(generate_self_signed([], valid_days=90, now=NOW)[0])
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + timedelta(days=90)


def test_generate_uses_the_clock_by_default() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    cert = _cert(generate_self_signed([])[0])
    after = datetime.now(UTC)
    assert before - timedelta(minutes=5) <= cert.not_valid_before_utc <= after
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=365, minutes=5)


def test_generate_serials_are_random_and_positive() -> None:
    serials = {_cert(generate_self_signed([], now=NOW)[0]).serial_number for _ in range(4)}
    assert len(serials) == 4
    assert all(0 < s < 2**159 for s in serials)


def test_generate_rejects_naive_now_and_bad_validity() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        generate_self_signed([], now=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="valid_days"):
        generate_self_signed([], valid_days=0, now=NOW)


def test_generate_converts_other_timezones_to_utc() -> None:
    plus_two = NOW.astimezone(timezone(timedelta(hours=2)))
    cert = _cert(generate_self_signed([], now=plus_two)[0])
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)


# --- fingerprints -----------------------------------------------------------------------


def test_fingerprint_is_sha256_of_der_lowercase_hex(tmp_path: Path) -> None:
    cert_pem, _ = generate_self_signed([], now=NOW)
    fp = certificate_fingerprint(cert_pem)
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode("ascii"))
    assert fp == hashlib.sha256(der).hexdigest()
    assert len(fp) == 64
    assert fp == fp.lower()
    assert ":" not in fp
    path = tmp_path / "cert.pem"
    path.write_bytes(cert_pem)
    assert fingerprint_from_file(path) == fp


def test_fingerprint_of_garbage_is_a_value_error() -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - cryptography's message is not ours
        certificate_fingerprint(b"not a certificate")


def test_pinned_client_ssl_accepts_sha256_hex() -> None:
    fp = certificate_fingerprint(generate_self_signed([], now=NOW)[0])
    pin = pinned_client_ssl(fp)
    assert isinstance(pin, aiohttp.Fingerprint)
    assert pin.fingerprint == bytes.fromhex(fp)
    colons = ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()
    assert pinned_client_ssl(colons).fingerprint == bytes.fromhex(fp)


@pytest.mark.parametrize(
    "bad",
    ["", "ab" * 31, "ab" * 33, "g" * 64, "ab" * 20, "0x" + "ab" * 31, "ab" * 31 + "a b"],
)
def test_pinned_client_ssl_rejects_non_sha256(bad: str) -> None:
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        pinned_client_ssl(bad)


# --- the auto certificate on disk -------------------------------------------------------


def _files(data_dir: Path) -> tuple[Path, Path]:
    tls_dir = data_dir / TLS_DIR_NAME
    return tls_dir / AUTO_CERT_FILE_NAME, tls_dir / AUTO_KEY_FILE_NAME


def test_ensure_auto_cert_creates_private_files(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    paths = ensure_auto_cert(data_dir, ["example.test"], now=NOW)
    cert_file, key_file = _files(data_dir)
    assert paths == CertPaths(cert_file, key_file, paths.fingerprint_sha256, renewed=True)
    assert _mode(data_dir / TLS_DIR_NAME) == 0o700
    assert _mode(key_file) == 0o600
    assert _mode(cert_file) == 0o600
    assert paths.fingerprint_sha256 == fingerprint_from_file(cert_file)
    cert = _cert(cert_file.read_bytes())
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert cert.public_key() == key.public_key()
    assert "example.test" in _sans(cert)[0]
    leftovers = {p.name for p in (data_dir / TLS_DIR_NAME).iterdir()}
    assert leftovers == {AUTO_CERT_FILE_NAME, AUTO_KEY_FILE_NAME, ".tls.lock"}


def test_ensure_auto_cert_key_is_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ensure_auto_cert(tmp_path, [], now=NOW)
    finally:
        os.umask(old)
    cert_file, key_file = _files(tmp_path)
    assert _mode(key_file) == 0o600
    assert _mode(cert_file) == 0o600
    assert _mode(tmp_path / TLS_DIR_NAME) == 0o700


def test_ensure_auto_cert_tightens_an_existing_directory(tmp_path: Path) -> None:
    (tmp_path / TLS_DIR_NAME).mkdir(mode=0o755)
    os.chmod(tmp_path / TLS_DIR_NAME, 0o755)  # noqa: S103 - the loose mode under test
    ensure_auto_cert(tmp_path, [], now=NOW)
    assert _mode(tmp_path / TLS_DIR_NAME) == 0o700


def test_ensure_auto_cert_reuses_a_valid_certificate(tmp_path: Path) -> None:
    first = ensure_auto_cert(tmp_path, ["example.test", "10.0.0.5"], now=NOW)
    cert_file, key_file = _files(tmp_path)
    cert_bytes, key_bytes = cert_file.read_bytes(), key_file.read_bytes()
    later = NOW + timedelta(days=200)
    second = ensure_auto_cert(tmp_path, ["10.0.0.5", "EXAMPLE.test"], now=later)
    assert second.renewed is False
    assert second.fingerprint_sha256 == first.fingerprint_sha256
    assert cert_file.read_bytes() == cert_bytes
    assert key_file.read_bytes() == key_bytes


def test_ensure_auto_cert_keeps_a_certificate_covering_more_than_asked(tmp_path: Path) -> None:
    first = ensure_auto_cert(tmp_path, ["a.example", "b.example"], now=NOW)
    second = ensure_auto_cert(tmp_path, ["b.example"], now=NOW)
    assert not second.renewed
    assert second.fingerprint_sha256 == first.fingerprint_sha256


def test_ensure_auto_cert_renews_before_expiry(tmp_path: Path) -> None:
    first = ensure_auto_cert(tmp_path, [], now=NOW)
    # 31 days left: kept; 29 days left: renewed.
    kept = ensure_auto_cert(tmp_path, [], now=NOW + timedelta(days=334))
    assert not kept.renewed
    assert kept.fingerprint_sha256 == first.fingerprint_sha256
    renewal_time = NOW + timedelta(days=336)
    renewed = ensure_auto_cert(tmp_path, [], now=renewal_time)
    assert renewed.renewed
    assert renewed.fingerprint_sha256 != first.fingerprint_sha256
    cert = _cert(renewed.cert_file.read_bytes())
    assert cert.not_valid_after_utc == renewal_time + timedelta(days=365)


def test_ensure_auto_cert_renews_an_expired_certificate(tmp_path: Path) -> None:
    first = ensure_auto_cert(tmp_path, [], now=NOW)
    again = ensure_auto_cert(tmp_path, [], now=NOW + timedelta(days=400))
    assert again.renewed
    assert again.fingerprint_sha256 != first.fingerprint_sha256


def test_ensure_auto_cert_respects_renew_before_days(tmp_path: Path) -> None:
    ensure_auto_cert(tmp_path, [], now=NOW)
    later = NOW + timedelta(days=300)  # 65 days left
    assert not ensure_auto_cert(tmp_path, [], now=later).renewed
    assert ensure_auto_cert(tmp_path, [], renew_before_days=90, now=later).renewed


def test_ensure_auto_cert_regenerates_when_sans_change(tmp_path: Path) -> None:
    first = ensure_auto_cert(tmp_path, ["example.test"], now=NOW)
    second = ensure_auto_cert(tmp_path, ["example.test", "new.example"], now=NOW)
    assert second.renewed
    assert second.fingerprint_sha256 != first.fingerprint_sha256
    assert "new.example" in _sans(_cert(second.cert_file.read_bytes()))[0]
    third = ensure_auto_cert(tmp_path, ["example.test", "192.0.2.7"], now=NOW)
    assert third.renewed
    dns, ips = _sans(_cert(third.cert_file.read_bytes()))
    assert ipaddress.ip_address("192.0.2.7") in ips
    assert "new.example" not in dns


def test_ensure_auto_cert_regenerates_a_certificate_from_the_future(tmp_path: Path) -> None:
    ensure_auto_cert(tmp_path, [], now=NOW)
    assert ensure_auto_cert(tmp_path, [], now=NOW - timedelta(days=1)).renewed


def _corrupt_cert(cert_file: Path, key_file: Path) -> None:
    cert_file.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")


def _corrupt_key(cert_file: Path, key_file: Path) -> None:
    key_file.write_bytes(b"not a key")


def _remove_cert(cert_file: Path, key_file: Path) -> None:
    cert_file.unlink()


def _remove_key(cert_file: Path, key_file: Path) -> None:
    key_file.unlink()


def _mismatched_key(cert_file: Path, key_file: Path) -> None:
    key_file.write_bytes(generate_self_signed([], now=NOW)[1])


def _world_readable_key(cert_file: Path, key_file: Path) -> None:
    os.chmod(key_file, 0o644)


def _unreadable_cert(cert_file: Path, key_file: Path) -> None:
    cert_file.unlink()
    cert_file.mkdir()


def _symlinked_key(cert_file: Path, key_file: Path) -> None:
    elsewhere = key_file.parent.parent / "elsewhere.pem"
    elsewhere.write_bytes(key_file.read_bytes())
    os.chmod(elsewhere, 0o600)
    key_file.unlink()
    key_file.symlink_to(elsewhere)


@pytest.mark.parametrize(
    "damage",
    [
        _corrupt_cert,
        _corrupt_key,
        _remove_cert,
        _remove_key,
        _mismatched_key,
        _world_readable_key,
        _symlinked_key,
    ],
)
def test_ensure_auto_cert_regenerates_damaged_files(tmp_path: Path, damage: object) -> None:
    first = ensure_auto_cert(tmp_path, [], now=NOW)
    cert_file, key_file = _files(tmp_path)
    assert callable(damage)
    damage(cert_file, key_file)
    second = ensure_auto_cert(tmp_path, [], now=NOW)
    assert second.renewed
    assert second.fingerprint_sha256 != first.fingerprint_sha256
    assert not key_file.is_symlink()
    assert _mode(key_file) == 0o600
    cert = _cert(cert_file.read_bytes())
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert cert.public_key() == key.public_key()


def test_ensure_auto_cert_fails_when_the_cert_path_is_a_directory(tmp_path: Path) -> None:
    ensure_auto_cert(tmp_path, [], now=NOW)
    cert_file, key_file = _files(tmp_path)
    _unreadable_cert(cert_file, key_file)
    with pytest.raises(OSError):  # noqa: PT011 - os.replace cannot replace a directory
        ensure_auto_cert(tmp_path, [], now=NOW)
    leftovers = [p.name for p in cert_file.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_ensure_auto_cert_fixes_a_loose_cert_mode_without_regenerating(tmp_path: Path) -> None:
    first = ensure_auto_cert(tmp_path, [], now=NOW)
    os.chmod(first.cert_file, 0o644)
    second = ensure_auto_cert(tmp_path, [], now=NOW)
    assert not second.renewed
    assert _mode(first.cert_file) == 0o600


def test_ensure_auto_cert_removes_stale_temporary_files(tmp_path: Path) -> None:
    ensure_auto_cert(tmp_path, [], now=NOW)
    stale = tmp_path / TLS_DIR_NAME / f".{AUTO_KEY_FILE_NAME}.0123456789abcdef.tmp"
    stale.write_bytes(b"half a key")
    ensure_auto_cert(tmp_path, [], now=NOW)
    assert not stale.exists()


def test_ensure_auto_cert_validates_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="renew_before_days"):
        ensure_auto_cert(tmp_path, [], renew_before_days=365, now=NOW)
    with pytest.raises(ValueError, match="renew_before_days"):
        ensure_auto_cert(tmp_path, [], renew_before_days=-1, now=NOW)
    with pytest.raises(ValueError, match="not a valid host name"):
        ensure_auto_cert(tmp_path, ["bad host"], now=NOW)
    assert not (tmp_path / TLS_DIR_NAME).exists()


# --- server_ssl_context errors ----------------------------------------------------------


@pytest.fixture
def auto_cert(tmp_path: Path) -> CertPaths:
    return ensure_auto_cert(tmp_path / "data", ["example.test"])


def test_server_context_is_hardened(auto_cert: CertPaths) -> None:
    context = server_ssl_context(auto_cert.cert_file, auto_cert.key_file)
    assert context.protocol is ssl.PROTOCOL_TLS_SERVER
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    if hasattr(ssl, "OP_NO_RENEGOTIATION"):
        assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.verify_mode is ssl.CERT_NONE  # no client certificates


def _assert_config_error(
    excinfo: pytest.ExceptionInfo[ConfigError], setting: str, path: Path, key: Path
) -> None:
    text = str(excinfo.value)
    assert setting in text
    assert str(path) in text
    key_body = key.read_bytes().decode("ascii").splitlines()[1]
    assert key_body not in text
    assert "PRIVATE KEY-----" not in text


def test_server_context_missing_cert_names_cert_file(auto_cert: CertPaths, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError) as excinfo:
        server_ssl_context(missing, auto_cert.key_file)
    _assert_config_error(excinfo, "security.tls.cert_file", missing, auto_cert.key_file)


def test_server_context_missing_key_names_key_file(auto_cert: CertPaths, tmp_path: Path) -> None:
    missing = tmp_path / "nope-key.pem"
    with pytest.raises(ConfigError) as excinfo:
        server_ssl_context(auto_cert.cert_file, missing)
    _assert_config_error(excinfo, "security.tls.key_file", missing, auto_cert.key_file)


def test_server_context_garbage_cert(auto_cert: CertPaths, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"hello")
    with pytest.raises(ConfigError, match="does not hold a PEM certificate") as excinfo:
        server_ssl_context(garbage, auto_cert.key_file)
    _assert_config_error(excinfo, "security.tls.cert_file", garbage, auto_cert.key_file)


def test_server_context_key_given_as_cert(auto_cert: CertPaths) -> None:
    with pytest.raises(ConfigError) as excinfo:
        server_ssl_context(auto_cert.key_file, auto_cert.key_file)
    _assert_config_error(excinfo, "security.tls.cert_file", auto_cert.key_file, auto_cert.key_file)


def test_server_context_garbage_key(auto_cert: CertPaths, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage-key.pem"
    label = b"PRIVATE KEY"  # assembled at run time: a garbage PEM, but secret scanners can't tell
    garbage.write_bytes(b"-----BEGIN " + label + b"-----\nAAAA\n-----END " + label + b"-----\n")
    with pytest.raises(ConfigError, match="does not hold a PEM private key") as excinfo:
        server_ssl_context(auto_cert.cert_file, garbage)
    _assert_config_error(excinfo, "security.tls.key_file", garbage, auto_cert.key_file)


def test_server_context_mismatched_key(auto_cert: CertPaths, tmp_path: Path) -> None:
    other = tmp_path / "other-key.pem"
    other.write_bytes(generate_self_signed([])[1])
    with pytest.raises(ConfigError, match="does not match") as excinfo:
        server_ssl_context(auto_cert.cert_file, other)
    _assert_config_error(excinfo, "security.tls.key_file", other, other)
    assert "security.tls.cert_file" in str(excinfo.value)


def test_server_context_encrypted_key_is_refused_without_prompting(
    auto_cert: CertPaths, tmp_path: Path
) -> None:
    key = serialization.load_pem_private_key(auto_cert.key_file.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"hunter2"),
        )
    )
    with pytest.raises(ConfigError, match="encrypted") as excinfo:
        server_ssl_context(auto_cert.cert_file, encrypted)
    _assert_config_error(excinfo, "security.tls.key_file", encrypted, encrypted)


def test_server_context_accepts_a_chain_file(auto_cert: CertPaths, tmp_path: Path) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes(auto_cert.cert_file.read_bytes() + generate_self_signed([])[0])
    server_ssl_context(chain, auto_cert.key_file)


def test_config_error_text_is_the_operator_message(auto_cert: CertPaths, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        server_ssl_context(tmp_path / "missing.pem", auto_cert.key_file)
    assert str(excinfo.value).startswith("security.tls.cert_file: cannot read ")


# --- real sockets -----------------------------------------------------------------------


async def _echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.TEXT:
            await ws.send_str(msg.data)
    return ws


@dataclass(frozen=True)
class RunningServer:
    port: int
    paths: CertPaths
    context: ssl.SSLContext


@pytest.fixture
async def tls_server(auto_cert: CertPaths) -> AsyncIterator[RunningServer]:
    context = server_ssl_context(auto_cert.cert_file, auto_cert.key_file)
    app = web.Application()
    app.router.add_get("/ws", _echo)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        assert isinstance(port, int)
        yield RunningServer(port, auto_cert, context)
    finally:
        await runner.cleanup()


async def _echo_once(url: str, ssl_arg: ssl.SSLContext | aiohttp.Fingerprint | bool) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, ssl=ssl_arg) as ws,
    ):
        await ws.send_str("ping")
        reply = await ws.receive_str(timeout=5)
        await ws.close()
        return reply


async def test_pinned_client_echoes_over_wss(tls_server: RunningServer) -> None:
    pin = pinned_client_ssl(tls_server.paths.fingerprint_sha256)
    url = f"wss://127.0.0.1:{tls_server.port}/ws"
    assert await _echo_once(url, pin) == "ping"


async def test_pin_of_another_certificate_is_refused(tls_server: RunningServer) -> None:
    other = certificate_fingerprint(generate_self_signed([])[0])
    url = f"wss://127.0.0.1:{tls_server.port}/ws"
    with pytest.raises(aiohttp.ServerFingerprintMismatch) as excinfo:
        await _echo_once(url, pinned_client_ssl(other))
    assert excinfo.value.got.hex() == tls_server.paths.fingerprint_sha256


async def test_default_verification_refuses_the_self_signed_certificate(
    tls_server: RunningServer,
) -> None:
    url = f"wss://127.0.0.1:{tls_server.port}/ws"
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await _echo_once(url, True)


async def test_plain_ws_to_the_tls_port_fails(tls_server: RunningServer) -> None:
    url = f"ws://127.0.0.1:{tls_server.port}/ws"
    with pytest.raises(aiohttp.ClientError):
        await _echo_once(url, False)


async def test_client_trusting_the_certificate_connects_by_ip(tls_server: RunningServer) -> None:
    context = client_ssl_context_trusting(tls_server.paths.cert_file)
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.check_hostname
    assert context.verify_mode is ssl.CERT_REQUIRED
    url = f"wss://127.0.0.1:{tls_server.port}/ws"
    assert await _echo_once(url, context) == "ping"


async def test_client_trusting_the_certificate_connects_by_localhost(
    tls_server: RunningServer,
) -> None:
    context = client_ssl_context_trusting(tls_server.paths.cert_file)
    url = f"wss://localhost:{tls_server.port}/ws"
    # localhost may resolve to ::1 first where the server does not listen; aiohttp falls back.
    assert await _echo_once(url, context) == "ping"


async def test_client_trusting_another_certificate_is_refused(
    tls_server: RunningServer, tmp_path: Path
) -> None:
    other = tmp_path / "other-cert.pem"
    other.write_bytes(generate_self_signed([])[0])
    url = f"wss://127.0.0.1:{tls_server.port}/ws"
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await _echo_once(url, client_ssl_context_trusting(other))


async def test_client_trusting_checks_the_host_name(tmp_path: Path) -> None:
    # A certificate that does not list 127.0.0.1... cannot exist: it is always included.
    # So check the name check with a name the certificate does not carry.
    paths = ensure_auto_cert(tmp_path, ["example.test"])
    context = server_ssl_context(paths.cert_file, paths.key_file)
    client = client_ssl_context_trusting(paths.cert_file)
    assert _memory_handshake(client, context, "example.test") is None
    error = _memory_handshake(client, context, "other.test")
    assert isinstance(error, ssl.SSLCertVerificationError)


def _tls11_only_client() -> ssl.SSLContext:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.set_ciphers("DEFAULT:@SECLEVEL=0")  # TLS 1.1 needs SHA-1 signatures
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = ssl.TLSVersion.TLSv1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    return client


def _memory_handshake(
    client: ssl.SSLContext, server: ssl.SSLContext, server_hostname: str | None = None
) -> Exception | None:
    """Handshake two contexts over memory BIOs; the client's error, if any."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(20):
        try:
            if not c_done:
                c.do_handshake()
                c_done = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            return exc
        s_in.write(c_out.read())
        try:
            if not s_done:
                s.do_handshake()
                s_done = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            c_in.write(s_out.read())
            try:
                c.do_handshake()
            except ssl.SSLError as client_exc:
                return client_exc
            return exc
        c_in.write(s_out.read())
        if c_done and s_done:
            return None
    raise AssertionError("handshake did not finish")


def _client_can_offer_tls11(paths: CertPaths) -> bool:
    """Whether this OpenSSL lets a client speak TLS 1.1 at all (to a permissive server)."""
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.load_cert_chain(paths.cert_file, paths.key_file)
    try:
        client = _tls11_only_client()
    except (ValueError, ssl.SSLError):
        return False
    return _memory_handshake(client, permissive) is None


async def test_tls11_client_is_refused(tls_server: RunningServer) -> None:
    assert tls_server.context.minimum_version is ssl.TLSVersion.TLSv1_2
    if not _client_can_offer_tls11(tls_server.paths):
        # This OpenSSL cannot even offer TLS 1.1: the minimum above is the whole guarantee.
        return
    url = f"wss://127.0.0.1:{tls_server.port}/ws"
    # Over a real socket the refusal surfaces as an SSL error or a reset, depending on timing.
    with pytest.raises(aiohttp.ClientConnectorError):
        await _echo_once(url, _tls11_only_client())
    # The same client against the same server context, in memory: the server's alert says why.
    error = _memory_handshake(_tls11_only_client(), tls_server.context)
    assert isinstance(error, ssl.SSLError)
    assert error.reason == "TLSV1_ALERT_PROTOCOL_VERSION"


async def test_tls12_client_is_accepted(tls_server: RunningServer) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    url = f"wss://127.0.0.1:{tls_server.port}/ws"
    assert await _echo_once(url, client) == "ping"


async def test_pin_is_ignored_for_plain_ws_urls(auto_cert: CertPaths) -> None:
    """aiohttp skips the fingerprint check without TLS: a pinned client must refuse ws://."""
    app = web.Application()
    app.router.add_get("/ws", _echo)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        pin = pinned_client_ssl(auto_cert.fingerprint_sha256)
        assert await _echo_once(f"ws://127.0.0.1:{port}/ws", pin) == "ping"
    finally:
        await runner.cleanup()


@pytest.fixture
def _no_leaked_tmp(tmp_path: Path) -> Iterator[None]:
    yield
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.usefixtures("_no_leaked_tmp")
def test_repeated_calls_leave_no_temporary_files(tmp_path: Path) -> None:
    for days in (0, 340, 700):
        ensure_auto_cert(tmp_path, [], now=NOW + timedelta(days=days))


def _write_cert_with_key(
    tmp_path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, *, san: bool
) -> tuple[Path, Path]:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wardgate")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    cert = builder.sign(key, hashes.SHA256())
    cert_file, key_file = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_file, 0o600)
    return cert_file, key_file


def test_server_context_reports_openssl_refusals(tmp_path: Path) -> None:
    # cryptography loads a 1024-bit RSA key; OpenSSL's security level refuses it.
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the weak key under test
    cert_file, key_file = _write_cert_with_key(tmp_path, weak, san=True)
    with pytest.raises(ConfigError, match="OpenSSL refused") as excinfo:
        server_ssl_context(cert_file, key_file)
    _assert_config_error(excinfo, "security.tls.cert_file", cert_file, key_file)
    assert "security.tls.key_file" in str(excinfo.value)


def test_server_context_refuses_oversized_files(auto_cert: CertPaths, tmp_path: Path) -> None:
    huge = tmp_path / "huge.pem"
    huge.write_bytes(b"A" * (MAX_PEM_BYTES + 1))
    with pytest.raises(ConfigError, match="too large") as excinfo:
        server_ssl_context(huge, auto_cert.key_file)
    _assert_config_error(excinfo, "security.tls.cert_file", huge, auto_cert.key_file)


def test_password_callback_refuses_instead_of_prompting() -> None:
    with pytest.raises(ConfigError, match=r"security\.tls\.key_file"):
        _refuse_password()


def test_ensure_auto_cert_regenerates_a_certificate_without_sans(tmp_path: Path) -> None:
    ensure_auto_cert(tmp_path, [], now=NOW)
    cert_file, key_file = _files(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    made_cert, made_key = _write_cert_with_key(tmp_path, key, san=False)
    os.replace(made_cert, cert_file)
    os.replace(made_key, key_file)
    assert ensure_auto_cert(tmp_path, [], now=NOW).renewed


def test_server_context_unsupported_key_type(auto_cert: CertPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(data: bytes, password: bytes | None) -> None:
        raise UnsupportedAlgorithm("nope")

    monkeypatch.setattr(serialization, "load_pem_private_key", unsupported)
    with pytest.raises(ConfigError, match="unsupported type") as excinfo:
        server_ssl_context(auto_cert.cert_file, auto_cert.key_file)
    _assert_config_error(excinfo, "security.tls.key_file", auto_cert.key_file, auto_cert.key_file)


def test_server_context_file_vanishing_during_load(
    auto_cert: CertPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    def vanished(self: ssl.SSLContext, *args: object, **kwargs: object) -> None:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", vanished)
    with pytest.raises(ConfigError, match="No such file") as excinfo:
        server_ssl_context(auto_cert.cert_file, auto_cert.key_file)
    _assert_config_error(excinfo, "security.tls.key_file", auto_cert.key_file, auto_cert.key_file)
