"""Signed tokens: every way a token can be wrong is refused, and only valid ones pass."""

from __future__ import annotations

import base64
import hmac
import json
import secrets

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wardgate import tokens
from wardgate.errors import InvalidToken, TokenExpired
from wardgate.tokens import TokenClaims, TokenKind

KEY = secrets.token_bytes(32)
OTHER_KEY = secrets.token_bytes(32)
KEYS = {"k1": KEY}
SERVER = "server-1"
NOW = 1_800_000_000


def claims(kind: TokenKind = TokenKind.SESSION, **over: object) -> TokenClaims:
    base: dict[str, object] = {
        "v": 1,
        "kid": "k1",
        "typ": kind,
        "sid": SERVER,
        "iat": NOW,
        "exp": NOW + 300,
        "jti": tokens.new_token_id(),
        "sub": "dev_1",
    }
    base.update(over)
    return TokenClaims(**base)  # type: ignore[arg-type]


def verify(token: str, kind: TokenKind = TokenKind.SESSION, now: float = NOW) -> TokenClaims:
    return tokens.verify(token, kind, KEYS, server_id=SERVER, now=now)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("kind", list(TokenKind))
def test_round_trip_for_every_kind(kind: TokenKind) -> None:
    c = claims(kind)
    token = tokens.sign(c, KEY)
    assert token.startswith(kind.prefix)
    assert tokens.kind_of(token) is kind
    assert verify(token, kind) == c


def test_prefixes_are_distinct_and_recognisable() -> None:
    assert [k.prefix for k in TokenKind] == ["wgp_", "wgs_", "wgr_"]
    assert tokens.kind_of("wgk_abc") is None
    assert tokens.kind_of("") is None


@pytest.mark.parametrize(
    ("issued", "presented"),
    [(a, b) for a in TokenKind for b in TokenKind if a is not b],
)
def test_a_token_of_one_kind_never_passes_as_another(issued: TokenKind, presented: TokenKind) -> None:
    token = tokens.sign(claims(issued), KEY)
    with pytest.raises(InvalidToken):
        verify(token, presented)
    # Even relabelled with the other prefix, the MAC (which covers the prefix) fails.
    relabelled = presented.prefix + token[4:]
    with pytest.raises(InvalidToken):
        verify(relabelled, presented)


def test_expired_token_is_token_expired_and_boundary_is_exclusive() -> None:
    token = tokens.sign(claims(exp=NOW + 10), KEY)
    assert verify(token, now=NOW + 9.999).exp == NOW + 10
    with pytest.raises(TokenExpired):
        verify(token, now=NOW + 10)


def test_wrong_key_unknown_kid_wrong_server_wrong_version() -> None:
    with pytest.raises(InvalidToken):
        verify(tokens.sign(claims(), OTHER_KEY))
    with pytest.raises(InvalidToken):
        verify(tokens.sign(claims(kid="nope"), KEY))
    with pytest.raises(InvalidToken):
        verify(tokens.sign(claims(sid="other-server"), KEY))
    with pytest.raises(InvalidToken):
        verify(tokens.sign(claims(v=2), KEY))


def test_key_rotation_old_tokens_verify_with_old_kid() -> None:
    old = tokens.sign(claims(kid="k1"), KEY)
    new = tokens.sign(claims(kid="k2"), OTHER_KEY)
    ring = {"k1": KEY, "k2": OTHER_KEY}
    assert tokens.verify(old, TokenKind.SESSION, ring, server_id=SERVER, now=NOW).kid == "k1"
    assert tokens.verify(new, TokenKind.SESSION, ring, server_id=SERVER, now=NOW).kid == "k2"


def test_tampered_payload_is_refused() -> None:
    token = tokens.sign(claims(sub="dev_1", role="viewer"), KEY)
    payload, mac = token[4:].split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=="))
    data["role"] = "admin"
    forged = "wgs_" + b64(json.dumps(data).encode()) + "." + mac
    with pytest.raises(InvalidToken):
        verify(forged)


def test_non_canonical_spellings_are_refused() -> None:
    token = tokens.sign(claims(), KEY)
    payload, mac = token[4:].split(".")
    # Change only the unused low bits of the MAC's last character: same bytes, other string.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(mac[-1])
    variant = mac[:-1] + alphabet[last ^ 1]
    assert base64.urlsafe_b64decode(variant + "=")[:31] == base64.urlsafe_b64decode(mac + "=")[:31]
    for bad in (
        f"wgs_{payload}.{variant}",
        f"wgs_{payload}.{mac}=",
        f"wgs_{payload}={'.'}{mac}",
        f" wgs_{payload}.{mac}",
        f"wgs_{payload}.{mac}\n",
        f"WGS_{payload}.{mac}",
        f"wgs_{payload}..{mac}",
    ):
        with pytest.raises(InvalidToken):
            verify(bad)


def test_forged_mac_with_correct_prefix_structure() -> None:
    # An attacker can build a payload with any claims; without the key the MAC cannot match.
    c = claims(role="admin")
    payload = b64(msgspec.json.encode(c))
    guess = b64(hmac.digest(b"\x00" * 32, f"wgs_{payload}".encode(), "sha256"))
    with pytest.raises(InvalidToken):
        verify(f"wgs_{payload}.{guess}")


def test_unknown_claims_field_is_refused_even_if_signed() -> None:
    data = msgspec.to_builtins(claims())
    data["admin"] = True
    payload = b64(json.dumps(data).encode())
    mac = b64(hmac.digest(KEY, f"wgs_{payload}".encode(), "sha256"))
    with pytest.raises(InvalidToken):
        verify(f"wgs_{payload}.{mac}")


def test_signed_garbage_payload_is_invalid_not_a_crash() -> None:
    for raw in (b"", b"[]", b"null", b"{", b'{"v":1}', b"\xff\xfe"):
        payload = b64(raw) or "AAAAAAAA"
        mac = b64(hmac.digest(KEY, f"wgs_{payload}".encode(), "sha256"))
        with pytest.raises(InvalidToken):
            verify(f"wgs_{payload}.{mac}")


def test_overlong_token_is_refused_before_decoding() -> None:
    with pytest.raises(InvalidToken):
        verify("wgs_" + "A" * (tokens.MAX_TOKEN_LENGTH + 1) + "." + "A" * 43)


def test_error_messages_never_contain_the_token() -> None:
    token = tokens.sign(claims(exp=NOW - 1), KEY)
    for presented in (token, token[:-2] + "AA", "wgs_" + token[4:]):
        with pytest.raises((InvalidToken, TokenExpired)) as info:
            verify(presented)
        rendered = f"{info.value} {info.value.body()} {info.value.rpc_error()}"
        assert presented[4:20] not in rendered


@settings(max_examples=400)
@given(st.text(max_size=300))
def test_arbitrary_text_is_refused_without_crashing(text: str) -> None:
    with pytest.raises(InvalidToken):
        verify(text)


@settings(max_examples=200)
@given(st.binary(min_size=1, max_size=200), st.sampled_from(list(TokenKind)))
def test_random_payload_with_random_mac_is_refused(payload: bytes, kind: TokenKind) -> None:
    token = f"{kind.prefix}{b64(payload)}.{b64(secrets.token_bytes(32))}"
    with pytest.raises(InvalidToken):
        verify(token, kind)


@settings(max_examples=200)
@given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255))
def test_any_single_byte_flip_is_refused(position: int, value: int) -> None:
    token = tokens.sign(claims(), KEY)
    index = 4 + position % (len(token) - 4)
    flipped = token[:index] + chr((ord(token[index]) + 1 + value % 60) % 128) + token[index + 1 :]
    if flipped == token:
        return
    with pytest.raises(InvalidToken):
        verify(flipped)


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=200), st.binary(min_size=1, max_size=100))
def test_keyed_hmac_equals_the_standard_library(key: bytes, message: bytes) -> None:
    assert tokens._mac_bytes(key, message) == hmac.digest(key, message, "sha256")
