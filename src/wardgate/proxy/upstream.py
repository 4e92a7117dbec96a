"""Upstreams as configured: validated at load, header secrets resolved when the gateway starts.

``validate_upstreams`` (called by ``config.validate``, so also by every CLI command) checks
the shape of each ``upstreams.<name>`` entry and names the setting it refuses; it reads no
environment variable and no file, so ``wardgate pair`` works where the secrets are absent.

``resolve_upstreams`` (called when the daemon builds its app) turns header values into the
values sent: ``${NAME}`` anywhere in a value is replaced by the environment variable ``NAME``,
and a value ``@/absolute/path`` is replaced by the file's content, stripped. A missing variable,
an unreadable file or a value that is not a valid header value refuses the start with a
``ConfigError`` that names the setting and never the value. Resolved values live only in
memory, in :class:`Upstream` objects whose ``repr`` hides them.

Which values are secrets (scrubbed from everything the upstream sends back, and redacted from
logs): every value that references a variable or a file, and every value of a header whose
name looks like a credential's (``Authorization``, ``X-API-Key``, ``*-Token``, ``*Secret*``...).
For each, the whole value is a secret, and so are each substituted piece and the credential
after an auth scheme (``Bearer <this>``) when 8 characters or longer. A plain literal such as
``X-Tenant: acme`` is not a secret and is not scrubbed.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import SplitResult, quote, urlsplit

from wardgate.config import UpstreamSettings
from wardgate.errors import ConfigError
from wardgate.proxy.headers import HOP_BY_HOP
from wardgate.proxy.paths import PathPolicy, compile_glob
from wardgate.proxy.scrub import Scrubber

NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
ENV_REFERENCE: Final = re.compile(r"\$\{([^}]*)\}")
ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FILE_PREFIX: Final = "@"
METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
FORBIDDEN_HEADERS: Final = HOP_BY_HOP | {
    "host",
    "content-length",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-accept",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
}
"""Headers an upstream entry may not set: framing, routing and handshake headers."""
CREDENTIAL_HEADER: Final = re.compile(r"auth|token|key|secret|passw|cookie|credential|session|signature")
MIN_DERIVED_SECRET: Final = 8
"""Pieces of a value (a substituted variable, the part after ``Bearer``) shorter than this are
not scrubbed on their own: short strings occur everywhere. The whole value always is."""
_INVALID_VALUE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


# --- validation (shape only) --------------------------------------------------------------------------


def validate_upstreams(upstreams: Mapping[str, UpstreamSettings]) -> None:
    """Refuse an upstream configuration that cannot work, naming the setting (ConfigError)."""
    for name, settings in upstreams.items():
        if not isinstance(name, str) or NAME.fullmatch(name) is None:
            raise ConfigError(
                "upstreams: an upstream name must be 1-64 letters, digits, '-' or '_' "
                "(it appears in /proxy/<name>/... URLs)"
            )
        _validate_one(f"upstreams.{name}", settings)


def _validate_one(where: str, settings: UpstreamSettings) -> None:
    parse_base_url(f"{where}.url", settings.url)
    seen: set[str] = set()
    for header, value in settings.headers.items():
        setting = f"{where}.headers.{header}"
        if HEADER_NAME.fullmatch(header) is None:
            raise ConfigError(f"{where}.headers: a header name is not a valid HTTP token")
        lower = header.lower()
        if lower in FORBIDDEN_HEADERS or lower.startswith("proxy-"):
            raise ConfigError(f"{setting}: this header is managed by wardgate and cannot be configured")
        if lower in seen:
            raise ConfigError(f"{setting}: the header is configured twice (names are case-insensitive)")
        seen.add(lower)
        _check_value_syntax(setting, value)
    if not settings.allow_methods:
        raise ConfigError(f"{where}.allow_methods must list at least one method")
    for method in settings.allow_methods:
        if method not in METHODS:
            raise ConfigError(f"{where}.allow_methods: methods are upper case, from: {', '.join(METHODS)}")
    if not settings.allow_paths:
        raise ConfigError(f"{where}.allow_paths must list at least one pattern (['/**'] allows every path)")
    for pattern in settings.allow_paths:
        segments = pattern.split("/")[1:]
        if (
            not pattern.startswith("/")
            or any(s in (".", "..") for s in segments)
            or "" in segments[:-1]
            or _INVALID_VALUE.search(pattern)
        ):
            raise ConfigError(
                f"{where}.allow_paths: each pattern is a path starting with '/', without '.', '..' "
                "or empty segments (e.g. '/api/**')"
            )
        compile_glob(pattern)
    if settings.max_connections_per_user < 1:
        raise ConfigError(f"{where}.max_connections_per_user must be at least 1")
    if not settings.timeout > 0:
        raise ConfigError(f"{where}.timeout must be a positive number of seconds")
    if settings.max_body_bytes < 0:
        raise ConfigError(f"{where}.max_body_bytes must not be negative")
    if settings.ca_file and not settings.url.startswith("https://"):
        raise ConfigError(f"{where}.ca_file is for https upstreams only")
    if settings.ca_file and not Path(settings.ca_file).expanduser().is_absolute():
        raise ConfigError(f"{where}.ca_file must be an absolute path (or start with ~/)")


def parse_base_url(setting: str, url: str) -> SplitResult:
    """Check an upstream base URL: http(s), a host, no credentials, query or fragment."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{setting} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{setting} must start with http:// or https:// (WebSocket relays derive ws/wss)")
    if not parts.hostname:
        raise ConfigError(f"{setting} must name a host")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ConfigError(f"{setting} must not hold credentials; put them in the upstream's headers")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigError(f"{setting} must not have a query string or a fragment")
    if port == 0:
        raise ConfigError(f"{setting} has port 0")
    if _INVALID_VALUE.search(url) or " " in url:
        raise ConfigError(f"{setting} holds spaces or control characters")
    return parts


def _check_value_syntax(setting: str, value: str) -> None:
    if value.startswith(FILE_PREFIX):
        path = value[len(FILE_PREFIX) :]
        if not Path(path).expanduser().is_absolute():
            raise ConfigError(f"{setting}: '@' must be followed by an absolute file path")
        return
    rest = ENV_REFERENCE.sub("", value)
    if "${" in rest:
        raise ConfigError(f"{setting}: an environment reference must be written ${{NAME}}")
    for reference in ENV_REFERENCE.findall(value):
        if ENV_NAME.fullmatch(reference) is None:
            raise ConfigError(f"{setting}: ${{...}} must hold an environment variable name")
    if _INVALID_VALUE.search(value):
        raise ConfigError(f"{setting}: the value holds control characters")


# --- resolution (at start) ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Upstream:
    """One upstream, ready to relay to. Holds resolved secrets; its ``repr`` shows none."""

    name: str
    settings: UpstreamSettings = field(repr=False)
    origin: str
    """``scheme://host:port`` of the base URL."""
    ws_origin: str
    """The same with ``ws``/``wss``."""
    base_path: str
    """The base URL's path without a trailing slash (``""`` for none)."""
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    scrubber: Scrubber = field(repr=False)
    paths: PathPolicy = field(repr=False)
    methods: frozenset[str]
    allow: str
    """The ``Allow`` header value for a 405."""
    tls: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    """Trusts ``ca_file`` instead of the system's authorities (None: the system's)."""

    @property
    def base_url(self) -> str:
        return self.origin + self.base_path

    def url(self, raw_path: str, raw_query: str, *, websocket: bool = False) -> str:
        """The upstream URL (encoded) for a checked relay path and a filtered query."""
        target = (self.ws_origin if websocket else self.origin) + self.base_path + raw_path
        return f"{target}?{raw_query}" if raw_query else target


def resolve_value(setting: str, value: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """A header value as sent, and the pieces substituted into it (env values, file content)."""
    if value.startswith(FILE_PREFIX):
        path = Path(value[len(FILE_PREFIX) :]).expanduser()
        try:
            content = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not readable UTF-8 text"
            raise ConfigError(f"{setting}: the file it names cannot be read ({why})") from None
        resolved, pieces = content, [content]
    else:
        pieces = []

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                raise ConfigError(f"{setting}: the environment variable {name} is not set")
            pieces.append(environ[name])
            return environ[name]

        resolved = ENV_REFERENCE.sub(substitute, value)
    if not resolved.strip():
        raise ConfigError(f"{setting}: the value is empty once resolved")
    if _INVALID_VALUE.search(resolved) or resolved != resolved.strip():
        raise ConfigError(
            f"{setting}: the resolved value holds line breaks, control characters or surrounding spaces"
        )
    return resolved, pieces


def secrets_of(header: str, value: str, resolved: str, pieces: list[str]) -> list[str]:
    """The strings to scrub for one configured header (see the module docstring)."""
    referenced = value.startswith(FILE_PREFIX) or ENV_REFERENCE.search(value) is not None
    if not referenced and CREDENTIAL_HEADER.search(header.lower()) is None:
        return []
    found = [resolved]
    derived = [*pieces]
    _scheme, space, credential = resolved.partition(" ")
    if space and credential.strip():
        derived.append(credential.strip())
    found.extend(piece for piece in derived if len(piece) >= MIN_DERIVED_SECRET)
    # The same secrets as an upstream might quote them: JSON-escaped slashes, percent-encoded.
    variants: list[str] = []
    for secret in found:
        variants.append(secret.replace("/", "\\/"))
        variants.append(quote(secret, safe=""))
    return list(dict.fromkeys([*found, *variants]))


def resolve_upstream(name: str, settings: UpstreamSettings, environ: Mapping[str, str]) -> Upstream:
    where = f"upstreams.{name}"
    parts = parse_base_url(f"{where}.url", settings.url)
    headers: list[tuple[str, str]] = []
    secrets: list[str] = []
    for header, value in settings.headers.items():
        resolved, pieces = resolve_value(f"{where}.headers.{header}", value, environ)
        headers.append((header, resolved))
        secrets.extend(secrets_of(header, value, resolved, pieces))
    netloc = parts.netloc
    ws_scheme = "wss" if parts.scheme == "https" else "ws"
    tls = trusting(f"{where}.ca_file", settings.ca_file) if settings.ca_file else None
    methods = frozenset(settings.allow_methods)
    return Upstream(
        name=name,
        settings=settings,
        origin=f"{parts.scheme}://{netloc}",
        ws_origin=f"{ws_scheme}://{netloc}",
        base_path=parts.path.rstrip("/"),
        headers=tuple(headers),
        scrubber=Scrubber(secrets),
        paths=PathPolicy(settings.allow_paths),
        methods=methods,
        allow=", ".join(m for m in METHODS if m in methods),
        tls=tls,
    )


def trusting(setting: str, ca_file: str) -> ssl.SSLContext:
    """A client TLS context that trusts the authorities in ``ca_file`` (and checks host names)."""
    path = Path(ca_file).expanduser()
    try:
        return ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        raise ConfigError(f"{setting}: {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"{setting}: {path} cannot be read by this user") from None
    except IsADirectoryError:
        raise ConfigError(f"{setting}: {path} is a directory; name a PEM file") from None
    except (ssl.SSLError, OSError, ValueError):
        raise ConfigError(f"{setting}: {path} holds no PEM certificate") from None


def resolve_upstreams(
    upstreams: Mapping[str, UpstreamSettings], environ: Mapping[str, str] | None = None
) -> dict[str, Upstream]:
    """Every configured upstream with its header values resolved (ConfigError on failure)."""
    env = os.environ if environ is None else environ
    validate_upstreams(upstreams)
    return {name: resolve_upstream(name, settings, env) for name, settings in upstreams.items()}


def secrets_for_logs(upstreams: Mapping[str, Upstream]) -> list[str]:
    """Every secret of every upstream (for the log redaction layer)."""
    out: list[str] = []
    for upstream in upstreams.values():
        out.extend(upstream.scrubber.secrets())
    return out
