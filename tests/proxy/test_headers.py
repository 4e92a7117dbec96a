"""Which headers cross the relay, both ways."""

from __future__ import annotations

import pytest

from wardgate.proxy.headers import (
    client_response_headers,
    connection_listed,
    rewrite_location,
    upstream_request_headers,
)
from wardgate.proxy.scrub import Scrubber

SECRET = "upstream-secret-123456"


def forwarded(client: list[tuple[str, str]], injected: list[tuple[str, str]] | None = None) -> dict[str, str]:
    out = upstream_request_headers(
        client,
        injected=injected or [],
        client_ip="203.0.113.9",
        proto="https",
        host="gw.example",
    )
    return {k.lower(): v for k, v in out.items()}


def test_client_credentials_never_cross() -> None:
    out = forwarded(
        [
            ("Authorization", "Bearer wgs_abc"),
            ("Cookie", "wardgate_session=wgc_abc; other=1"),
            ("X-API-Key", "wgk_abc"),
            ("X-CSRF-Token", "csrf"),
            ("Sec-WebSocket-Protocol", "wardgate.bearer.wgs_abc, chat"),
            ("Accept", "application/json"),
        ]
    )
    assert set(out) == {"accept", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}


@pytest.mark.parametrize(
    "name",
    [
        "Connection",
        "Keep-Alive",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "Origin",
        "Referer",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Extensions",
    ],
)
def test_hop_by_hop_and_framing_headers_are_dropped(name: str) -> None:
    assert name.lower() not in forwarded([(name, "x")])


def test_headers_named_by_connection_are_dropped() -> None:
    client = [("Connection", "keep-alive, X-Secret-Hop"), ("X-Secret-Hop", "1"), ("X-Kept", "2")]
    assert connection_listed(client) == {"keep-alive", "x-secret-hop"}
    out = forwarded(client)
    assert "x-secret-hop" not in out
    assert out["x-kept"] == "2"


def test_forwarding_headers_are_wardgates_not_the_clients() -> None:
    out = forwarded(
        [
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-Host", "evil"),
            ("X-Forwarded-Proto", "http"),
            ("Forwarded", "for=1.2.3.4"),
            ("X-Real-IP", "1.2.3.4"),
        ]
    )
    assert out["x-forwarded-for"] == "203.0.113.9"
    assert out["x-forwarded-host"] == "gw.example"
    assert out["x-forwarded-proto"] == "https"
    assert "forwarded" not in out
    assert "x-real-ip" not in out


def test_configured_headers_override_client_values_case_insensitively() -> None:
    out = upstream_request_headers(
        [("x-upstream-key", "client-forged"), ("X-Other", "kept")],
        injected=[("X-Upstream-Key", SECRET)],
        client_ip=None,
        proto="http",
        host=None,
    )
    assert out.getall("X-Upstream-Key") == [SECRET]
    assert out["X-Other"] == "kept"
    assert "X-Forwarded-For" not in out
    assert "X-Forwarded-Host" not in out


def test_extra_dropped_headers() -> None:
    out = upstream_request_headers(
        [("Accept", "text/html"), ("Expect", "100-continue")],
        injected=[],
        client_ip=None,
        proto="http",
        host=None,
        extra_dropped=("accept", "Expect"),
    )
    assert "Accept" not in out
    assert "Expect" not in out


def test_response_drops_cookies_and_hop_by_hop_and_scrubs() -> None:
    scrubber = Scrubber([SECRET])
    upstream = [
        ("Content-Type", "application/json"),
        ("Set-Cookie", "session=abc"),
        ("set-cookie", "other=def"),
        ("Connection", "close, X-Hop"),
        ("X-Hop", "1"),
        ("Transfer-Encoding", "chunked"),
        ("X-Echo", f"Bearer {SECRET}"),
        (f"X-{SECRET}", "name holds the secret"),
        ("Content-Length", "10"),
        ("Content-Encoding", "gzip"),
    ]
    out = client_response_headers(upstream, scrub=scrubber.scrub_text, body_rewritten=False)
    assert dict(out) == {
        "Content-Type": "application/json",
        "X-Echo": "Bearer [redacted]",
        "Content-Length": "10",
        "Content-Encoding": "gzip",
    }
    rewritten = client_response_headers(upstream, scrub=scrubber.scrub_text, body_rewritten=True)
    assert "Content-Length" not in rewritten
    assert "Content-Encoding" not in rewritten


def test_repeated_response_headers_are_kept() -> None:
    out = client_response_headers(
        [("Link", "<a>"), ("Link", "<b>")], scrub=lambda text: text, body_rewritten=False
    )
    assert out.getall("Link") == ["<a>", "<b>"]


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("http://up:81/base/x/y", "/proxy/api/http/x/y"),
        ("http://up:81/base", "/proxy/api/http/"),
        ("http://up:81/base?q=1", "/proxy/api/http/?q=1"),
        ("http://up:81/basement", "http://up:81/basement"),
        ("https://elsewhere/x", "https://elsewhere/x"),
        ("/relative", "/relative"),
    ],
)
def test_location_rewrite(location: str, expected: str) -> None:
    assert rewrite_location(location, upstream_base="http://up:81/base", relay_base="/proxy/api/http") == (
        expected
    )
