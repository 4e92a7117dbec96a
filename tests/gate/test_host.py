"""Tests for wardgate.gate.host: Host header parsing (RFC 9110 section 7.2) and allowlist."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wardgate.gate.host import (
    DEFAULT_ALLOWED_HOSTS,
    MAX_HOST_HEADER_LENGTH,
    HostPolicy,
    HostVerdict,
    is_ip_address,
    normalize_host,
    parse_host_header,
    split_host_port,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost", "localhost"),
        ("LOCALHOST", "localhost"),
        ("LocalHost:8766", "localhost"),
        ("localhost.", "localhost"),
        ("localhost.:8766", "localhost"),
        ("localhost:1", "localhost"),
        ("localhost:65535", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.1:8766", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("[::1]", "::1"),
        ("[::1]:8766", "::1"),
        ("[0:0:0:0:0:0:0:1]:8766", "::1"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("example.com", "example.com"),
        ("a.b.example.com:443", "a.b.example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a-b.example", "a-b.example"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
    ],
)
def test_parse_host_header_accepts(value: str, expected: str) -> None:
    assert parse_host_header(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "localhost ",
        " localhost",
        "local host",
        "localhost\t",
        "localhost\x00",
        "localhost\x00.evil.com",
        "localhost\r\nX-Injected: 1",
        "localhost\x7f",
        "localhost:",
        "localhost:0",
        "localhost:65536",
        "localhost:99999",
        "localhost:08766",
        "localhost:abc",
        "localhost:+1",
        "localhost:-1",
        "localhost:8766:8766",
        "user@localhost",
        "localhost@evil.com",
        "localhost:80@evil.com",
        "::1",
        "::1:8766",
        "[::1",
        "::1]",
        "[::1]:",
        "[::1]x",
        "[::1]:abc",
        "[::1]:0",
        "[[::1]]",
        "[]",
        "[fe80::1%eth0]",
        "[fe80::1%25eth0]",
        "[v1.x]",
        "[127.0.0.1]",
        "a..b",
        ".a",
        ".",
        "a..",
        "-a.com",
        "a-.com",
        "a_b.com",
        "bücher.example",
        "127.1",
        "0x7f.0.0.1",
        "0x7f000001",
        "0177.0.0.1",
        "2130706433",
        "256.0.0.1",
        "a.123",
        "a" * 64 + ".com",
        "evil.com/x",
        "evil.com#x",
        "evil.com?x",
        "evil.com\\x",
        "evil.com,localhost",
        "*.example.com",
        "a%2ecom",
        "localhost:\uff18",
        "a" * (MAX_HOST_HEADER_LENGTH + 1),
    ],
)
def test_parse_host_header_refuses(value: str) -> None:
    assert parse_host_header(value) is None


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("a", ("a", None)),
        ("a:1", ("a", 1)),
        ("a:65535", ("a", 65535)),
        ("[::1]", ("[::1]", None)),
        ("[::1]:80", ("[::1]", 80)),
        ("", ("", None)),
        ("a:", None),
        ("a:0", None),
        ("a:00", None),
        ("a:65536", None),
        ("a:123456", None),
        ("a:1:2", None),
        ("[::1", None),
        ("[::1]80", None),
        ("::1", None),
    ],
)
def test_split_host_port(authority: str, expected: tuple[str, int | None] | None) -> None:
    assert split_host_port(authority) == expected


@pytest.mark.parametrize(
    ("text", "allow_idn", "expected"),
    [
        ("Example.COM.", False, "example.com"),
        ("bücher.example", False, None),
        ("bücher.example", True, "xn--bcher-kva.example"),
        ("\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.com", True, "example.com"),  # fullwidth
        ("a\u00adb.com", True, None),
        ("a\uff0fb.com", True, None),
        ("a\u3002b", True, "a.b"),
        ("b\u00fc..example", True, None),  # the idna codec refuses an empty label
        (
            "\u00fc" * 64 + ".example",
            True,
            None,
        ),  # ... and an over-long one  # ideographic full stop separates labels under IDNA
        ("[::1]", False, "::1"),
        ("[::1]", True, "::1"),
        ("::1", True, None),
        ("1.2.3.4", False, "1.2.3.4"),
        ("01.2.3.4", False, None),
        ("", False, None),
    ],
)
def test_normalize_host(text: str, allow_idn: bool, expected: str | None) -> None:
    assert normalize_host(text, allow_idn=allow_idn) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", True), ("::1", True), ("localhost", False), ("1.2.3", False)],
)
def test_is_ip_address(host: str, expected: bool) -> None:
    assert is_ip_address(host) is expected


# --- HostPolicy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("localhost", True),
        ("localhost:8766", True),
        ("LOCALHOST.:8766", True),
        ("127.0.0.1:8766", True),
        ("[::1]:8766", True),
        ("[0::1]", True),
        (None, False),
        ("", False),
        ("evil.com", False),
        ("evil.com:8766", False),
        ("localhost.evil.com", False),
        ("evil.localhost", False),
        ("localhostevil.com", False),
        ("127.0.0.2", False),
        ("127.1", False),
        ("2130706433", False),
        ("0.0.0.0", False),  # noqa: S104 - a Host header value, not a bind address
        ("[::2]", False),
        ("[::ffff:127.0.0.1]", False),
        ("::1", False),
        ("localhost@evil.com", False),
    ],
)
def test_default_policy(header: str | None, expected: bool) -> None:
    assert HostPolicy(DEFAULT_ALLOWED_HOSTS).check(header).allowed is expected


def test_default_allowed_hosts() -> None:
    assert DEFAULT_ALLOWED_HOSTS == ("localhost", "127.0.0.1", "::1")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("a.example.com", True),
        ("A.Example.COM.", True),
        ("a.b.example.com:8443", True),
        ("example.com", False),
        ("example.com.", False),
        ("aexample.com", False),
        ("a-example.com", False),
        ("example.com.evil.net", False),
        ("a.example.com.evil.net", False),
        ("a.example.comm", False),
    ],
)
def test_wildcard_entry(header: str, expected: bool) -> None:
    assert HostPolicy(["*.example.com"]).check(header).allowed is expected


@pytest.mark.parametrize(
    ("entries", "header"),
    [
        (["[::1]"], "[::1]"),
        (["::1"], "[0:0::1]:8766"),
        (["0:0:0:0:0:0:0:1"], "[::1]"),
        (["Example.COM."], "example.com"),
        (["bücher.example"], "xn--bcher-kva.example"),
        (["*.bücher.example"], "shop.xn--bcher-kva.example"),
        (["192.168.1.5"], "192.168.1.5:8766"),
    ],
)
def test_entries_are_normalized(entries: list[str], header: str) -> None:
    assert HostPolicy(entries).check(header).allowed


@pytest.mark.parametrize(
    "entry",
    [
        "",
        " ",
        " localhost",
        "local host",
        "*",
        "*.",
        "*.com",
        "*.localhost",
        "*.*.example.com",
        "a.*.example.com",
        "*example.com",
        "example.*",
        "*.127.0.0.1",
        "*.[::1]",
        "localhost:8766",
        "[::1]:8766",
        "[::1",
        "a_b",
        "127.1",
        "http://localhost",
        "localhost/",
        "user@localhost",
        "fe80::1%eth0",
        "1.2.3.4/8",
        "a\x00",
    ],
)
def test_bad_entries_are_refused_by_name(entry: str) -> None:
    with pytest.raises(ValueError, match="allowed host") as caught:
        HostPolicy(["localhost", entry])
    assert repr(entry) in str(caught.value)


def test_lone_star_entry_explains_itself() -> None:
    with pytest.raises(ValueError, match="DNS-rebinding"):
        HostPolicy(["*"])


def test_non_string_entry_is_refused() -> None:
    with pytest.raises(ValueError, match="not a string"):
        HostPolicy([1])  # type: ignore[list-item]


def test_empty_allowlist_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        HostPolicy([])


def test_one_string_instead_of_a_list_is_refused() -> None:
    with pytest.raises(TypeError, match="not one string"):
        HostPolicy("localhost")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, HostVerdict(False, "no Host header")),
        ("bad host", HostVerdict(False, "Host header is not a valid host[:port]")),
        ("localhost:1", HostVerdict(True, "host 'localhost' is in security.allowed_hosts")),
        (
            "a.example.com",
            HostVerdict(True, "host 'a.example.com' matches '*.example.com' in security.allowed_hosts"),
        ),
        ("evil.com", HostVerdict(False, "host 'evil.com' is not in security.allowed_hosts")),
    ],
)
def test_verdict_details(header: str | None, expected: HostVerdict) -> None:
    assert HostPolicy(["localhost", "*.example.com"]).check(header) == expected


def test_repr() -> None:
    policy = HostPolicy(["localhost", "*.example.com", "*.example.com", "::1"])
    assert repr(policy) == "HostPolicy(['::1', 'localhost', '*.example.com'])"


# --- properties ---------------------------------------------------------------------------

_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_TOP_LABEL = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)
_NAME = st.builds(lambda labels, top: ".".join([*labels, top]), st.lists(_LABEL, max_size=4), _TOP_LABEL)


@given(st.text(max_size=60))
def test_parse_host_header_never_raises(text: str) -> None:
    result = parse_host_header(text)
    assert result is None or (result == result.lower() and not result.endswith("."))


@given(st.text(max_size=60))
def test_policy_check_never_raises(text: str) -> None:
    verdict = HostPolicy([*DEFAULT_ALLOWED_HOSTS, "*.example.com"]).check(text)
    if verdict.allowed:
        assert parse_host_header(text) is not None


@given(_NAME, st.integers(min_value=1, max_value=65535), st.data())
def test_host_is_invariant_under_case_trailing_dot_and_port(
    name: str, port: int, data: st.DataObject
) -> None:
    flips = data.draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    variant = "".join(c.upper() if flip else c for c, flip in zip(name, flips, strict=True))
    dot = "." if data.draw(st.booleans()) else ""
    assert parse_host_header(f"{variant}{dot}:{port}") == name
    assert HostPolicy([name]).check(f"{variant}{dot}:{port}").allowed
    assert HostPolicy([f"*.{name}.test"]).check(f"www.{variant}.test{dot}").allowed


@given(_NAME)
def test_only_subdomains_match_a_wildcard(name: str) -> None:
    allowed = HostPolicy(["*.example.com"]).check(name).allowed
    assert allowed is name.endswith(".example.com")


@given(st.ip_addresses())
def test_ip_addresses_match_exactly(address: object) -> None:
    text = str(address)
    header = f"[{text}]:8766" if ":" in text else f"{text}:8766"
    policy = HostPolicy([text])
    assert policy.check(header).allowed
    assert not HostPolicy(["*.example.com"]).check(header).allowed
