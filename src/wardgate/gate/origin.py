"""Origin policy: the defence against cross-site WebSocket hijacking (CSWSH).

Browsers attach an ``Origin`` header to every WebSocket handshake (RFC 6455 section 4.1,
item 8) and send the page's origin, serialized as RFC 6454 section 6.2 says:
``scheme "://" host [ ":" port ]`` in lowercase, with punycode host names, IPv6 addresses in
brackets, the port omitted when it is the scheme's default, and no path. An opaque origin
(sandboxed frame, ``file:`` page, some redirects) is sent as ``null`` (RFC 6454 section 7.1).

:func:`parse_origin` accepts exactly one serialized http or https origin and refuses anything a
browser never sends (userinfo, a path, a query, a fragment, whitespace, a bad port, a list of
origins). Host names are normalized like :mod:`wardgate.gate.host` does for ``Host``
(RFC 9110 section 7.2), and ports are made explicit so ``https://a.example`` and
``https://a.example:443`` compare equal.

Patterns (``security.origins.allowed``) compare parsed parts as whole values, never as
prefixes or substrings: ``https://*.devtunnels.ms`` matches ``https://x.devtunnels.ms`` but
not ``https://devtunnels.ms``, ``https://devtunnels.ms.evil.com`` or
``https://evil.com#.devtunnels.ms``.

This module does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from wardgate.gate.host import is_ip_address, normalize_host, split_host_port

__all__ = [
    "DEFAULT_PORTS",
    "LOOPBACK_ORIGIN_PATTERNS",
    "MAX_ORIGIN_LENGTH",
    "Origin",
    "OriginPattern",
    "OriginPolicy",
    "OriginVerdict",
    "parse_origin",
    "parse_origin_pattern",
]

DEFAULT_PORTS: Mapping[str, int] = MappingProxyType({"http": 80, "https": 443})
"""The schemes an Origin may have, with their default ports (RFC 9110 section 4.2)."""

MAX_ORIGIN_LENGTH = 1024
"""Longer Origin values are refused before any parsing (a DNS name is at most 253 octets)."""

LOOPBACK_ORIGIN_PATTERNS: tuple[str, ...] = (
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
    "http://[::1]:*",
    "https://[::1]:*",
)
"""Pages served from this machine, on any port."""

# Characters that end the authority part of a URL (RFC 3986 section 3.2) or that the URL
# standard treats as such ("\\"); "@" introduces userinfo (RFC 3986 section 3.2.1).
_NOT_IN_AUTHORITY = frozenset("/?#\\@")


@dataclass(frozen=True, slots=True)
class Origin:
    """A parsed, normalized web origin (RFC 6454 section 4): the triple that browsers compare.

    ``host`` is lowercase punycode without a trailing dot, or an IP address (IPv6 without
    brackets, RFC 5952 form). ``port`` is always explicit.
    """

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        """The RFC 6454 section 6.2 serialization: default port omitted, IPv6 bracketed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == DEFAULT_PORTS.get(self.scheme):
            return f"{self.scheme}://{host}"
        return f"{self.scheme}://{host}:{self.port}"


def _split_scheme(text: str) -> tuple[str, str] | None:
    """``HTTPS://rest`` -> ``("https", "rest")``; None unless the scheme is http or https."""
    scheme, separator, rest = text.partition("://")
    if not separator:
        return None
    scheme = scheme.lower()
    if scheme not in DEFAULT_PORTS:
        return None
    return scheme, rest


def _has_space_or_control(text: str) -> bool:
    return not text.isprintable() or any(char.isspace() for char in text)


def parse_origin(value: str) -> Origin | None:
    """Parse an ``Origin`` header value into a normalized :class:`Origin`, or return None.

    None for ``null``, an empty value, a non-http(s) scheme, userinfo, any path (even
    ``/``), a query, a fragment, whitespace or control characters, a missing, zero, too large
    or zero-padded port, a malformed host, several origins, or an over-long value. Unicode
    host names are converted to punycode (Python's ``idna`` codec); one that cannot be is
    refused. Never raises for any string.
    """
    if not value or len(value) > MAX_ORIGIN_LENGTH or _has_space_or_control(value):
        return None
    split = _split_scheme(value)
    if split is None:
        return None
    scheme, authority = split
    if not authority or any(char in _NOT_IN_AUTHORITY for char in authority):
        return None
    host_port = split_host_port(authority)
    if host_port is None:
        return None
    host_text, port = host_port
    host = normalize_host(host_text, allow_idn=True)
    if host is None:
        return None
    return Origin(scheme, host, DEFAULT_PORTS[scheme] if port is None else port)


@dataclass(frozen=True, slots=True)
class OriginPattern:
    """One entry of ``security.origins.allowed``, parsed.

    ``host`` is normalized like :attr:`Origin.host`. When ``any_subdomain`` is true the
    pattern was ``*.host`` and matches names with one or more labels in front of ``host``,
    never ``host`` itself. ``port`` None means any port (``:*``).
    """

    scheme: str
    host: str
    port: int | None
    any_subdomain: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.any_subdomain:
            host = "*." + host
        if self.port is None:
            return f"{self.scheme}://{host}:*"
        if self.port == DEFAULT_PORTS.get(self.scheme):
            return f"{self.scheme}://{host}"
        return f"{self.scheme}://{host}:{self.port}"

    def matches(self, origin: Origin) -> bool:
        """Compare scheme, host and port as whole values (never prefixes or substrings)."""
        if origin.scheme != self.scheme:
            return False
        if self.port is not None and origin.port != self.port:
            return False
        if self.any_subdomain:
            # The origin host is a validated name, so the character before the suffix's dot
            # ends a non-empty label: "x.devtunnels.ms" matches, "xdevtunnels.ms" cannot.
            return origin.host.endswith("." + self.host)
        return origin.host == self.host


_WILDCARD_HINT = (
    "'*' is allowed only as the whole leftmost label ('https://*.example.com') "
    "or as the whole port ('http://localhost:*')"
)


def parse_origin_pattern(text: str) -> OriginPattern:
    """Parse an allowed-origin pattern; raise ValueError naming it if it is not one.

    Forms: ``https://app.example.com`` (default port only), ``http://127.0.0.1:3000``,
    ``http://localhost:*`` (any port), ``http://[::1]:*``, ``https://*.devtunnels.ms`` (one
    or more labels before ``devtunnels.ms``, never ``devtunnels.ms`` itself). A wildcard host
    needs at least two labels after ``*.`` so that ``https://*.com`` cannot allow the web.
    """
    if not isinstance(text, str):
        raise ValueError(f"origin pattern {text!r} is not a string")
    if not text or _has_space_or_control(text):
        raise ValueError(f"origin pattern {text!r} is empty or contains whitespace")
    split = _split_scheme(text)
    if split is None:
        raise ValueError(
            f"origin pattern {text!r} must start with 'http://' or 'https://' "
            "(like 'https://app.example.com')"
        )
    scheme, authority = split
    if any(char in "/?#\\" for char in authority):
        raise ValueError(
            f"origin pattern {text!r} has a path, query or fragment; an Origin never does "
            "(write it like 'https://app.example.com')"
        )
    if "@" in authority:
        raise ValueError(f"origin pattern {text!r} has userinfo ('@'); an Origin never does")
    any_port = authority.endswith(":*")
    if any_port:
        authority = authority[:-2]
    any_subdomain = authority.startswith("*.")
    if any_subdomain:
        authority = authority[2:]
    if "*" in authority:
        raise ValueError(f"origin pattern {text!r}: {_WILDCARD_HINT}")
    host_port = split_host_port(authority)
    if host_port is None:
        raise ValueError(
            f"origin pattern {text!r} does not have a valid host[:port] "
            "(ports are 1..65535 or '*'; IPv6 addresses go in brackets)"
        )
    host_text, port = host_port
    if any_port and port is not None:
        raise ValueError(f"origin pattern {text!r} has two ports")
    host = normalize_host(host_text, allow_idn=True)
    if host is None:
        raise ValueError(f"origin pattern {text!r} does not have a valid host name or address")
    if any_subdomain and is_ip_address(host):
        raise ValueError(f"origin pattern {text!r}: a wildcard cannot precede an IP address")
    if any_subdomain and "." not in host:
        raise ValueError(
            f"origin pattern {text!r} would match every site under a top-level domain; "
            "name at least two labels after '*.'"
        )
    if not any_port and port is None:
        port = DEFAULT_PORTS[scheme]
    return OriginPattern(scheme, host, port, any_subdomain)


@dataclass(frozen=True, slots=True)
class OriginVerdict:
    """The Origin check's answer; ``detail`` is a short explanation for the operator."""

    allowed: bool
    detail: str


class OriginPolicy:
    """Decide whether a WebSocket handshake's ``Origin`` is acceptable.

    * a missing Origin (non-browser clients send none) is allowed only when ``allow_missing``
      and the request is not cookie-authenticated: browsers always send Origin on a
      WebSocket handshake, and a cookie is exactly what a hijacking page would ride on;
    * a present Origin that does not parse, including ``null``, is refused;
    * ``allow_all`` allows every parseable origin (local mode only; the config refuses it
      elsewhere);
    * otherwise the origin must match one of ``patterns``.
    """

    __slots__ = ("_allow_all", "_allow_missing", "_patterns")

    def __init__(
        self,
        patterns: Sequence[str],
        *,
        allow_all: bool = False,
        allow_missing: bool = True,
    ) -> None:
        if isinstance(patterns, str):
            raise TypeError("patterns must be a sequence of origin patterns, not one string")
        parsed: list[OriginPattern] = []
        for text in patterns:
            pattern = parse_origin_pattern(text)
            if pattern not in parsed:
                parsed.append(pattern)
        self._patterns = tuple(parsed)
        self._allow_all = allow_all
        self._allow_missing = allow_missing

    @property
    def patterns(self) -> tuple[OriginPattern, ...]:
        return self._patterns

    @property
    def allow_all(self) -> bool:
        return self._allow_all

    @property
    def allow_missing(self) -> bool:
        return self._allow_missing

    def __repr__(self) -> str:
        return (
            f"OriginPolicy({[str(pattern) for pattern in self._patterns]!r}, "
            f"allow_all={self._allow_all!r}, allow_missing={self._allow_missing!r})"
        )

    def check(self, origin_header: str | None, *, cookie_auth: bool = False) -> OriginVerdict:
        """Decide on a handshake's ``Origin`` header value (None when the header is absent).

        ``cookie_auth`` says the request authenticates with the session cookie; it then
        needs a present, allowed Origin.
        """
        if origin_header is None:
            if cookie_auth:
                return OriginVerdict(
                    False, "no Origin header: cookie-authenticated requests need an allowed Origin"
                )
            if self._allow_missing:
                return OriginVerdict(True, "no Origin header and security.origins.allow_missing is true")
            return OriginVerdict(False, "no Origin header and security.origins.allow_missing is false")
        origin = parse_origin(origin_header)
        if origin is None:
            # The raw value is not echoed: it is attacker-controlled and could carry userinfo.
            if origin_header == "null":
                return OriginVerdict(
                    False,
                    "Origin is 'null' (an opaque origin: sandboxed frame, file: page or "
                    "redirect), which is never allowed",
                )
            return OriginVerdict(False, "Origin header is not a single http(s) origin")
        if self._allow_all:
            return OriginVerdict(True, f"origin {str(origin)!r} allowed: security.origins.allow_all is true")
        for pattern in self._patterns:
            if pattern.matches(origin):
                return OriginVerdict(True, f"origin {str(origin)!r} matches pattern {str(pattern)!r}")
        return OriginVerdict(False, f"origin {str(origin)!r} matches no pattern in security.origins.allowed")
