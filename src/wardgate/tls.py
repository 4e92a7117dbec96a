"""TLS material: the auto-generated self-signed certificate and the SSL contexts.

``security.tls.cert_file``/``key_file`` name an operator's certificate; with
``security.tls.auto_cert`` wardgate generates a self-signed one instead and
keeps it in ``<data dir>/tls/`` (directory mode 0700, files mode 0600). Its
SHA-256 fingerprint goes into the pairing QR payload so that a client can pin
it: with a pin, the client checks the exact certificate the server presents
rather than a chain to a public CA and a host name.

The only network-facing code here builds :class:`ssl.SSLContext` objects; the
aiohttp wiring lives in :mod:`wardgate.server`.

Public API:

* :func:`generate_self_signed` makes a certificate and key (PEM) in memory.
* :func:`ensure_auto_cert` reuses or (re)generates the files in the data directory.
* :func:`certificate_fingerprint` / :func:`fingerprint_from_file`: the pin.
* :func:`server_ssl_context`: TLS 1.2+ server context, load errors as
  :class:`~wardgate.errors.ConfigError` naming the setting.
* :func:`pinned_client_ssl` / :func:`client_ssl_context_trusting`: client side.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import secrets
import ssl
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import aiohttp
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wardgate.errors import ConfigError

__all__ = [
    "AUTO_CERT_FILE_NAME",
    "AUTO_KEY_FILE_NAME",
    "DEFAULT_HOSTS",
    "TLS_DIR_NAME",
    "CertPaths",
    "certificate_fingerprint",
    "client_ssl_context_trusting",
    "ensure_auto_cert",
    "fingerprint_from_file",
    "generate_self_signed",
    "pinned_client_ssl",
    "server_ssl_context",
]

TLS_DIR_NAME: Final = "tls"
AUTO_CERT_FILE_NAME: Final = "auto-cert.pem"
AUTO_KEY_FILE_NAME: Final = "auto-key.pem"
LOCK_FILE_NAME: Final = ".tls.lock"

#: Names every auto certificate covers, whatever the configuration says.
DEFAULT_HOSTS: Final[tuple[str, ...]] = ("localhost", "127.0.0.1", "::1")
#: The common name of the auto certificate's subject (and issuer: it is self-signed).
COMMON_NAME: Final = "wardgate"
#: Backdating of ``not_valid_before``, for clients whose clock is a little behind.
CLOCK_SKEW: Final = timedelta(minutes=5)
#: Refuse to read certificate or key files larger than this (they are a few KiB).
MAX_PEM_BYTES: Final = 1024 * 1024

CERT_SETTING: Final = "security.tls.cert_file"
KEY_SETTING: Final = "security.tls.key_file"

_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_DNS_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_O_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class CertPaths:
    """Where the auto certificate lives, its pin, and whether this call (re)made it."""

    cert_file: Path
    key_file: Path
    fingerprint_sha256: str
    renewed: bool


# --- host names -------------------------------------------------------------------------


def _parse_ip(host: str) -> IPAddress | None:
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    text = text.split("%", 1)[0]  # an IPv6 zone id is not part of the address
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _normalize_dns_name(host: str) -> str:
    name = host.strip().rstrip(".").lower()
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"not a valid host name: {host!r}") from None
    labels = name.split(".")
    valid = (
        0 < len(name) <= 253
        and all(_DNS_LABEL.fullmatch(label) for label in labels[1:])
        and (_DNS_LABEL.fullmatch(labels[0]) is not None or (labels[0] == "*" and len(labels) > 2))
    )
    if not valid:
        raise ValueError(f"not a valid host name: {host!r}")
    return name


def _subject_names(hosts: Sequence[str]) -> tuple[list[str], list[IPAddress]]:
    """Split ``hosts`` (plus :data:`DEFAULT_HOSTS`) into DNS names and IP addresses.

    Order is kept and duplicates dropped. Unspecified addresses (``0.0.0.0``,
    ``::``) are bind addresses, not names a client connects to, and are left out.

    Raises:
        TypeError: ``hosts`` is a single string rather than a sequence of them.
        ValueError: an entry is neither an IP address nor a valid DNS name.
    """
    if isinstance(hosts, str | bytes):
        raise TypeError("hosts must be a sequence of host names, not a single string")
    dns: list[str] = []
    ips: list[IPAddress] = []
    for host in (*DEFAULT_HOSTS, *hosts):
        ip = _parse_ip(host.strip())
        if ip is not None:
            if ip.is_unspecified or ip in ips:
                continue
            ips.append(ip)
            continue
        name = _normalize_dns_name(host)
        if name not in dns:
            dns.append(name)
    return dns, ips


# --- generation -------------------------------------------------------------------------


def _aware_utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC)


def generate_self_signed(
    hosts: Sequence[str], *, valid_days: int = 365, now: datetime | None = None
) -> tuple[bytes, bytes]:
    """Generate a self-signed server certificate and its key.

    The key is ECDSA P-256. The certificate's subject and issuer are
    ``CN=wardgate``; its SubjectAlternativeName lists a DNSName for every host
    name and an IPAddress for every entry that parses as an IP address (IPv6
    may be bracketed), always including ``localhost``, ``127.0.0.1`` and
    ``::1``. It is an end-entity certificate (BasicConstraints CA=false, key
    usage digitalSignature, extended key usage serverAuth) with a random
    159-bit serial, valid from ``now - 5 min`` to ``now + valid_days``.

    Args:
        hosts: host names and IP addresses clients use to reach the server.
        valid_days: lifetime in days (at least 1).
        now: the current time (timezone-aware); defaults to the system clock.

    Returns:
        ``(cert_pem, key_pem)``; the key is unencrypted PKCS#8.

    Raises:
        ValueError: a host is not a valid name, ``valid_days`` < 1, or ``now`` is naive.
    """
    if valid_days < 1:
        raise ValueError("valid_days must be at least 1")
    moment = _aware_utc(now)
    dns, ips = _subject_names(hosts)
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    alt_names.extend(x509.IPAddress(ip) for ip in ips)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - CLOCK_SKEW)
        .not_valid_after(moment + timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


# --- fingerprints -----------------------------------------------------------------------


def certificate_fingerprint(cert_pem: bytes) -> str:
    """The SHA-256 of the (first) certificate's DER: 64 lowercase hex digits, no colons.

    Raises:
        ValueError: ``cert_pem`` holds no PEM certificate.
    """
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA256()).hex()


def fingerprint_from_file(path: Path) -> str:
    """:func:`certificate_fingerprint` of the PEM certificate stored at ``path``."""
    return certificate_fingerprint(_read_bounded(path))


# --- the auto certificate on disk -------------------------------------------------------


def _read_bounded(path: Path) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(MAX_PEM_BYTES + 1)
    if len(data) > MAX_PEM_BYTES:
        raise ValueError(f"{path} is larger than {MAX_PEM_BYTES} bytes")
    return data


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _is_private_regular_file(path: Path) -> bool:
    """True if ``path`` is a regular file (not a symlink) only its owner can access."""
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        return False
    return stat.S_IMODE(st.st_mode) & 0o077 == 0


def _reusable_fingerprint(
    cert_file: Path,
    key_file: Path,
    dns: Sequence[str],
    ips: Sequence[IPAddress],
    moment: datetime,
    renew_before: timedelta,
) -> str | None:
    """The fingerprint of the existing auto certificate, or None if it must be regenerated."""
    try:
        if not _is_private_regular_file(key_file):
            return None
        if not stat.S_ISREG(cert_file.lstat().st_mode):
            return None
        cert = x509.load_pem_x509_certificate(_read_bounded(cert_file))
        key = serialization.load_pem_private_key(_read_bounded(key_file), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        # Missing, unreadable, not PEM, encrypted or of an unsupported type.
        return None
    if _spki(key.public_key()) != _spki(cert.public_key()):
        return None  # e.g. a crash between writing the key and the certificate
    if cert.not_valid_before_utc > moment:
        return None  # from the future: the clock moved back, or the file is not ours
    if cert.not_valid_after_utc - moment <= renew_before:
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    have_dns = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    if not set(dns) <= have_dns or not set(ips) <= have_ips:
        return None
    if stat.S_IMODE(cert_file.lstat().st_mode) != 0o600:
        os.chmod(cert_file, 0o600)  # public data, but keep the directory uniform
    return cert.fingerprint(hashes.SHA256()).hex()


@contextlib.contextmanager
def _locked(tls_dir: Path) -> Iterator[None]:
    """Serialize concurrent ``ensure_auto_cert`` calls (e.g. ``serve`` and ``pair``)."""
    fd = os.open(tls_dir / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600 from the first byte on.

    The temporary file is created by ``os.open`` with mode 0600 (and ``O_EXCL``,
    ``O_NOFOLLOW``) in the same directory, then renamed over ``path``.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only have removed bits; make it exact
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_stale_temp_files(tls_dir: Path) -> None:
    for name in (AUTO_CERT_FILE_NAME, AUTO_KEY_FILE_NAME):
        for stale in tls_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def ensure_auto_cert(
    data_dir: Path,
    hosts: Sequence[str],
    *,
    renew_before_days: int = 30,
    valid_days: int = 365,
    now: datetime | None = None,
) -> CertPaths:
    """Reuse the auto certificate in ``data_dir/tls/``, or (re)generate it.

    A new certificate and key are generated when either file is missing,
    unreadable or not a regular file; when the key is not a PEM key matching
    the certificate; when the key file can be accessed by anyone but its owner
    (it may have leaked, so it is replaced rather than fixed); when the
    certificate is not yet valid, expires within ``renew_before_days``, or its
    SubjectAlternativeName does not cover every requested host (a superset is
    fine). Otherwise the files are left untouched and the fingerprint stays the
    same, so paired clients keep working.

    The directory is created with mode 0700 (and set to it if it exists); both
    files are written with mode 0600, the key first, each atomically. A
    ``.tls.lock`` file serializes concurrent calls on the same directory.

    A new certificate changes the fingerprint: clients that pinned the old one
    must pair again (``renewed`` tells the caller to say so).

    Raises:
        ValueError: invalid hosts, ``renew_before_days`` not below ``valid_days``,
            or a naive ``now``.
        OSError: the directory or files cannot be created.
    """
    if not 0 <= renew_before_days < valid_days:
        raise ValueError("renew_before_days must be at least 0 and less than valid_days")
    moment = _aware_utc(now)
    dns, ips = _subject_names(hosts)
    tls_dir = data_dir / TLS_DIR_NAME
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    cert_file = tls_dir / AUTO_CERT_FILE_NAME
    key_file = tls_dir / AUTO_KEY_FILE_NAME
    with _locked(tls_dir):
        _remove_stale_temp_files(tls_dir)
        fingerprint = _reusable_fingerprint(
            cert_file, key_file, dns, ips, moment, timedelta(days=renew_before_days)
        )
        if fingerprint is not None:
            return CertPaths(cert_file, key_file, fingerprint, renewed=False)
        cert_pem, key_pem = generate_self_signed(hosts, valid_days=valid_days, now=moment)
        _write_private(key_file, key_pem)
        _write_private(cert_file, cert_pem)
        _fsync_dir(tls_dir)
    return CertPaths(cert_file, key_file, certificate_fingerprint(cert_pem), renewed=True)


# --- SSL contexts -----------------------------------------------------------------------


def _refuse_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal and hang a daemon.
    raise ConfigError(f"{KEY_SETTING}: the private key is encrypted; wardgate needs it unencrypted")


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)


def _load_pem_for_setting(path: Path, setting: str) -> bytes:
    try:
        return _read_bounded(path)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{setting}: cannot read {path}: {reason}") from None
    except ValueError:
        raise ConfigError(f"{setting}: {path} is too large to be a PEM file") from None


def server_ssl_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context for ``cert_file`` (PEM, leaf first, chain may follow) and ``key_file``.

    TLS 1.2 or later, no TLS compression, no renegotiation (where OpenSSL has
    the option); the cipher list is Python's default, which is modern (AEAD
    with forward secrecy first, OpenSSL security level 2).

    Raises:
        ConfigError: a file cannot be read or parsed, the key is encrypted, or
            the key does not match the certificate. The message names the
            setting (``security.tls.cert_file``/``key_file``) and the path,
            never the file's contents.
    """
    cert_pem = _load_pem_for_setting(cert_file, CERT_SETTING)
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise ConfigError(f"{CERT_SETTING}: {cert_file} does not hold a PEM certificate") from None
    key_pem = _load_pem_for_setting(key_file, KEY_SETTING)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(
            f"{KEY_SETTING}: {key_file} is encrypted; wardgate needs an unencrypted key "
            "(protect it with file mode 0600 instead)"
        ) from None
    except ValueError:
        raise ConfigError(f"{KEY_SETTING}: {key_file} does not hold a PEM private key") from None
    except UnsupportedAlgorithm:
        raise ConfigError(f"{KEY_SETTING}: {key_file} holds a private key of an unsupported type") from None
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise ConfigError(
            f"{KEY_SETTING}: {key_file} does not match the certificate in {CERT_SETTING} ({cert_file})"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    try:
        context.load_cert_chain(cert_file, key_file, password=_refuse_password)
    except ssl.SSLError as exc:
        reason = exc.reason or "unknown reason"
        raise ConfigError(
            f"{CERT_SETTING}/{KEY_SETTING}: OpenSSL refused {cert_file} with {key_file} ({reason})"
        ) from None
    except OSError as exc:  # the files changed since they were read
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"{CERT_SETTING}/{KEY_SETTING}: cannot load {cert_file} with {key_file}: {reason}"
        ) from None
    return context


def pinned_client_ssl(fingerprint_sha256: str) -> aiohttp.Fingerprint:
    """An aiohttp ``ssl=`` argument that pins the server certificate's SHA-256.

    With a pin, aiohttp does not validate the chain or the host name: it
    accepts any certificate during the handshake, then compares the SHA-256 of
    the peer's DER certificate with the pin and raises
    :class:`aiohttp.ServerFingerprintMismatch` (before sending the request)
    if they differ. The pin replaces chain and host-name validation, which is
    what a self-signed certificate needs.

    Only ``wss://``/``https://`` URLs are protected: aiohttp ignores the
    fingerprint for a plain ``ws://`` URL, so a pinned client must refuse
    plain URLs itself.

    Accepts 64 hex digits, in either case, optionally colon-separated.

    Raises:
        ValueError: not a SHA-256 fingerprint.
    """
    digits = fingerprint_sha256.strip().replace(":", "")
    if not _HEX_SHA256.fullmatch(digits):
        raise ValueError("a certificate fingerprint is 64 hexadecimal digits (SHA-256)")
    return aiohttp.Fingerprint(bytes.fromhex(digits))


def client_ssl_context_trusting(cert_file: Path) -> ssl.SSLContext:
    """A client context that trusts exactly the certificate(s) in ``cert_file``.

    Chain and host name are verified as usual (the certificate must list the
    host name or IP the client connects to), with ``cert_file`` as the only
    trust anchor; no system CAs. TLS 1.2 or later.

    Raises:
        OSError: ``cert_file`` cannot be read.
        ssl.SSLError: it holds no certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    _harden(context)
    context.load_verify_locations(cafile=cert_file)
    return context
