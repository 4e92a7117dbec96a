"""Tests for wardgate.gate.network: networks, X-Forwarded-For (RFC 7239) and IP lists."""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wardgate.gate.network import (
    MAX_FORWARDED_HOPS,
    AddressPolicy,
    AddressVerdict,
    ClientAddress,
    IPAddress,
    IPNetwork,
    client_address,
    normalize_ip,
    parse_networks,
)

TRUSTED = parse_networks(["10.0.0.0/8", "::1", "fd00::/8"])

# --- parse_networks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([], ()),
        (["10.0.0.0/8"], (IPv4Network("10.0.0.0/8"),)),
        (["192.0.2.7"], (IPv4Network("192.0.2.7/32"),)),
        (["192.0.2.7/32"], (IPv4Network("192.0.2.7/32"),)),
        (["0.0.0.0/0"], (IPv4Network("0.0.0.0/0"),)),
        (["10.0.0.0/255.0.0.0"], (IPv4Network("10.0.0.0/8"),)),
        (["2001:db8::/32"], (IPv6Network("2001:db8::/32"),)),
        (["2001:DB8::/32"], (IPv6Network("2001:db8::/32"),)),
        (["::1"], (IPv6Network("::1/128"),)),
        (["::/0"], (IPv6Network("::/0"),)),
        (
            ["10.0.0.0/8", "::1", "10.0.0.0/8"],
            (IPv4Network("10.0.0.0/8"), IPv6Network("::1/128")),
        ),
    ],
)
def test_parse_networks(items: list[str], expected: tuple[IPNetwork, ...]) -> None:
    assert parse_networks(items) == expected


@pytest.mark.parametrize(
    ("item", "hint"),
    [
        ("10.0.0.1/8", "write '10.0.0.0/8'"),
        ("192.168.1.1/24", "write '192.168.1.0/24'"),
        ("2001:db8::1/32", "write '2001:db8::/32'"),
        ("::ffff:10.0.0.0/104", "write the IPv4 form '10.0.0.0/8'"),
        ("::ffff:192.0.2.7", "write the IPv4 form '192.0.2.7/32'"),
        ("fe80::1%eth0", "zone ids"),
        ("fe80::%eth0/64", "zone ids"),
        ("10.0.0.0/33", "not an IP address or CIDR network"),
        ("10.0.0", "not an IP address or CIDR network"),
        ("010.0.0.0/8", "not an IP address or CIDR network"),
        ("localhost", "not an IP address or CIDR network"),
        ("", "not an IP address or CIDR network"),
        (" 10.0.0.0/8", "not an IP address or CIDR network"),
        ("10.0.0.0/8 ", "not an IP address or CIDR network"),
        ("10.0.0.0/", "not an IP address or CIDR network"),
        ("10.0.0.0/-1", "not an IP address or CIDR network"),
        ("[::1]", "not an IP address or CIDR network"),
        ("10.0.0.0-10.0.0.255", "not an IP address or CIDR network"),
        ("*", "not an IP address or CIDR network"),
    ],
)
def test_parse_networks_names_the_bad_entry(item: str, hint: str) -> None:
    with pytest.raises(ValueError, match="network") as caught:
        parse_networks(["127.0.0.1", item])
    message = str(caught.value)
    assert repr(item) in message
    assert hint in message


def test_parse_networks_refuses_non_strings() -> None:
    with pytest.raises(ValueError, match="not a string"):
        parse_networks([IPv4Network("10.0.0.0/8")])  # type: ignore[list-item]


def test_parse_networks_refuses_one_string() -> None:
    with pytest.raises(TypeError, match="not one string"):
        parse_networks("10.0.0.0/8")


# --- normalize_ip -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", IPv4Address("1.2.3.4")),
        ("::ffff:1.2.3.4", IPv4Address("1.2.3.4")),
        ("::FFFF:7f00:1", IPv4Address("127.0.0.1")),
        ("::1", IPv6Address("::1")),
        ("2001:DB8::1", IPv6Address("2001:db8::1")),
        ("::1.2.3.4", IPv6Address("::102:304")),  # IPv4-compatible, deprecated: stays IPv6
        ("", None),
        ("fe80::1%eth0", None),
        ("fe80::1%1", None),
        ("[::1]", None),
        ("1.2.3.4:80", None),
        (" 1.2.3.4", None),
        ("1.2.3.4\n", None),
        ("01.2.3.4", None),
        ("1.2.3", None),
        ("256.1.1.1", None),
        ("0x7f.0.0.1", None),
        ("2130706433", None),
        ("unknown", None),
        ("1.2.3.4/32", None),
        ("1" * 100, None),
    ],
)
def test_normalize_ip(text: str, expected: IPAddress | None) -> None:
    assert normalize_ip(text) == expected


# --- client_address -----------------------------------------------------------------------


def _ip(text: str) -> IPAddress:
    return ip_address(text)


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected_address", "via_proxy", "detail_part"),
    [
        (None, "203.0.113.5", None, False, "peer address is missing"),
        ("garbage", None, None, False, "not an IP address"),
        ("fe80::1%eth0", None, None, False, "not an IP address"),
        ("203.0.113.5", None, "203.0.113.5", False, "direct connection"),
        ("203.0.113.5", "1.2.3.4", "203.0.113.5", False, "X-Forwarded-For ignored"),
        ("203.0.113.5", "10.0.0.1", "203.0.113.5", False, "X-Forwarded-For ignored"),
        ("10.0.0.1", None, "10.0.0.1", False, "sent no X-Forwarded-For"),
        ("10.0.0.1", "", "10.0.0.1", False, "sent no X-Forwarded-For"),
        ("10.0.0.1", "  ", "10.0.0.1", False, "sent no X-Forwarded-For"),
        ("10.0.0.1", "203.0.113.5", "203.0.113.5", True, "reported by trusted proxy '10.0.0.1'"),
        ("::ffff:10.0.0.1", "203.0.113.5", "203.0.113.5", True, "from X-Forwarded-For"),
        ("::1", "203.0.113.5", "203.0.113.5", True, "from X-Forwarded-For"),
        # a client cannot choose its address by writing to the left of it
        ("10.0.0.1", "198.51.100.1, 203.0.113.5", "203.0.113.5", True, "from X-Forwarded-For"),
        ("10.0.0.1", "10.0.0.9, 203.0.113.5", "203.0.113.5", True, "from X-Forwarded-For"),
        ("10.0.0.1", "127.0.0.1,203.0.113.5", "203.0.113.5", True, "from X-Forwarded-For"),
        # trusted hops are skipped
        (
            "10.0.0.1",
            "203.0.113.5, 10.0.0.2",
            "203.0.113.5",
            True,
            "reported by trusted proxy '10.0.0.2'",
        ),
        ("10.0.0.1", "203.0.113.5, fd00::2, 10.0.0.2", "203.0.113.5", True, "client"),
        # several headers joined by commas
        ("10.0.0.1", "1.1.1.1, 2.2.2.2,10.0.0.2", "2.2.2.2", True, "client"),
        # every entry trusted: the leftmost
        ("10.0.0.1", "10.0.0.3, 10.0.0.2", "10.0.0.3", True, "using the leftmost"),
        # an unparsable entry stops the walk at the last trusted hop
        ("10.0.0.1", "garbage", "10.0.0.1", False, "last trusted hop '10.0.0.1'"),
        ("10.0.0.1", "unknown", "10.0.0.1", False, "not an IP address"),
        ("10.0.0.1", "203.0.113.5, garbage, 10.0.0.2", "10.0.0.2", True, "last trusted hop"),
        ("10.0.0.1", "203.0.113.5,,10.0.0.2", "10.0.0.2", True, "last trusted hop"),
        ("10.0.0.1", "203.0.113.5,", "10.0.0.1", False, "last trusted hop"),
        ("10.0.0.1", "_hidden, 203.0.113.5", "203.0.113.5", True, "client"),
        # entry forms
        ("10.0.0.1", " 203.0.113.5 ", "203.0.113.5", True, "client"),
        ("10.0.0.1", "\t203.0.113.5", "203.0.113.5", True, "client"),
        ("10.0.0.1", "203.0.113.5:4711", "203.0.113.5", True, "client"),
        ("10.0.0.1", "[2001:db8::5]:443", "2001:db8::5", True, "client"),
        ("10.0.0.1", "[2001:db8::5]", "2001:db8::5", True, "client"),
        ("10.0.0.1", "2001:DB8::5", "2001:db8::5", True, "client"),
        ("10.0.0.1", "::ffff:203.0.113.5", "203.0.113.5", True, "client"),
        ("10.0.0.1", "[::ffff:203.0.113.5]:80", "203.0.113.5", True, "client"),
        ("10.0.0.1", "[203.0.113.5]:80", "10.0.0.1", False, "last trusted hop"),
        ("10.0.0.1", "203.0.113.5:0", "10.0.0.1", False, "last trusted hop"),
        ("10.0.0.1", "203.0.113.5:99999", "10.0.0.1", False, "last trusted hop"),
        ("10.0.0.1", "203.0.113.5:", "10.0.0.1", False, "last trusted hop"),
        ("10.0.0.1", "2001:db8::5:443:1:2:3:4:5", "10.0.0.1", False, "last trusted hop"),
        ("10.0.0.1", "fe80::5%eth0", "10.0.0.1", False, "last trusted hop"),
        ("10.0.0.1", "for=203.0.113.5", "10.0.0.1", False, "last trusted hop"),
        ("10.0.0.1", "203.0.113.5 10.0.0.2", "10.0.0.1", False, "last trusted hop"),
        ("10.0.0.1", "2" * 100, "10.0.0.1", False, "last trusted hop"),
    ],
)
def test_client_address(
    peer: str | None,
    forwarded_for: str | None,
    expected_address: str | None,
    via_proxy: bool,
    detail_part: str,
) -> None:
    result = client_address(peer, forwarded_for, TRUSTED)
    expected = None if expected_address is None else _ip(expected_address)
    assert result.address == expected
    assert result.via_proxy is via_proxy
    assert detail_part in result.detail


def test_no_trusted_proxies_means_the_peer() -> None:
    assert client_address("10.0.0.1", "203.0.113.5", ()) == ClientAddress(
        IPv4Address("10.0.0.1"),
        False,
        "peer '10.0.0.1' is not a trusted proxy; X-Forwarded-For ignored",
    )


def test_only_the_rightmost_hops_are_considered() -> None:
    proxies = ", ".join(["10.0.0.5"] * MAX_FORWARDED_HOPS)
    result = client_address("10.0.0.1", f"203.0.113.9, {proxies}", TRUSTED)
    assert result.address == IPv4Address("10.0.0.5")
    assert f"of the rightmost {MAX_FORWARDED_HOPS}" in result.detail
    proxies = ", ".join(["10.0.0.5"] * (MAX_FORWARDED_HOPS - 1))
    result = client_address("10.0.0.1", f"198.51.100.1, 203.0.113.9, {proxies}", TRUSTED)
    assert result.address == IPv4Address("203.0.113.9")


def test_huge_header_is_cheap() -> None:
    header = ", ".join(["10.0.0.5"] * 200_000) + ", 203.0.113.9"
    started = time.perf_counter()
    result = client_address("10.0.0.1", header, TRUSTED)
    assert time.perf_counter() - started < 0.5
    assert result.address == IPv4Address("203.0.113.9")


def test_detail_does_not_echo_unparsable_entries() -> None:
    result = client_address("10.0.0.1", "secret-ish\x00text", TRUSTED)
    assert "secret" not in result.detail


# --- AddressPolicy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allow", "deny", "address", "expected"),
    [
        ([], [], "203.0.113.5", True),
        ([], [], "::1", True),
        ([], [], None, True),
        (["10.0.0.0/8"], [], "10.1.2.3", True),
        (["10.0.0.0/8"], [], "11.0.0.1", False),
        (["10.0.0.0/8"], [], None, False),
        (["10.0.0.0/8"], [], "::ffff:10.1.2.3", True),
        (["10.0.0.0/8"], [], "2001:db8::1", False),
        (["10.0.0.0/8"], ["10.0.0.5"], "10.0.0.5", False),
        (["10.0.0.0/8"], ["10.0.0.5"], "10.0.0.6", True),
        (["10.0.0.0/8"], ["10.0.0.0/8"], "10.0.0.6", False),
        ([], ["203.0.113.0/24"], "203.0.113.9", False),
        ([], ["203.0.113.0/24"], "::ffff:203.0.113.9", False),
        ([], ["203.0.113.0/24"], "203.0.114.1", True),
        ([], ["203.0.113.0/24"], None, True),
        (["2001:db8::/32"], [], "2001:db8::7", True),
        (["2001:db8::/32"], [], "2001:db9::7", False),
        (["2001:db8::/32"], [], "1.2.3.4", False),
        (["0.0.0.0/0", "::/0"], ["::/0"], "1.2.3.4", True),
        (["0.0.0.0/0", "::/0"], ["::/0"], "::2", False),
    ],
)
def test_address_policy(allow: list[str], deny: list[str], address: str | None, expected: bool) -> None:
    policy = AddressPolicy(parse_networks(allow), parse_networks(deny))
    checked = None if address is None else ip_address(address)
    assert policy.check(checked).allowed is expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (None, AddressVerdict(False, "client address is unknown and an IP allowlist is configured")),
        (
            IPv4Address("10.0.0.5"),
            AddressVerdict(False, "address '10.0.0.5' is in denied network '10.0.0.5/32'"),
        ),
        (
            IPv4Address("10.0.0.6"),
            AddressVerdict(True, "address '10.0.0.6' is in allowed network '10.0.0.0/8'"),
        ),
        (IPv4Address("11.0.0.1"), AddressVerdict(False, "address '11.0.0.1' is in no allowed network")),
    ],
)
def test_address_policy_details(address: IPAddress | None, expected: AddressVerdict) -> None:
    policy = AddressPolicy(parse_networks(["10.0.0.0/8"]), parse_networks(["10.0.0.5"]))
    assert policy.check(address) == expected


def test_address_policy_without_lists() -> None:
    policy = AddressPolicy([], [])
    assert policy.check(IPv4Address("1.2.3.4")) == AddressVerdict(
        True, "address '1.2.3.4' allowed: no IP allowlist is configured"
    )
    assert policy.check(None) == AddressVerdict(
        True, "client address is unknown; no IP allowlist is configured"
    )
    assert repr(policy) == "AddressPolicy(allow=[], deny=[])"
    assert policy.allow == ()
    assert policy.deny == ()


# --- properties ---------------------------------------------------------------------------

_UNTRUSTED_V4 = st.ip_addresses(v=4, network="203.0.113.0/24")
_UNTRUSTED_V6 = st.ip_addresses(v=6, network="2001:db8::/32")
_UNTRUSTED = st.one_of(_UNTRUSTED_V4, _UNTRUSTED_V6)
_TRUSTED_HOP = st.one_of(st.ip_addresses(v=4, network="10.0.0.0/8"), st.ip_addresses(v=6, network="fd00::/8"))


@given(st.one_of(st.none(), st.text(max_size=50)), st.one_of(st.none(), st.text(max_size=200)))
def test_client_address_never_raises(peer: str | None, forwarded_for: str | None) -> None:
    result = client_address(peer, forwarded_for, TRUSTED)
    assert isinstance(result, ClientAddress)
    if result.address is None:
        assert not result.via_proxy


@given(_UNTRUSTED, st.one_of(st.none(), st.text(max_size=100)))
def test_an_untrusted_peer_is_the_client_whatever_it_forwards(
    peer: IPv4Address | IPv6Address, forwarded_for: str | None
) -> None:
    result = client_address(str(peer), forwarded_for, TRUSTED)
    assert result.address == peer
    assert not result.via_proxy


@given(
    st.text(max_size=100),
    _UNTRUSTED,
    st.lists(_TRUSTED_HOP, max_size=5),
    _TRUSTED_HOP,
)
def test_text_left_of_the_real_client_cannot_change_it(
    spoofed: str,
    client: IPv4Address | IPv6Address,
    proxies: list[IPv4Address | IPv6Address],
    peer: IPv4Address | IPv6Address,
) -> None:
    header = ", ".join([spoofed, str(client), *map(str, proxies)])
    result = client_address(str(peer), header, TRUSTED)
    assert result.address == client
    assert result.via_proxy


@given(st.lists(_TRUSTED_HOP, min_size=1, max_size=40), _TRUSTED_HOP)
def test_all_trusted_hops_give_the_leftmost_considered(
    hops: list[IPv4Address | IPv6Address], peer: IPv4Address | IPv6Address
) -> None:
    result = client_address(str(peer), ",".join(map(str, hops)), TRUSTED)
    assert result.address == hops[-MAX_FORWARDED_HOPS:][0]


@given(
    st.lists(st.sampled_from(["10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32", "::1"]), max_size=3),
    st.lists(st.sampled_from(["10.0.0.5", "192.0.2.128/25", "2001:db8::/48"]), max_size=3),
    st.ip_addresses(),
)
def test_deny_always_wins(allow: list[str], deny: list[str], address: IPv4Address | IPv6Address) -> None:
    allow_networks, deny_networks = parse_networks(allow), parse_networks(deny)
    verdict = AddressPolicy(allow_networks, deny_networks).check(address)
    address = normalize_ip(str(address)) or address
    if any(address in network for network in deny_networks):
        assert not verdict.allowed
    elif not allow_networks:
        assert verdict.allowed
    else:
        assert verdict.allowed is any(address in network for network in allow_networks)
