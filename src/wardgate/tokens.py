"""Signed wardgate tokens: pure issuing and verification, no I/O.

Wire form (DESIGN.md, "Credentials")::

    <prefix><base64url(payload)>.<base64url(HMAC-SHA256(key[kid], prefix + base64url(payload)))>

The MAC covers the prefix, so a token of one kind can never pass as another,
and it covers the payload exactly as sent (the base64url text, not the decoded
bytes), so a token has exactly one valid spelling. The payload names the key
(``kid``) that signed it, so keys rotate without logging anyone out.

Verification fails closed: a token that is malformed, too long, signed with an
unknown key, signed with the wrong key, of the wrong kind, for another server
or of an unknown version is ``InvalidToken``; a valid one past its expiry is
``TokenExpired``. Comparisons are constant time (``hmac.compare_digest``).
Nothing here ever puts a token, or part of one, into an exception message.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import secrets
from collections.abc import Mapping
from enum import StrEnum
from typing import Final

import msgspec

from wardgate.errors import InvalidToken, TokenExpired

TOKEN_VERSION: Final = 1
MAX_TOKEN_LENGTH: Final = 1024
"""Longer strings are refused before any decoding."""


class TokenKind(StrEnum):
    """The kinds of signed token; the value is the payload's ``typ``."""

    PAIRING = "pairing"
    SESSION = "session"
    REFRESH = "refresh"

    @property
    def prefix(self) -> str:
        return _PREFIXES[self]


_PREFIXES: Final = {
    TokenKind.PAIRING: "wgp_",
    TokenKind.SESSION: "wgs_",
    TokenKind.REFRESH: "wgr_",
}
_KIND_BY_PREFIX: Final = {prefix: kind for kind, prefix in _PREFIXES.items()}

# 32-byte MAC = 43 base64url characters without padding.
_TOKEN_SHAPE: Final = re.compile(r"wg[psr]_[A-Za-z0-9_-]{8,900}\.[A-Za-z0-9_-]{43}")


class TokenClaims(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The signed payload. Short field names keep tokens short."""

    v: int
    kid: str
    typ: TokenKind
    sid: str
    """Server id: a token is only good for the server (or cluster) that issued it."""
    iat: int
    exp: int
    jti: str
    """Unique token id: the single-use nonce of a pairing token, the revocation handle of others."""
    sub: str | None = None
    """Subject: the device id."""
    fam: str | None = None
    """Refresh-token family (sessions derived from it carry it too)."""
    role: str | None = None
    gen: int = 0
    """Pairing generation: ``wardgate pair --refresh`` bumps it and older pairing tokens die."""


_encode_claims = msgspec.json.Encoder().encode
_decode_claims = msgspec.json.Decoder(TokenClaims).decode


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, signed_part: str) -> str:
    return _b64encode(hmac.digest(key, signed_part.encode("ascii"), "sha256"))


def new_token_id() -> str:
    """A fresh random identifier (128 bits) for ``jti``, device and family ids."""
    return secrets.token_urlsafe(16)


def kind_of(token: str) -> TokenKind | None:
    """The kind a token claims by its prefix (unverified), or None if it has no known prefix."""
    return _KIND_BY_PREFIX.get(token[:4])


def sign(claims: TokenClaims, key: bytes) -> str:
    """Serialize and sign ``claims`` with ``key`` (the key ``claims.kid`` names)."""
    prefix = claims.typ.prefix
    payload = _b64encode(_encode_claims(claims))
    return f"{prefix}{payload}.{_mac(key, prefix + payload)}"


def verify(
    token: str,
    kind: TokenKind,
    keys: Mapping[str, bytes],
    *,
    server_id: str,
    now: float,
) -> TokenClaims:
    """Verify ``token`` as a token of ``kind`` and return its claims.

    Raises ``InvalidToken`` for anything but a well-formed token of this kind,
    signed by one of ``keys`` for ``server_id``; ``TokenExpired`` if it is
    otherwise valid but ``exp <= now``.
    """
    if len(token) > MAX_TOKEN_LENGTH or _TOKEN_SHAPE.fullmatch(token) is None:
        raise InvalidToken
    prefix = kind.prefix
    if not token.startswith(prefix):
        raise InvalidToken(hint=f"expected a {kind.value} token")
    payload, _, mac = token[4:].partition(".")
    try:
        claims = _decode_claims(_b64decode(payload))
    except (msgspec.DecodeError, msgspec.ValidationError, binascii.Error, ValueError):
        raise InvalidToken from None
    key = keys.get(claims.kid)
    if key is None:
        raise InvalidToken
    if not hmac.compare_digest(_mac(key, prefix + payload), mac):
        raise InvalidToken
    # Signed from here on: the checks below are about meaning, not integrity.
    if claims.typ is not kind or claims.v != TOKEN_VERSION or claims.sid != server_id:
        raise InvalidToken
    if claims.exp <= now:
        raise TokenExpired
    return claims
