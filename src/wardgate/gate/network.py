"""Client address: trusted proxies, ``X-Forwarded-For``, and the IP allow/deny lists.

The TCP peer is the only address nobody can forge. A reverse proxy in front of wardgate
replaces it with its own, and reports the client in ``X-Forwarded-For`` (the de-facto header
that RFC 7239 section 1 describes and standardizes as ``Forwarded: for=``). Each proxy
*appends* the address it received the request from, so only the right end of the list, as
far as it was written by proxies the operator trusts, is reliable: anything to the left of
the first untrusted hop may have been made up by the client.

:func:`client_address` therefore believes the header only when the peer is a trusted proxy,
and walks it from the right, past trusted hops, to the first untrusted address.

Addresses follow RFC 4291 section 2.2 and RFC 5952 (IPv6) and dotted-decimal IPv4 without
leading zeros. IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``, RFC 4291 section 2.5.5.2,
what a dual-stack socket reports for an IPv4 client) are treated as the IPv4 address, so one
client has one key and one allowlist entry covers it. Zone identifiers (RFC 6874) are refused.

This module does no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TypeAlias

from wardgate.gate.host import split_host_port

__all__ = [
    "MAX_FORWARDED_HOPS",
    "AddressPolicy",
    "AddressVerdict",
    "ClientAddress",
    "IPAddress",
    "IPNetwork",
    "client_address",
    "normalize_ip",
    "parse_networks",
]

IPAddress: TypeAlias = IPv4Address | IPv6Address
IPNetwork: TypeAlias = IPv4Network | IPv6Network

MAX_FORWARDED_HOPS = 32
"""At most this many ``X-Forwarded-For`` entries, counted from the right, are looked at."""

_MAX_ENTRY_LENGTH = 64  # "[" + 45-character IPv6 text + "]:65535" fits comfortably
_IPV4_MAPPED = IPv6Network("::ffff:0:0/96")


def parse_networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse CIDR networks (``10.0.0.0/8``, ``2001:db8::/32``) and single addresses.

    A single address becomes a /32 or /128 network. Host bits must be zero: ``10.0.0.1/8`` is
    refused with a hint to write ``10.0.0.0/8``, because the operator may have meant either.
    Zone ids and IPv4-mapped IPv6 networks (write the IPv4 form) are refused too. Duplicates
    are dropped; order is kept. Raises ValueError naming the first bad entry.
    """
    if isinstance(items, str):
        raise TypeError("items must be an iterable of networks, not one string")
    networks: list[IPNetwork] = []
    for item in items:
        network = _parse_network(item)
        if network not in networks:
            networks.append(network)
    return tuple(networks)


def _parse_network(item: str) -> IPNetwork:
    if not isinstance(item, str):
        raise ValueError(f"network {item!r} is not a string")
    if "%" in item:
        raise ValueError(f"network {item!r}: zone ids ('%eth0') are not supported")
    try:
        network = ipaddress.ip_network(item, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(
                f"network {item!r} is not an IP address or CIDR network "
                "(like '10.0.0.0/8', '192.0.2.7' or '2001:db8::/32')"
            ) from None
        raise ValueError(
            f"network {item!r} has host bits set; write {str(loose)!r} "
            "(or the single address without a prefix length)"
        ) from None
    if (
        isinstance(network, IPv6Network)
        and network.subnet_of(_IPV4_MAPPED)
        and (mapped := network.network_address.ipv4_mapped) is not None
    ):
        ipv4 = IPv4Network((mapped, network.prefixlen - 96))
        raise ValueError(f"network {item!r} is IPv4-mapped IPv6; write the IPv4 form {str(ipv4)!r}")
    return network


def normalize_ip(text: str) -> IPAddress | None:
    """Parse a bare IP address; IPv4-mapped IPv6 becomes IPv4. None if it is not one.

    Zone ids (``fe80::1%eth0``), brackets, ports, surrounding whitespace and IPv4 with
    leading zeros are all refused. Never raises for any string.
    """
    if not text or len(text) > _MAX_ENTRY_LENGTH or "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return _unmap(address)


def _unmap(address: IPAddress) -> IPAddress:
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _parse_forwarded_entry(entry: str) -> IPAddress | None:
    """One ``X-Forwarded-For`` entry: an address, ``[v6]``, ``[v6]:port`` or ``v4:port``.

    Some proxies (Azure front ends, for instance) append the client's port; it is dropped.
    """
    entry = entry.strip(" \t")
    if not entry or len(entry) > _MAX_ENTRY_LENGTH:
        return None
    address = normalize_ip(entry)
    if address is not None:
        return address
    split = split_host_port(entry)
    if split is None:
        return None
    host_text = split[0]
    if host_text.startswith("["):
        address = normalize_ip(host_text[1:-1])
        # Only IPv6 goes in brackets (a mapped address has become IPv4 by now, which is fine).
        return address if address is not None and ":" in host_text else None
    address = normalize_ip(host_text)
    return address if isinstance(address, IPv4Address) and split[1] is not None else None


def peer_is_trusted(peer: str | None, trusted: Sequence[IPNetwork]) -> bool:
    """Whether the TCP peer is one of the trusted proxies (whose forwarded headers count)."""
    address = normalize_ip(peer) if peer is not None else None
    return address is not None and _in_any(address, trusted) is not None


def _in_any(address: IPAddress, networks: Sequence[IPNetwork]) -> IPNetwork | None:
    for network in networks:
        if address in network:
            return network
    return None


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """Who the client is, as far as wardgate can tell.

    ``address`` is None only when the peer address itself is missing or invalid.
    ``via_proxy`` is true when the address was taken from ``X-Forwarded-For`` rather than
    being the TCP peer. ``detail`` is a short explanation for the operator.
    """

    address: IPAddress | None
    via_proxy: bool
    detail: str


def client_address(
    peer: str | None,
    forwarded_for: str | None,
    trusted: Sequence[IPNetwork],
) -> ClientAddress:
    """Find the client's address from the TCP peer and ``X-Forwarded-For``.

    ``forwarded_for`` is the header value, several headers joined with commas. If the peer is
    not in a ``trusted`` network the header is ignored. Otherwise the entries are walked from
    the right: trusted entries are proxies and are skipped; the first untrusted entry is the
    client. An entry that is not an address stops the walk, and the last trusted hop seen is
    used (it is the farthest address known to be real). If every entry is trusted, the
    leftmost is used. Only the rightmost :data:`MAX_FORWARDED_HOPS` entries are looked at.
    """
    peer_address = normalize_ip(peer) if peer is not None else None
    if peer_address is None:
        return ClientAddress(None, False, "peer address is missing or not an IP address")
    has_header = forwarded_for is not None and forwarded_for.strip(" \t") != ""
    if _in_any(peer_address, trusted) is None:
        if has_header:
            return ClientAddress(
                peer_address,
                False,
                f"peer {str(peer_address)!r} is not a trusted proxy; X-Forwarded-For ignored",
            )
        return ClientAddress(peer_address, False, f"direct connection from {str(peer_address)!r}")
    if forwarded_for is None or not has_header:
        return ClientAddress(
            peer_address,
            False,
            f"trusted proxy {str(peer_address)!r} sent no X-Forwarded-For; using the peer",
        )
    # rsplit bounds the work: the leftover left part (if any) is not looked at.
    entries = forwarded_for.rsplit(",", MAX_FORWARDED_HOPS)
    truncated = len(entries) > MAX_FORWARDED_HOPS
    if truncated:
        entries = entries[1:]
    last_trusted = peer_address
    from_header = False
    for entry in reversed(entries):
        address = _parse_forwarded_entry(entry)
        if address is None:
            return ClientAddress(
                last_trusted,
                from_header,
                "X-Forwarded-For has an entry that is not an IP address; "
                f"using the last trusted hop {str(last_trusted)!r}",
            )
        if _in_any(address, trusted) is None:
            return ClientAddress(
                address,
                True,
                f"client {str(address)!r} from X-Forwarded-For, "
                f"reported by trusted proxy {str(last_trusted)!r}",
            )
        last_trusted = address
        from_header = True
    scope = f"of the rightmost {MAX_FORWARDED_HOPS} " if truncated else ""
    return ClientAddress(
        last_trusted,
        True,
        f"every X-Forwarded-For entry {scope}is a trusted proxy; using the leftmost, {str(last_trusted)!r}",
    )


@dataclass(frozen=True, slots=True)
class AddressVerdict:
    """The IP allow/deny check's answer; ``detail`` is a short explanation for the operator."""

    allowed: bool
    detail: str


class AddressPolicy:
    """IP allowlist and denylist. Deny wins; an empty allowlist allows every address.

    An unknown address (None) is refused only when an allowlist is configured: it cannot be
    shown to be in it, and it cannot be in the denylist either.
    """

    __slots__ = ("_allow", "_deny")

    def __init__(self, allow: Sequence[IPNetwork], deny: Sequence[IPNetwork]) -> None:
        self._allow = tuple(allow)
        self._deny = tuple(deny)

    @property
    def allow(self) -> tuple[IPNetwork, ...]:
        return self._allow

    @property
    def deny(self) -> tuple[IPNetwork, ...]:
        return self._deny

    def __repr__(self) -> str:
        allow = [str(network) for network in self._allow]
        deny = [str(network) for network in self._deny]
        return f"AddressPolicy(allow={allow!r}, deny={deny!r})"

    def check(self, address: IPAddress | None) -> AddressVerdict:
        """Decide on a client address (as :func:`client_address` found it)."""
        if address is None:
            if self._allow:
                return AddressVerdict(False, "client address is unknown and an IP allowlist is configured")
            return AddressVerdict(True, "client address is unknown; no IP allowlist is configured")
        address = _unmap(address)
        denied_by = _in_any(address, self._deny)
        if denied_by is not None:
            return AddressVerdict(False, f"address {str(address)!r} is in denied network {str(denied_by)!r}")
        if not self._allow:
            return AddressVerdict(True, f"address {str(address)!r} allowed: no IP allowlist is configured")
        allowed_by = _in_any(address, self._allow)
        if allowed_by is None:
            return AddressVerdict(False, f"address {str(address)!r} is in no allowed network")
        return AddressVerdict(True, f"address {str(address)!r} is in allowed network {str(allowed_by)!r}")
