"""Tests for wardgate.gate.origin: Origin parsing (RFC 6454), patterns and the policy."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wardgate.gate.origin import (
    DEFAULT_PORTS,
    LOOPBACK_ORIGIN_PATTERNS,
    MAX_ORIGIN_LENGTH,
    Origin,
    OriginPattern,
    OriginPolicy,
    OriginVerdict,
    parse_origin,
    parse_origin_pattern,
)

DEVTUNNELS = "https://*.devtunnels.ms"
LOCALHOST_ANY_PORT = "http://localhost:*"

# --- parse_origin -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://example.com", Origin("https", "example.com", 443)),
        ("http://example.com", Origin("http", "example.com", 80)),
        ("HTTPS://Example.COM", Origin("https", "example.com", 443)),
        ("hTTp://LocalHost:3000", Origin("http", "localhost", 3000)),
        ("https://example.com.", Origin("https", "example.com", 443)),
        ("https://example.com:443", Origin("https", "example.com", 443)),
        ("http://example.com:80", Origin("http", "example.com", 80)),
        ("https://example.com:80", Origin("https", "example.com", 80)),
        ("https://example.com:8443", Origin("https", "example.com", 8443)),
        ("http://localhost:1", Origin("http", "localhost", 1)),
        ("http://localhost:65535", Origin("http", "localhost", 65535)),
        ("http://127.0.0.1:8766", Origin("http", "127.0.0.1", 8766)),
        ("http://127.0.0.1.:8766", Origin("http", "127.0.0.1", 8766)),
        ("http://[::1]:8766", Origin("http", "::1", 8766)),
        ("http://[0:0:0:0:0:0:0:1]", Origin("http", "::1", 80)),
        ("https://[2001:DB8::1]", Origin("https", "2001:db8::1", 443)),
        ("http://[::ffff:127.0.0.1]", Origin("http", "::ffff:7f00:1", 80)),
        ("https://a-b.c-d.example", Origin("https", "a-b.c-d.example", 443)),
        ("https://123.example", Origin("https", "123.example", 443)),
        ("https://a.devtunnels.ms", Origin("https", "a.devtunnels.ms", 443)),
        ("https://xn--bcher-kva.example", Origin("https", "xn--bcher-kva.example", 443)),
        ("https://bücher.example", Origin("https", "xn--bcher-kva.example", 443)),
        ("https://BÜCHER.Example.", Origin("https", "xn--bcher-kva.example", 443)),
        ("https://例え.jp", Origin("https", "xn--r8jz45g.jp", 443)),
        ("https://" + "a" * 63 + ".com", Origin("https", "a" * 63 + ".com", 443)),
    ],
)
def test_parse_origin_accepts_and_normalizes(value: str, expected: Origin) -> None:
    assert parse_origin(value) == expected


HOSTILE_OR_MALFORMED_ORIGINS = [
    "",
    "null",
    "NULL",
    "Null",
    # whitespace and control characters anywhere
    " https://a.com",
    "https://a.com ",
    "https://a .com",
    "https://a.com\t",
    "https://a.com\n",
    "https://a.com\r\n",
    "https://a.com\x00",
    "https://a.com\x00.evil.com",
    "https://a.com\x7f",
    "\u00a0https://a.com",
    "https://a\u200b.com",  # zero-width space
    "https://a\u00ad.com",  # soft hyphen (IDNA would silently drop it)
    "https://a\u200d.com",  # zero-width joiner
    "https://a.com\udcff",  # lone surrogate (surrogateescape-decoded byte)
    # schemes a browser page never has as an http(s) origin
    "ws://a.com",
    "wss://a.com",
    "ftp://a.com",
    "file://",
    "file:///etc/passwd",
    "chrome-extension://abcdefghijklmnop",
    "javascript://a.com",
    "ht+tp://a.com",
    # shapes
    "https:a.com",
    "https:/a.com",
    "//a.com",
    "a.com",
    "https://",
    "https://:443",
    "https:// a.com",
    # paths, queries, fragments
    "https://a.com/",
    "https://a.com/path",
    "https://a.com?",
    "https://a.com?x=1",
    "https://a.com#",
    "https://a.com#frag",
    "https://a.com\\",
    "https://a.com\\evil.com",
    # userinfo
    "https://user@a.com",
    "https://user:secret@a.com",
    "https://@a.com",
    "https://a.com@evil.com",
    # ports
    "https://a.com:",
    "https://a.com:0",
    "https://a.com:65536",
    "https://a.com:99999",
    "https://a.com:100000",
    "https://a.com:080",
    "https://a.com:+80",
    "https://a.com:-1",
    "https://a.com:8o",
    "https://a.com:\uff18\uff10",  # fullwidth digits
    "https://a.com:\u0663",  # Arabic-Indic digit three
    "https://a.com:443:443",
    "https://a.com:*",
    # IPv6 and brackets
    "https://[::1",
    "https://::1",
    "https://::1:443",
    "https://[::1]x",
    "https://[::1]:",
    "https://[::1]]",
    "https://[[::1]]",
    "https://[fe80::1%25eth0]",
    "https://[fe80::1%eth0]",
    "https://[v1.abc]",
    "https://[1.2.3.4]",
    "https://[]",
    "https://[::g]",
    # host names
    "https://a..com",
    "https://.a.com",
    "https://a.com..",
    "https://.",
    "https://-a.com",
    "https://a-.com",
    "https://a_b.com",
    "https://a*.com",
    "https://*.a.com",
    "https://a%2ecom",
    "https://a%2Fb.com",
    "https://xn--.com",
    "https://" + "a" * 64 + ".com",
    "https://" + ".".join(["a" * 50] * 5) + ".com",  # 260 characters
    "https://a\uff0fb.com",  # fullwidth solidus: IDNA would map it to "/"
    "https://a\uff20b.com",  # fullwidth commercial at: IDNA would map it to "@"
    # IPv4 spellings a browser would have canonicalized
    "https://127.1",
    "https://0x7f.0.0.1",
    "https://0x7f000001",
    "https://2130706433",
    "https://0177.0.0.1",
    "https://127.0.0.01",
    "https://999.0.0.1",
    "https://1.2.3.4.5",
    "https://a.123",
    # lists of origins
    "https://a.com https://b.com",
    "https://a.com,https://b.com",
    "https://a.com, https://b.com",
    # over-long values
    "https://" + "a" * MAX_ORIGIN_LENGTH,
]


@pytest.mark.parametrize("value", HOSTILE_OR_MALFORMED_ORIGINS)
def test_parse_origin_refuses(value: str) -> None:
    assert parse_origin(value) is None


@pytest.mark.parametrize(
    ("origin", "serialized"),
    [
        (Origin("https", "example.com", 443), "https://example.com"),
        (Origin("https", "example.com", 80), "https://example.com:80"),
        (Origin("http", "example.com", 80), "http://example.com"),
        (Origin("http", "::1", 3000), "http://[::1]:3000"),
        (Origin("https", "::1", 443), "https://[::1]"),
    ],
)
def test_origin_str_is_rfc6454_serialization(origin: Origin, serialized: str) -> None:
    assert str(origin) == serialized
    assert parse_origin(serialized) == origin


def test_default_ports() -> None:
    assert dict(DEFAULT_PORTS) == {"http": 80, "https": 443}


# --- parse_origin_pattern -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        (LOCALHOST_ANY_PORT, OriginPattern("http", "localhost", None), "http://localhost:*"),
        (DEVTUNNELS, OriginPattern("https", "devtunnels.ms", 443, True), DEVTUNNELS),
        (
            "https://app.example.com",
            OriginPattern("https", "app.example.com", 443),
            "https://app.example.com",
        ),
        (
            "https://app.example.com:443",
            OriginPattern("https", "app.example.com", 443),
            "https://app.example.com",
        ),
        (
            "http://app.example.com:8080",
            OriginPattern("http", "app.example.com", 8080),
            "http://app.example.com:8080",
        ),
        (
            "http://127.0.0.1:3000",
            OriginPattern("http", "127.0.0.1", 3000),
            "http://127.0.0.1:3000",
        ),
        ("http://[::1]:*", OriginPattern("http", "::1", None), "http://[::1]:*"),
        ("http://[0::1]", OriginPattern("http", "::1", 80), "http://[::1]"),
        ("HTTPS://*.DevTunnels.MS.", OriginPattern("https", "devtunnels.ms", 443, True), DEVTUNNELS),
        (
            "https://*.example.com:*",
            OriginPattern("https", "example.com", None, True),
            "https://*.example.com:*",
        ),
        (
            "https://bücher.example",
            OriginPattern("https", "xn--bcher-kva.example", 443),
            "https://xn--bcher-kva.example",
        ),
        (
            "https://*.co.uk",
            OriginPattern("https", "co.uk", 443, True),
            "https://*.co.uk",
        ),
    ],
)
def test_parse_origin_pattern(text: str, expected: OriginPattern, canonical: str) -> None:
    pattern = parse_origin_pattern(text)
    assert pattern == expected
    assert str(pattern) == canonical
    assert parse_origin_pattern(str(pattern)) == pattern


@pytest.mark.parametrize(
    "text",
    [
        "",
        " http://localhost:*",
        "http://localhost:* ",
        "http://local\x00host",
        "null",
        "localhost:3000",
        "localhost",
        "http//localhost",
        "ws://localhost:*",
        "*://localhost",
        "*",
        "https://*",
        "https://*:*",
        "https://*.",
        "https://*.*.example.com",
        "https://a.*.example.com",
        "https://foo*.example.com",
        "https://*foo.example.com",
        "https://*example.com",
        "https://example.*",
        "https://*.com",
        "https://*.localhost",
        "https://*.127.0.0.1",
        "https://*.[::1]",
        "http://localhost:**",
        "http://localhost:3*",
        "http://localhost:*:*",
        "http://localhost:80:*",
        "http://localhost:",
        "http://localhost:0",
        "http://localhost:65536",
        "http://localhost:080",
        "https://app.example.com/",
        "https://app.example.com/path",
        "https://app.example.com?x",
        "https://app.example.com#x",
        "https://app.example.com\\x",
        "https://user@app.example.com",
        "http://[::1",
        "http://::1:3000",
        "http://[fe80::1%25eth0]:*",
        "https://a..b",
        "https://a_b.com",
        "https://127.1",
    ],
)
def test_parse_origin_pattern_refuses_and_names_the_pattern(text: str) -> None:
    with pytest.raises(ValueError, match="origin pattern") as caught:
        parse_origin_pattern(text)
    assert repr(text) in str(caught.value)


def test_parse_origin_pattern_refuses_non_strings() -> None:
    with pytest.raises(ValueError, match="not a string"):
        parse_origin_pattern(None)  # type: ignore[arg-type]


def test_parse_origin_pattern_explains_wildcards() -> None:
    with pytest.raises(ValueError, match="whole leftmost label"):
        parse_origin_pattern("https://a.*.example.com")
    with pytest.raises(ValueError, match="top-level domain"):
        parse_origin_pattern("https://*.com")
    with pytest.raises(ValueError, match="has a path, query or fragment"):
        parse_origin_pattern("https://app.example.com/")


# --- matching -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        ("https://x.devtunnels.ms", True),
        ("https://a.b.devtunnels.ms", True),
        ("https://abc123-8766.usw2.devtunnels.ms", True),
        ("https://X.DevTunnels.MS", True),
        ("https://x.devtunnels.ms.", True),
        ("https://a.devtunnels.ms:443", True),
        ("https://devtunnels.ms", False),
        ("https://devtunnels.ms.", False),
        ("https://DEVTUNNELS.MS", False),
        ("https://.devtunnels.ms", False),
        ("https://xdevtunnels.ms", False),
        ("https://x-devtunnels.ms", False),
        ("https://devtunnels.ms.evil.com", False),
        ("https://x.devtunnels.ms.evil.com", False),
        ("https://x.devtunnels.msevil.com", False),
        ("https://evil.com#.devtunnels.ms", False),
        ("https://evil.com/.devtunnels.ms", False),
        ("https://evil.com?.devtunnels.ms", False),
        ("https://evil.com\\.devtunnels.ms", False),
        ("https://evil.com%2F.devtunnels.ms", False),
        ("https://evil.com%23.devtunnels.ms", False),
        ("https://evil.com\x00.devtunnels.ms", False),
        ("https://evil.com .devtunnels.ms", False),
        ("https://user@x.devtunnels.ms", False),
        ("https://x.devtunnels.ms@evil.com", False),
        ("https://x.devtunnels.ms:443@evil.com", False),
        ("https://x.devtunnels.ms:8443", False),
        ("http://x.devtunnels.ms", False),
        ("wss://x.devtunnels.ms", False),
        ("https://x.devtunnels.ms/", False),
        ("https://x.devtunnels.ms\uff0fevil.com", False),
        ("null", False),
    ],
)
def test_devtunnels_pattern(origin: str, expected: bool) -> None:
    parsed = parse_origin(origin)
    matched = parsed is not None and parse_origin_pattern(DEVTUNNELS).matches(parsed)
    assert matched is expected
    assert OriginPolicy([DEVTUNNELS]).check(origin).allowed is expected


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        ("http://localhost", True),
        ("http://localhost:80", True),
        ("http://localhost:3000", True),
        ("http://localhost:65535", True),
        ("http://LOCALHOST:3000", True),
        ("http://localhost.:3000", True),
        ("https://localhost:3000", False),
        ("http://localhost.evil.com", False),
        ("http://localhost.evil.com:3000", False),
        ("http://localhostevil.com", False),
        ("http://evil-localhost", False),
        ("http://evil.localhost", False),
        ("http://localhost:80@evil.com", False),
        ("http://localhost@evil.com", False),
        ("http://evil.com?localhost", False),
        ("http://evil.com#localhost", False),
        ("http://127.0.0.1:3000", False),
        ("http://[::1]:3000", False),
    ],
)
def test_localhost_any_port_pattern(origin: str, expected: bool) -> None:
    assert OriginPolicy([LOCALHOST_ANY_PORT]).check(origin).allowed is expected


@pytest.mark.parametrize(
    ("pattern", "origin", "expected"),
    [
        ("https://app.example.com", "https://app.example.com", True),
        ("https://app.example.com", "https://app.example.com:443", True),
        ("https://app.example.com", "https://app.example.com:8443", False),
        ("https://app.example.com", "http://app.example.com", False),
        ("https://app.example.com", "https://x.app.example.com", False),
        ("https://app.example.com", "https://app.example.com.evil.com", False),
        ("https://app.example.com", "https://pp.example.com", False),
        ("https://app.example.com", "https://example.com", False),
        ("http://127.0.0.1:3000", "http://127.0.0.1:3000", True),
        ("http://127.0.0.1:3000", "http://127.0.0.1:30000", False),
        ("http://127.0.0.1:3000", "http://127.0.0.10:3000", False),
        ("http://127.0.0.1:3000", "http://127.1:3000", False),
        ("http://127.0.0.1:3000", "http://127.0.0.1", False),
        ("http://[::1]:*", "http://[::1]:5173", True),
        ("http://[::1]:*", "http://[0:0::1]:5173", True),
        ("http://[::1]:*", "http://[::2]:5173", False),
        ("http://[::1]:*", "http://[::ffff:127.0.0.1]:5173", False),
        ("https://bücher.example", "https://xn--bcher-kva.example", True),
        ("https://bücher.example", "https://BÜCHER.example", True),
        ("https://xn--bcher-kva.example", "https://bücher.example", True),
        ("https://*.xn--bcher-kva.example", "https://shop.bücher.example", True),
        ("https://*.bücher.example", "https://bücher.example", False),
        ("https://*.example.com:*", "https://a.example.com:1234", True),
        ("https://*.example.com:*", "https://example.com:1234", False),
        ("https://*.example.com", "https://a.example.com:1234", False),
    ],
)
def test_pattern_matching(pattern: str, origin: str, expected: bool) -> None:
    parsed = parse_origin(origin)
    matched = parsed is not None and parse_origin_pattern(pattern).matches(parsed)
    assert matched is expected


# --- OriginPolicy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allow_missing", "allow_all", "cookie_auth", "expected"),
    [
        (True, False, False, True),
        (True, True, False, True),
        (False, False, False, False),
        (False, True, False, False),
        (True, False, True, False),
        (True, True, True, False),
        (False, False, True, False),
        (False, True, True, False),
    ],
)
def test_missing_origin(allow_missing: bool, allow_all: bool, cookie_auth: bool, expected: bool) -> None:
    policy = OriginPolicy([DEVTUNNELS], allow_all=allow_all, allow_missing=allow_missing)
    assert policy.check(None, cookie_auth=cookie_auth).allowed is expected


@pytest.mark.parametrize(
    ("kwargs", "origin", "cookie_auth", "expected"),
    [
        ({}, None, False, OriginVerdict(True, "no Origin header and security.origins.allow_missing is true")),
        (
            {"allow_missing": False},
            None,
            False,
            OriginVerdict(False, "no Origin header and security.origins.allow_missing is false"),
        ),
        (
            {},
            None,
            True,
            OriginVerdict(False, "no Origin header: cookie-authenticated requests need an allowed Origin"),
        ),
        (
            {},
            "http://localhost:3000",
            True,
            OriginVerdict(True, "origin 'http://localhost:3000' matches pattern 'http://localhost:*'"),
        ),
        (
            {},
            "https://evil.com",
            False,
            OriginVerdict(False, "origin 'https://evil.com' matches no pattern in security.origins.allowed"),
        ),
        (
            {"allow_all": True},
            "https://evil.com",
            True,
            OriginVerdict(True, "origin 'https://evil.com' allowed: security.origins.allow_all is true"),
        ),
    ],
)
def test_policy_details(
    kwargs: dict[str, bool], origin: str | None, cookie_auth: bool, expected: OriginVerdict
) -> None:
    policy = OriginPolicy([LOCALHOST_ANY_PORT, DEVTUNNELS], **kwargs)
    assert policy.check(origin, cookie_auth=cookie_auth) == expected


@pytest.mark.parametrize("allow_all", [False, True])
@pytest.mark.parametrize("cookie_auth", [False, True])
@pytest.mark.parametrize("origin", ["null", "", "https://a.com/", "https://user:pw@a.com", "\x00"])
def test_present_but_unparsable_origin_is_refused(origin: str, allow_all: bool, cookie_auth: bool) -> None:
    policy = OriginPolicy([LOCALHOST_ANY_PORT], allow_all=allow_all, allow_missing=True)
    verdict = policy.check(origin, cookie_auth=cookie_auth)
    assert not verdict.allowed
    assert "pw" not in verdict.detail
    assert "\x00" not in verdict.detail


def test_null_origin_detail_explains_opaque_origins() -> None:
    assert "opaque" in OriginPolicy([]).check("null").detail


def test_unparsable_origin_detail_does_not_echo_the_value() -> None:
    verdict = OriginPolicy([]).check("https://user:hunter2@a.com")
    assert verdict == OriginVerdict(False, "Origin header is not a single http(s) origin")


def test_policy_without_patterns_refuses_every_present_origin() -> None:
    policy = OriginPolicy([])
    assert not policy.check("http://localhost").allowed
    assert policy.check(None).allowed


def test_policy_parses_and_deduplicates_patterns() -> None:
    policy = OriginPolicy(["http://localhost:*", "HTTP://LOCALHOST:*", "https://a.example.com:443"])
    assert policy.patterns == (
        OriginPattern("http", "localhost", None),
        OriginPattern("https", "a.example.com", 443),
    )
    assert not policy.allow_all
    assert policy.allow_missing
    assert repr(policy) == (
        "OriginPolicy(['http://localhost:*', 'https://a.example.com'], allow_all=False, allow_missing=True)"
    )


def test_policy_rejects_a_bad_pattern_naming_it() -> None:
    with pytest.raises(ValueError, match=r"'https://\*\.com'"):
        OriginPolicy(["http://localhost:*", "https://*.com"])


def test_policy_rejects_one_string_instead_of_a_list() -> None:
    with pytest.raises(TypeError, match="not one string"):
        OriginPolicy("http://localhost:*")


def test_loopback_origin_patterns() -> None:
    assert LOOPBACK_ORIGIN_PATTERNS == (
        "http://localhost:*",
        "https://localhost:*",
        "http://127.0.0.1:*",
        "https://127.0.0.1:*",
        "http://[::1]:*",
        "https://[::1]:*",
    )
    policy = OriginPolicy(LOOPBACK_ORIGIN_PATTERNS, allow_missing=False)
    for allowed in [
        "http://localhost",
        "http://localhost:5173",
        "https://localhost:8443",
        "http://127.0.0.1:8766",
        "https://127.0.0.1",
        "http://[::1]:3000",
        "https://[::1]",
    ]:
        assert policy.check(allowed, cookie_auth=True).allowed, allowed
    for refused in [
        "http://localhost.evil.com",
        "http://evil.localhost:3000",
        "http://127.0.0.2:3000",
        "http://192.168.1.2:3000",
        "http://[::2]:3000",
        "http://0.0.0.0:3000",
        "http://127.1:3000",
        "null",
    ]:
        assert not policy.check(refused).allowed, refused


# --- properties ---------------------------------------------------------------------------

_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_TOP_LABEL = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)
_NAME = st.builds(lambda labels, top: ".".join([*labels, top]), st.lists(_LABEL, max_size=4), _TOP_LABEL)
_SCHEME = st.sampled_from(["http", "https"])
_PORT = st.integers(min_value=1, max_value=65535)

# Characters that may appear in a serialized origin (RFC 6454 section 6.2 with RFC 3986
# hosts as browsers emit them); everything else, in ASCII, must make the value invalid.
_ORIGIN_ALPHABET = set(string.ascii_letters + string.digits + "-.:/[]")
_OUTSIDE_GRAMMAR = st.one_of(
    st.sampled_from(sorted(set(map(chr, range(128))) - _ORIGIN_ALPHABET)),
    st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cs"]),
)


@st.composite
def _origins(draw: st.DrawFn) -> Origin:
    scheme = draw(_SCHEME)
    host = draw(
        st.one_of(
            _NAME,
            st.ip_addresses(v=4).map(str),
            st.ip_addresses(v=6).map(lambda address: address.compressed),
        )
    )
    return Origin(scheme, host, draw(_PORT))


@given(st.text(max_size=80))
def test_parse_origin_never_raises(text: str) -> None:
    result = parse_origin(text)
    assert result is None or isinstance(result, Origin)


@given(st.text(alphabet=st.sampled_from(sorted(_ORIGIN_ALPHABET | set("@#?%\\*_ \x00"))), max_size=40))
def test_parse_origin_never_raises_on_near_miss_text(text: str) -> None:
    for candidate in (text, "https://" + text, "http://" + text):
        result = parse_origin(candidate)
        assert result is None or isinstance(result, Origin)


@given(st.text(max_size=60), st.booleans())
def test_policy_check_never_raises(text: str, cookie_auth: bool) -> None:
    policy = OriginPolicy([*LOOPBACK_ORIGIN_PATTERNS, DEVTUNNELS])
    verdict = policy.check(text, cookie_auth=cookie_auth)
    assert isinstance(verdict, OriginVerdict)
    if verdict.allowed:
        assert parse_origin(text) is not None


@given(_origins())
def test_serialization_round_trips(origin: Origin) -> None:
    assert parse_origin(str(origin)) == origin


@given(_origins(), st.data())
def test_a_character_outside_the_origin_grammar_is_refused(origin: Origin, data: st.DataObject) -> None:
    text = str(origin)
    position = data.draw(st.integers(min_value=0, max_value=len(text)))
    bad = data.draw(_OUTSIDE_GRAMMAR)
    assert parse_origin(text[:position] + bad + text[position:]) is None


@given(_SCHEME, _NAME, _PORT, st.data())
def test_matching_ignores_case_trailing_dot_and_explicit_default_port(
    scheme: str, name: str, port: int, data: st.DataObject
) -> None:
    flips = data.draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    variant = "".join(c.upper() if flip else c for c, flip in zip(name, flips, strict=True))
    if data.draw(st.booleans()):
        variant += "."
    scheme_variant = scheme.upper() if data.draw(st.booleans()) else scheme
    plain = parse_origin(f"{scheme}://{name}:{port}")
    varied = parse_origin(f"{scheme_variant}://{variant}:{port}")
    assert plain is not None
    assert varied == plain
    assert parse_origin(f"{scheme}://{name}") == parse_origin(f"{scheme}://{name}:{DEFAULT_PORTS[scheme]}")
    pattern = parse_origin_pattern(f"{scheme}://*.{name}.example.com:*")
    child_plain = parse_origin(f"{scheme}://x.{name}.example.com:{port}")
    child_varied = parse_origin(f"{scheme_variant}://X.{variant.rstrip('.')}.EXAMPLE.com.:{port}")
    assert child_plain is not None
    assert child_varied is not None
    assert pattern.matches(child_plain)
    assert pattern.matches(child_varied)


@given(_NAME)
def test_only_subdomains_of_devtunnels_match_its_wildcard(name: str) -> None:
    pattern = parse_origin_pattern(DEVTUNNELS)
    origin = parse_origin(f"https://{name}")
    assert origin is not None
    assert pattern.matches(origin) is name.endswith(".devtunnels.ms")
    child = parse_origin(f"https://{name}.devtunnels.ms")
    if child is not None:  # a generated name may make the whole name too long
        assert pattern.matches(child)


@settings(max_examples=200)
@given(
    st.text(alphabet=st.sampled_from(sorted(_ORIGIN_ALPHABET | set("@#?%\\*_ .\x00"))), max_size=20),
    st.text(alphabet=st.sampled_from(sorted(_ORIGIN_ALPHABET | set("@#?%\\*_ .\x00"))), max_size=20),
)
def test_text_around_devtunnels_never_matches_unless_it_is_a_subdomain(before: str, after: str) -> None:
    origin = parse_origin(f"https://{before}devtunnels.ms{after}")
    if origin is not None and parse_origin_pattern(DEVTUNNELS).matches(origin):
        assert origin.host.endswith(".devtunnels.ms")
        assert origin.host != "devtunnels.ms"
        assert origin.port == 443
        assert after in ("", ".", ":443", ".:443")
        assert before.endswith(".")


@given(st.text(max_size=40))
def test_any_text_host_that_matches_devtunnels_is_a_subdomain(host: str) -> None:
    origin = parse_origin(f"https://{host}")
    if origin is not None and parse_origin_pattern(DEVTUNNELS).matches(origin):
        assert origin.host.endswith(".devtunnels.ms")


@given(st.text(max_size=40))
def test_parse_origin_pattern_raises_only_value_error(text: str) -> None:
    message = None
    try:
        pattern = parse_origin_pattern(text)
    except ValueError as error:
        message = str(error)
    if message is not None:
        assert repr(text) in message
    else:
        assert parse_origin_pattern(str(pattern)) == pattern
