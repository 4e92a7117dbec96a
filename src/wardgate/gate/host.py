"""Host header allowlist: the defence against DNS rebinding.

A DNS-rebinding attack points an attacker's name (``evil.example``) at 127.0.0.1 after a
page from that name has loaded, so the browser talks to wardgate as "same origin" with the
attacker's page. The request still carries ``Host: evil.example`` (RFC 9110 section 7.2),
so refusing every Host that is not one of the names wardgate is reached by stops it.

``Host = uri-host [ ":" port ]`` with ``uri-host`` from RFC 3986 section 3.2.2. wardgate
accepts the forms a client really sends and nothing looser:

* a DNS name of letter-digit-hyphen labels (RFC 1123 section 2.1), compared lowercase and
  without one trailing dot (``example.com.`` names the same host as ``example.com``);
* an IPv4 address in canonical dotted-decimal form (``127.1`` and ``0x7f.0.0.1`` are refused:
  RFC 3986 section 7.4 warns about exactly those spellings);
* an IPv6 address in brackets (RFC 3986 section 3.2.2), compared in RFC 5952 form without the
  brackets; zone identifiers and IPvFuture literals are refused;
* an optional port of 1 to 5 digits in 1..65535 without leading zeros.

Internationalised names are punycode (RFC 3492) on the wire. Configuration may spell them in
Unicode; :func:`normalize_host` converts them with Python's ``idna`` codec when asked to.

This module does no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_ALLOWED_HOSTS",
    "MAX_HOST_HEADER_LENGTH",
    "HostPolicy",
    "HostVerdict",
    "is_ip_address",
    "normalize_host",
    "parse_host_header",
    "split_host_port",
]

DEFAULT_ALLOWED_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
"""The names a loopback-bound wardgate is reached by."""

MAX_HOST_HEADER_LENGTH = 1024
"""Longer Host values are refused before any parsing (a DNS name is at most 253 octets)."""

_MAX_NAME_LENGTH = 253
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_HEX_NUMBER = re.compile(r"0x[0-9a-f]*")
_PORT = re.compile(r"[1-9][0-9]{0,4}")


def _is_printable_without_space(text: str) -> bool:
    """True if *text* has no whitespace, control, format or unassigned code point."""
    return text.isprintable() and not any(char.isspace() for char in text)


def split_host_port(authority: str) -> tuple[str, int | None] | None:
    """Split ``host[:port]`` (RFC 3986 section 3.2.2 and 3.2.3) into the host text and port.

    The host text is returned as written (brackets kept around an IPv6 literal) for
    :func:`normalize_host` to check. The port must be 1..65535 written without leading
    zeros; an empty port (``host:``) is refused. Returns None when the shape is wrong:
    an unclosed bracket, text after ``]`` that is not a port, or a second ``:`` outside
    brackets (an IPv6 address must be bracketed).
    """
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            return None
        host_text, after = authority[: close + 1], authority[close + 1 :]
        if not after:
            return host_text, None
        if not after.startswith(":"):
            return None
        port_text: str | None = after[1:]
    else:
        if authority.count(":") > 1:
            return None
        host_text, colon, port_text = authority.partition(":")
        if not colon:
            port_text = None
    if port_text is None:
        return host_text, None
    if not _PORT.fullmatch(port_text):
        return None
    port = int(port_text)
    if port > 65535:
        return None
    return host_text, port


def _normalize_ipv6_literal(text: str) -> str | None:
    """``[2001:DB8::1]`` -> ``2001:db8::1``; None for zone ids, IPvFuture or bad syntax."""
    inner = text[1:-1]
    if not text.endswith("]") or not inner or "%" in inner or not inner.isascii():
        return None
    try:
        address = ipaddress.IPv6Address(inner)
    except ValueError:
        return None
    return address.compressed


def _to_ascii(text: str) -> str | None:
    """Convert a Unicode host name to punycode with Python's ``idna`` codec (IDNA 2003)."""
    if not _is_printable_without_space(text):
        return None
    try:
        return text.encode("idna").decode("ascii")
    except (UnicodeError, ValueError):
        return None


def normalize_host(text: str, *, allow_idn: bool = False) -> str | None:
    """Normalize a URI host (RFC 3986 section 3.2.2), or return None if it is not one.

    * ``[::1]`` -> ``::1`` (RFC 5952 form, brackets removed; zone ids refused);
    * ``127.0.0.1`` stays as it is; a name whose last label is numeric must be a canonical
      dotted-decimal IPv4 address, so ``127.1``, ``0x7f.1`` and ``010.0.0.1`` are refused;
    * ``Example.COM.`` -> ``example.com``: lowercase, one trailing dot removed, each label
      1..63 letters, digits or inner hyphens, the whole name at most 253 characters.

    With ``allow_idn`` a name containing non-ASCII letters is first converted to punycode
    (``bücher.example`` -> ``xn--bcher-kva.example``); without it, non-ASCII is refused.
    Bare IPv6 addresses are refused here: :class:`HostPolicy` entries accept them separately.
    """
    if text.startswith("["):
        return _normalize_ipv6_literal(text)
    if not text.isascii():
        if not allow_idn:
            return None
        converted = _to_ascii(text)
        if converted is None:
            return None
        text = converted
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > _MAX_NAME_LENGTH:
        return None
    labels = name.split(".")
    last = labels[-1]
    if last.isdigit() or _HEX_NUMBER.fullmatch(last):
        # RFC 3986 section 7.4 and the URL standard read this as an IPv4 address; only the
        # canonical dotted-decimal spelling is accepted (ipaddress refuses leading zeros).
        try:
            address = ipaddress.IPv4Address(name)
        except ValueError:
            return None
        return str(address) if str(address) == name else None
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return name


def is_ip_address(host: str) -> bool:
    """True if a normalized host is an IPv4 or IPv6 address rather than a DNS name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_host_header(value: str) -> str | None:
    """Return the normalized host named by a ``Host`` header (RFC 9110 section 7.2).

    The port is validated (1..65535) and dropped. Returns None for anything malformed:
    empty, whitespace or control characters, userinfo (``@``), non-ASCII, bad brackets, a bad
    port or several colons without brackets. Never raises for any string.
    """
    if not value or len(value) > MAX_HOST_HEADER_LENGTH or not value.isascii():
        return None
    if not _is_printable_without_space(value):
        return None
    split = split_host_port(value)
    if split is None:
        return None
    return normalize_host(split[0])


@dataclass(frozen=True, slots=True)
class HostVerdict:
    """The Host check's answer; ``detail`` is a short explanation for the operator."""

    allowed: bool
    detail: str


def _normalize_allowed_entry(entry: str) -> tuple[str, bool]:
    """Return ``(host, is_wildcard)`` for one allowlist entry; ValueError names a bad one."""
    if not isinstance(entry, str):
        raise ValueError(f"allowed host {entry!r} is not a string")
    if not entry or not _is_printable_without_space(entry):
        raise ValueError(f"allowed host {entry!r} is empty or contains whitespace")
    if entry == "*":
        raise ValueError(
            f"allowed host {entry!r} would switch off DNS-rebinding protection; "
            "list the names clients use to reach wardgate"
        )
    if entry.startswith("*."):
        base = normalize_host(entry[2:], allow_idn=True)
        if base is None or "*" in entry[2:]:
            raise ValueError(
                f"allowed host {entry!r}: '*.' must be followed by a DNS name such as '*.example.com'"
            )
        if is_ip_address(base):
            raise ValueError(f"allowed host {entry!r}: a wildcard cannot precede an IP address")
        if "." not in base:
            raise ValueError(
                f"allowed host {entry!r} would match every name under a top-level domain; "
                "name at least two labels after '*.'"
            )
        return base, True
    if "*" in entry:
        raise ValueError(
            f"allowed host {entry!r}: '*' is allowed only as the whole leftmost label ('*.example.com')"
        )
    if ":" in entry and not entry.startswith("["):
        # A bare IPv6 address such as '::1' (a 'name:port' entry fails here too).
        host = _normalize_ipv6_literal(f"[{entry}]")
    else:
        host = normalize_host(entry, allow_idn=True)
    if host is None:
        raise ValueError(
            f"allowed host {entry!r} is neither a host name nor an IP address "
            "(entries name a host without a port)"
        )
    return host, False


class HostPolicy:
    """Allow a request only if its ``Host`` header names one of the allowed hosts.

    Entries are exact names or addresses (``localhost``, ``127.0.0.1``, ``::1``, ``[::1]``,
    ``app.example.com``) or wildcards ``*.example.com`` that match one or more further labels
    (``a.example.com``, ``a.b.example.com``) but never ``example.com`` itself. Any port is
    accepted: the port a client used is not a rebinding signal. A missing Host is refused.
    """

    __slots__ = ("_exact", "_suffixes")

    def __init__(self, allowed: Iterable[str]) -> None:
        if isinstance(allowed, str):
            raise TypeError("allowed must be an iterable of host names, not one string")
        exact: set[str] = set()
        suffixes: list[str] = []
        for entry in allowed:
            host, is_wildcard = _normalize_allowed_entry(entry)
            if not is_wildcard:
                exact.add(host)
            elif "." + host not in suffixes:
                suffixes.append("." + host)
        if not exact and not suffixes:
            raise ValueError("the allowed host list is empty: every request would be refused")
        self._exact = frozenset(exact)
        self._suffixes = tuple(suffixes)

    def __repr__(self) -> str:
        entries = sorted(self._exact) + ["*" + suffix for suffix in self._suffixes]
        return f"HostPolicy({entries!r})"

    def check(self, host_header: str | None) -> HostVerdict:
        """Decide on a request's ``Host`` header value (None when the header is absent)."""
        if host_header is None:
            return HostVerdict(False, "no Host header")
        host = parse_host_header(host_header)
        if host is None:
            return HostVerdict(False, "Host header is not a valid host[:port]")
        if host in self._exact:
            return HostVerdict(True, f"host {host!r} is in security.allowed_hosts")
        for suffix in self._suffixes:
            if host.endswith(suffix):
                return HostVerdict(True, f"host {host!r} matches '*{suffix}' in security.allowed_hosts")
        return HostVerdict(False, f"host {host!r} is not in security.allowed_hosts")
